"""Shared settings of the paper's models (Brandon et al. 2024, Table 1 and the 3B tables).

Each configs/paper/<scale>_<model>.py names only what differs: head size, head counts and
the layer-group pattern. Architecture and optimizer as DESIGN.md section 1: Llama-like
(pre-RMSNorm, SwiGLU, RoPE, no biases, no dropout), AdamW (0.9, 0.95), weight decay 0.1,
clip 1.0, 5% linear warmup then cosine to 10% of peak, init N(0, 0.01275), bf16 compute with
fp32 master weights.
"""
import ml_collections

from configs import default

# 1B design space (Table 1): d_model 2048, FFN 5472, 20 layers, 16 x 128 query dims.
SCALE_1B = dict(d_model=2048, mlp_dim=5472, num_layers=20)
# 3B models: our reading of the paper's 3B setup; check it against the paper's appendix
# before quoting results at this scale.
SCALE_3B = dict(d_model=3072, mlp_dim=8192, num_layers=32)


def paper_config(scale: dict, *, head_dim: int, num_heads: int, num_kv_heads: int,
                 kv_sharing: int = 1, group_sizes: str = "") -> ml_collections.ConfigDict:
    config = default.get_config()
    config.model.update(
        vocab_size=50304,  # a GPT-NeoX-sized vocabulary padded to 128; match your tokenizer
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        kv_sharing=kv_sharing, group_sizes=group_sizes, max_seq_len=2048,
        tie_embeddings=False, init_std=0.01275, norm_eps=1e-5, rope_base=10000.0,
        dtype="bfloat16", param_dtype="float32", attention="auto", remat="dots_no_batch",
        **scale)
    config.train.update(
        b1=0.9, b2=0.95, weight_decay=0.1, grad_clip=1.0,
        warmup_fraction=0.05, final_lr_fraction=0.1,
        # The paper sweeps the learning rate per model; this is a starting point, not theirs.
        learning_rate=1e-3, seq_len=2048)
    return config
