"""Import a Hugging Face Llama checkpoint (config.json + safetensors) as a CLA1 cla-jax run.

    python -m cla_jax.hf_import --hf_dir=path/to/Llama-3.2-1B --workdir=runs/llama
    python eval.py --workdir=runs/llama        # perplexity on the run's data.source
    python -m cla_jax.adapt --from_workdir=runs/llama --config=runs/llama/config.py \
        --config.model.kv_sharing=2 --workdir=runs/llama_cla2          # then uptrain to CLA2

MHA, GQA and MQA Llamas (and Mistral without a sliding window) map one to one onto a CLA1
model: every layer is its own group. The workdir gets step 0 of a new run (fresh optimizer),
`config.py` that rebuilds its config, and the model's tokenizer in `tokenizer/`.

Ids are the model's own: the embedding and unembedding are the checkpoint's rows unchanged,
and the run's tokenizer is `workdir/tokenizer/` (tokenizer.json and the files naming the
special ids: config.json, generation_config.json, tokenizer_config.json), which
cla_jax/data/tokenizer.py reads as an HFModelTokenizer: bos, pad and the eos ids that end a
generation are the model's. RoPE scaling of type linear and llama3 (Llama 3.1/3.2) maps onto
model.rope_scaling; other types are refused.

A llama.cpp GGUF file imports the same way (`--gguf=FILE` instead of `--hf_dir`):
cla_jax/gguf_import.py turns it into a config.json, tensors and tokenizer files and hands them
to `write_run` here.
"""
from __future__ import annotations

import json
import pathlib
import re
import struct
from collections.abc import Callable

import numpy as np
from etils import epath

from cla_jax.config import ConfigError, ModelConfig
from cla_jax.data.tokenizer import MODEL_ID_FILES, HFModelTokenizer
from cla_jax.storage import as_path

SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": None}
SUPPORTED_TYPES = ("llama", "mistral")
# A model directory's tokenizer: tokenizer.json, the files naming its special ids, the map
# transformers keeps beside them (copied along so an export gives all of them back), and the
# chat template that serve.py's /v1/chat/completions renders.
TOKENIZER_FILES = ("tokenizer.json", *MODEL_ID_FILES, "special_tokens_map.json",
                   "chat_template.jinja")


def read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    """Every tensor of one .safetensors file, memory-mapped (bf16 through ml_dtypes)."""
    import ml_dtypes  # noqa: PLC0415  (comes with jax)
    with open(path, "rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_size))
    data = np.memmap(path, np.uint8, mode="r", offset=8 + header_size)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ConfigError(f"{path}: tensor {name} has dtype {info['dtype']}; only "
                              f"{sorted(SAFETENSORS_DTYPES)} weights can be imported")
        dtype = SAFETENSORS_DTYPES[info["dtype"]] or ml_dtypes.bfloat16
        start, end = info["data_offsets"]
        tensors[name] = data[start:end].view(dtype).reshape(info["shape"])
    return tensors


def read_weights(hf_dir: pathlib.Path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint: one model.safetensors or the shards its index names."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in hf_dir.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{hf_dir} holds no *.safetensors; convert .bin weights first "
                          "(transformers: model.save_pretrained(dir, safe_serialization=True))")
    weights = {}
    for name in files:
        weights.update(read_safetensors(hf_dir / name))
    return weights


def model_config_from_hf(hf: dict, dtype: str = "float32", origin: str = "config.json") -> dict:
    """cla-jax model fields (CLA1) for a Hugging Face Llama config.json; refuses what differs,
    naming `origin` (where the config came from)."""
    def refuse(what: str):
        raise ConfigError(f"{origin}: {what}; cla-jax imports Llama-architecture models "
                          "(RMSNorm, RoPE, SwiGLU, no biases)")
    if hf.get("model_type") not in SUPPORTED_TYPES:
        refuse(f"model_type {hf.get('model_type')!r} is not one of {SUPPORTED_TYPES}")
    if hf.get("hidden_act", "silu") != "silu":
        refuse(f"hidden_act {hf['hidden_act']!r} is not silu (SwiGLU)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        refuse("the model has attention or MLP biases")
    if hf.get("sliding_window") is not None:
        refuse(f"sliding_window {hf['sliding_window']} attention is not supported")
    heads = hf["num_attention_heads"]
    return dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        mlp_dim=hf["intermediate_size"], kv_sharing=1, group_sizes="",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        dtype=dtype, param_dtype="float32", **rope_fields(hf, refuse))


def rope_fields(hf: dict, refuse) -> dict:
    """model.rope_* for config.json's RoPE: transformers 4 writes rope_theta and rope_scaling,
    transformers 5 one rope_parameters dict."""
    rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        refuse("partial_rotary_factor != 1 (RoPE on part of each head) is not supported")
    fields = dict(rope_base=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))))
    if rope_type == "default":
        return fields
    if rope_type not in ("linear", "llama3"):
        refuse(f"RoPE scaling {rope_type!r} is not supported (default, linear and llama3 are)")

    def value(key: str) -> float:
        if key not in rope:
            refuse(f"RoPE scaling {rope_type!r} without its {key!r}")
        return float(rope[key])
    fields.update(rope_scaling=rope_type, rope_scaling_factor=value("factor"))
    if rope_type == "llama3":  # transformers' fallback for a missing original length
        rope.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
        fields.update(rope_low_freq_factor=value("low_freq_factor"),
                      rope_high_freq_factor=value("high_freq_factor"),
                      rope_original_max_len=int(value("original_max_position_embeddings")))
    return fields


