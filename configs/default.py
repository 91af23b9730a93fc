"""The CPU demo: a 4M-parameter MQA-CLA2 model on the embedded Shakespeare corpus.

Trains in about five minutes on 2 CPU cores (about 0.5 s per step of 1024 tokens). Every paper config starts from this one and
overrides the model and optimizer; command-line overrides work as usual:
    python train.py --config=configs/default.py --config.train.steps=200
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict(dict(
        vocab_size=4096, d_model=192, num_layers=6, num_heads=4, num_kv_heads=1,
        head_dim=64, mlp_dim=512, kv_sharing=2, group_sizes="",  # e.g. "1,2x2,1"; "" = groups of kv_sharing
        # The KV map beyond CLA (docs/guides/kv_sharing.md): layer_types "5:1" = five local
        # (sliding-window) layers per global one; kv_sources "last:3" = the last 3 layers
        # reuse the K/V of the last producer of their type before them.
        layer_types="", local_window=0, kv_sources="",
        rope_base=10000.0, norm_eps=1e-5, max_seq_len=512, tie_embeddings=False,
        init_std=0.02, dtype="float32", param_dtype="float32", attention="auto", remat="none",
        loss_chunk_size=128,  # positions per chunk of the unembedding + cross-entropy; 0 = whole
    ))
    config.train = ml_collections.ConfigDict(dict(
        seed=0, steps=500, batch_size=8, seq_len=128, grad_accum_steps=1,
        learning_rate=3e-3, warmup_fraction=0.05, final_lr_fraction=0.1,
        b1=0.9, b2=0.95, weight_decay=0.1, grad_clip=1.0,
        log_every=25, eval_every=250, eval_batches=16, checkpoint_every=250, keep_checkpoints=2,
    ))
    # Device mesh (cla_jax/sharding.py): -1 = all remaining devices. FSDP shards params and
    # optimizer state as well as the batch; tensor splits heads and MLP; dcn_* span TPU slices
    # (or processes). On one device every axis is 1.
    config.mesh = ml_collections.ConfigDict(dict(
        data=1, fsdp=-1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1))
    # Data (cla_jax/data/corpus.py): tokenized once into a token store under data_dir, reused by
    # every later run. source: "shakespeare", "files:<glob>" (.txt, .jsonl[.gz|.zst], .parquet;
    # local or gs://) or "tfds:<name>".
    config.data = ml_collections.ConfigDict(dict(
        source="shakespeare", validation_source="", text_field="text",
        train_split="train", validation_split="validation", validation_fraction=0.1,
        tokenizer="bpe:4096", tokenizer_sample_bytes=100_000_000,
        name="", data_dir="", prepare_workers=0,  # "" = named after the source
    ))
    return config
