"""Export a CLA1 cla-jax run as a Hugging Face Llama directory that transformers loads.

    python -m cla_jax.hf_export --workdir=runs/llama --out_dir=runs/llama_hf [--step=N]
    # then, with transformers: LlamaForCausalLM.from_pretrained("runs/llama_hf")

The directory gets config.json (model_type llama, RoPE scaling, tied embeddings, the special
ids), generation_config.json (the eos ids that end a generation), model.safetensors and, for a
run whose tokenizer is a Hugging Face model's (an imported model, cla_jax.hf_import), that
tokenizer's files. This is hf_import's inverse: import then export gives back the original
tensors bit for bit when they were float32. A model trained here with the byte, BPE or a
shifted tokenizer.json keeps cla-jax's ids (pad 0, bos 1, eos 2) and gets no tokenizer files.

Only CLA1 models: transformers' Llama has no cross-layer K/V sharing, so a model whose layers
share K/V (model.kv_sharing > 1, or a group of several layers in model.group_sizes) has no
Llama form.
"""
from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
from etils import epath

from cla_jax import checkpoint, sharding
from cla_jax.config import ConfigError, ModelConfig
from cla_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, load_tokenizer
from cla_jax.hf_import import TOKENIZER_FILES
from cla_jax.storage import as_path

# --dtype -> (safetensors' name for it, numpy's)
EXPORT_DTYPES = {"float32": ("F32", np.float32), "bfloat16": ("BF16", ml_dtypes.bfloat16),
                 "float16": ("F16", np.float16)}


def check_exportable(model: ModelConfig, where) -> None:
    """Raises ConfigError unless the model is CLA1 (no K/V shared across layers): a Hugging
    Face Llama has no cross-layer sharing."""
    if any(size > 1 for size in model.groups):
        raise ConfigError(
            f"{where}: the model shares K/V across layers (layer groups {list(model.groups)}); "
            "a Hugging Face Llama has no cross-layer K/V sharing, so only CLA1 models "
            "(model.kv_sharing=1, every group one layer) can be exported")
    if model.has_local_layers:
        raise ConfigError(
            f"{where}: the model has local (sliding-window) layers (model.layer_types "
            f"{model.layer_types!r}); a Hugging Face Llama attends globally in every layer, so "
            "only models with model.layer_types='' can be exported")


def hf_tensors(params, model: ModelConfig) -> dict[str, np.ndarray]:
    """A CLA1 param tree -> Llama's tensors by name ([out, in] linear weights): the inverse of
    hf_import.convert_weights."""
    from cla_jax.adapt import layer_params  # noqa: PLC0415
    d = model.d_model
    tensors = {"model.embed_tokens.weight": params["embed"]["embedding"]}
    for i, layer in enumerate(layer_params(params, model)):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": layer["attn_norm"]["scale"],
            p + "self_attn.q_proj.weight": layer["query"]["kernel"].reshape(d, -1).T,
            p + "self_attn.k_proj.weight": layer["key"]["kernel"].reshape(d, -1).T,
            p + "self_attn.v_proj.weight": layer["value"]["kernel"].reshape(d, -1).T,
            p + "self_attn.o_proj.weight": layer["out"]["kernel"].reshape(-1, d).T,
            p + "post_attention_layernorm.weight": layer["mlp_norm"]["scale"],
            **{f"{p}mlp.{name}_proj.weight": layer["mlp"][name]["kernel"].T
               for name in ("gate", "up", "down")},
        })
    tensors["model.norm.weight"] = params["final_norm"]["scale"]
    if not model.tie_embeddings:  # tied: transformers ties lm_head to the embedding itself
        tensors["lm_head.weight"] = params["unembed"]["kernel"].T
    return {name: np.asarray(x) for name, x in tensors.items()}