def convert_weights(weights: dict[str, np.ndarray], model: ModelConfig) -> dict:
    """HF tensors ([out, in] linear weights) -> a cla-jax CLA1 param tree (float32)."""
    from cla_jax.adapt import stack_layers  # noqa: PLC0415
    weights = {re.sub(r"^model\.", "", k): v for k, v in weights.items()}
    used = set()

    def take(name: str) -> np.ndarray:
        if name not in weights:
            raise ConfigError(f"the checkpoint has no tensor {name!r} (found e.g. "
                              f"{sorted(weights)[:4]}); is it a Llama checkpoint?")
        used.add(name)
        return np.asarray(weights[name], np.float32)

    d, n, k, h = model.d_model, model.num_heads, model.num_kv_heads, model.head_dim
    layers = []
    for i in range(model.num_layers):
        p = f"layers.{i}."
        layers.append({
            "attn_norm": {"scale": take(p + "input_layernorm.weight")},
            "query": {"kernel": take(p + "self_attn.q_proj.weight").T.reshape(d, n, h)},
            "key": {"kernel": take(p + "self_attn.k_proj.weight").T.reshape(d, k, h)},
            "value": {"kernel": take(p + "self_attn.v_proj.weight").T.reshape(d, k, h)},
            "out": {"kernel": take(p + "self_attn.o_proj.weight").T.reshape(n, h, d)},
            "mlp_norm": {"scale": take(p + "post_attention_layernorm.weight")},
            "mlp": {name: {"kernel": take(f"{p}mlp.{name}_proj.weight").T}
                    for name in ("gate", "up", "down")},
        })
    params = {"embed": {"embedding": take("embed_tokens.weight")},
              "final_norm": {"scale": take("norm.weight")}, **stack_layers(layers, model)}
    if not model.tie_embeddings:
        params["unembed"] = {"kernel": take("lm_head.weight").T}
    # A tied checkpoint may still carry lm_head (a copy of the embedding): not a weight.
    unused = sorted(set(weights) - used - {"rotary_emb.inv_freq"}
                    - ({"lm_head.weight"} if model.tie_embeddings else set()))
    if unused:
        raise ConfigError(f"the checkpoint has tensors this import does not map: {unused[:6]}")
    return params


def check_tokenizer(hf_dir: pathlib.Path, model: ModelConfig) -> None:
    """Refuses a tokenizer whose ids the model lacks, or one without an eos."""
    tokenizer = HFModelTokenizer(hf_dir)
    if tokenizer.vocab_size > model.vocab_size:
        raise ConfigError(f"{hf_dir}: tokenizer.json has {tokenizer.vocab_size} ids but the "
                          f"model only {model.vocab_size} rows; is it this model's tokenizer?")