def write_safetensors(path: epath.Path, tensors: dict[str, np.ndarray], dtype: str) -> None:
    """One .safetensors file: an 8-byte header length, a JSON header naming each tensor's
    dtype, shape and byte range, then the tensors' little-endian bytes back to back."""
    name_in_file, np_dtype = EXPORT_DTYPES[dtype]
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, x in tensors.items():
        size = x.size * np.dtype(np_dtype).itemsize
        header[name] = {"dtype": name_in_file, "shape": list(x.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
    with path.open("wb") as f:  # native byte order: little-endian wherever jax runs
        f.write(struct.pack("<Q", len(raw)) + raw)
        for x in tensors.values():
            f.write(np.ascontiguousarray(x, np_dtype).tobytes())


def rope_config(model: ModelConfig) -> dict:
    """config.json's rope_theta and rope_scaling, in the form transformers 4 and 5 both read."""
    if model.rope_scaling == "default":
        return {"rope_theta": model.rope_base, "rope_scaling": None}
    scaling = {"rope_type": model.rope_scaling, "factor": model.rope_scaling_factor}
    if model.rope_scaling == "llama3":
        scaling.update(low_freq_factor=model.rope_low_freq_factor,
                       high_freq_factor=model.rope_high_freq_factor,
                       original_max_position_embeddings=model.rope_original_max_len)
    return {"rope_theta": model.rope_base, "rope_scaling": scaling}


def special_ids(tokenizer_spec: str) -> tuple[dict, list[int], epath.Path | None]:
    """(config.json's bos/eos/pad_token_id, the ids that end a generation, the tokenizer
    directory or None) for a run's data.tokenizer. An imported model keeps the ids of its own
    config.json (copied beside its tokenizer.json); a model trained here has cla-jax's."""
    directory = epath.Path(tokenizer_spec).expanduser()
    if not (directory.is_dir() and (directory / "tokenizer.json").is_file()):
        ids = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
        return ids, [BOS_ID, EOS_ID], None
    tokenizer = load_tokenizer(str(directory))
    saved = directory / "config.json"
    saved = json.loads(saved.read_text()) if saved.is_file() else {}
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
           "pad_token_id": tokenizer.pad_id}
    return {k: saved.get(k, v) for k, v in ids.items()}, list(tokenizer.stop_ids), directory


def hf_config(model: ModelConfig, ids: dict, dtype: str) -> dict:
    """The Hugging Face config.json of a Llama with the model's shape and special token ids."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": model.vocab_size, "hidden_size": model.d_model,
        "intermediate_size": model.mlp_dim, "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_heads, "num_key_value_heads": model.num_kv_heads,
        "head_dim": model.head_dim, "hidden_act": "silu",
        "max_position_embeddings": model.max_seq_len, "rms_norm_eps": model.norm_eps,
        **rope_config(model), "attention_bias": False, "attention_dropout": 0.0,
        "mlp_bias": False, "tie_word_embeddings": model.tie_embeddings, **ids,
        "torch_dtype": dtype, "use_cache": True,
    }


def export_checkpoint(workdir, out_dir, step: int | None = None,
                      dtype: str = "float32") -> epath.Path:
    """Writes the run's checkpoint `step` (default: the newest) as a Hugging Face Llama
    directory `out_dir`; returns it."""
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"dtype must be one of {tuple(EXPORT_DTYPES)}, got {dtype!r}")
    ckpt_dir, out_dir = checkpoint.checkpoints_of(workdir), as_path(out_dir)
    try:
        step, meta = checkpoint.read_meta(ckpt_dir, step)
    except checkpoint.CheckpointError as error:
        raise checkpoint.CheckpointError(f"--workdir: {error}") from error
    model = ModelConfig.from_dict(meta["config"]["model"])
    check_exportable(model, ckpt_dir / str(step))
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"--out_dir: {out_dir} exists and is not an empty directory; give a "
                          "new one")
    ids, stop_ids, tokenizer_dir = special_ids(meta["config"]["data"]["tokenizer"])
    run = checkpoint.restore_model(ckpt_dir, step, sharding.single_device_mesh())
    tensors = hf_tensors(run.params, model)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_safetensors(out_dir / "model.safetensors", tensors, dtype)
    (out_dir / "config.json").write_text(json.dumps(hf_config(model, ids, dtype), indent=2))
    if tokenizer_dir is not None:
        for name in set(TOKENIZER_FILES) - {"config.json"}:
            if (tokenizer_dir / name).is_file():
                (out_dir / name).write_bytes((tokenizer_dir / name).read_bytes())
    if not (out_dir / "generation_config.json").exists():  # else the imported model's own
        generation = {"bos_token_id": ids["bos_token_id"], "eos_token_id": stop_ids}
        (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return out_dir


def main(argv):
    """cla-hf-export's work once its flags are parsed: writes the Hugging Face model and prints
    how to load it."""
    from absl import flags, logging  # noqa: PLC0415
    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    out = export_checkpoint(f.workdir, f.out_dir, f.step, f.dtype)
    print(f"wrote the Hugging Face Llama to {out}; load it with "
          f"transformers.LlamaForCausalLM.from_pretrained({str(out)!r})")


def run():
    """The command line (cla-hf-export); its flags are defined here, so importing the module
    defines none."""
    from absl import flags

    from cla_jax import cli

    flags.DEFINE_string("out_dir", None, "The Hugging Face directory to write (new or empty).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest usable one).")
    flags.DEFINE_enum("dtype", "float32", list(EXPORT_DTYPES), "dtype of the written weights.")
    flags.mark_flags_as_required(["workdir", "out_dir"])
    cli.start(main)


if __name__ == "__main__":
    run()