def copy_tokenizer(hf_dir: pathlib.Path, target: epath.Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (hf_dir / name).is_file():
            (target / name).write_bytes((hf_dir / name).read_bytes())


def import_checkpoint(hf_dir, workdir, dtype: str = "float32",
                      source: str = "shakespeare") -> epath.Path:
    """Writes step 0 of a CLA1 run converted from `hf_dir`; returns its checkpoint directory."""
    hf_dir = pathlib.Path(hf_dir).expanduser()
    if not (hf_dir / "config.json").is_file():
        raise ConfigError(f"--hf_dir: {hf_dir} has no config.json; point it at a downloaded "
                          "Hugging Face model directory")
    hf = json.loads((hf_dir / "config.json").read_text())
    tokenizer_dir = hf_dir if (hf_dir / "tokenizer.json").is_file() else None
    return write_run(hf, lambda: read_weights(hf_dir), tokenizer_dir, workdir, dtype=dtype,
                     source=source, origin="config.json", imported_from=hf_dir)


def write_run(hf: dict, load_weights: Callable[[], dict[str, np.ndarray]],
              tokenizer_dir: pathlib.Path | None, workdir, *, dtype: str, source: str,
              origin: str, imported_from: pathlib.Path) -> epath.Path:
    """Writes step 0 of the CLA1 run of the model that config.json `hf` describes, whose
    Hugging Face-named tensors `load_weights()` gives and whose tokenizer files are in
    `tokenizer_dir` (None: none); returns its checkpoint directory. `origin` names the config's
    source in refusals, `imported_from` the model in the checkpoint's metadata."""
    from cla_jax.adapt import write_first_step  # noqa: PLC0415
    from configs import default  # noqa: PLC0415
    workdir = as_path(workdir)
    config = default.get_config()
    config.model.update(model_config_from_hf(hf, dtype, origin))
    config.data.source = source
    model = ModelConfig.from_dict(config.model)
    params = convert_weights(load_weights(), model)
    if tokenizer_dir is not None:
        check_tokenizer(tokenizer_dir, model)
        config.data.tokenizer = str(workdir / "tokenizer")
    else:
        from absl import logging  # noqa: PLC0415
        logging.warning("%s has no tokenizer.json: set data.tokenizer in %s to the model's "
                        "tokenizer (a directory holding its tokenizer.json) before eval or "
                        "training", imported_from, workdir / "config.py")
    workdir.mkdir(parents=True, exist_ok=True)
    target = write_first_step(workdir / "checkpoints", config, params,
                              {"imported_from": str(imported_from.absolute())})
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, workdir / "tokenizer")
    (workdir / "config.py").write_text(
        f'"""The config of the model imported from {imported_from} (cla_jax.hf_import)."""\n'
        "import ml_collections\n\n\ndef get_config():\n"
        f"    return ml_collections.ConfigDict({config.to_dict()!r})\n")
    return target


def main(argv):
    from absl import flags, logging  # noqa: PLC0415
    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    if f.gguf:
        from cla_jax.gguf_import import import_gguf  # noqa: PLC0415
        target = import_gguf(f.gguf, f.workdir, f.dtype, f.source)
    else:
        target = import_checkpoint(f.hf_dir, f.workdir, f.dtype, f.source)
    print(f"wrote step 0 of the imported CLA1 model to {target}; its config is "
          f"{as_path(f.workdir) / 'config.py'}")


def run():
    """The command line (cla-hf-import); its flags are defined here, so importing the module
    defines none."""
    from absl import flags

    from cla_jax import cli

    flags.DEFINE_string("hf_dir", None, "A Hugging Face Llama directory (config.json, "
                        "*.safetensors, tokenizer.json, generation_config.json).")
    flags.DEFINE_string("gguf", None, "Or a llama.cpp GGUF file of a Llama (any quantisation "
                        "the gguf package dequantises; needs `pip install gguf`).")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype of the run "
                      "(weights are kept in float32).")
    flags.DEFINE_string("source", "shakespeare", "The run's config.data.source, which eval.py "
                        "and train.py read: shakespeare, files:<glob>, tfds:<name>.")
    flags.mark_flags_as_required(["workdir"])
    flags.mark_flags_as_mutual_exclusive(["hf_dir", "gguf"], required=True)
    cli.start(main)


if __name__ == "__main__":
    run()
