"""How many cached tokens fit a memory budget, with CLA and without (the group-size-1 twin;
for a model with local layers, also its all-global twin).

Measured from the cache arrays' shapes and dtypes (`jax.eval_shape` of `init_cache`, nothing
allocated), not from a formula, so it stays true to what decoding really allocates: an int8
cache counts its int8 K/V and its bfloat16 per-token, per-head scales.

    python -m cla_jax.capacity --config=configs/paper/1b_h128_mqa_cla2.py --budget_gib=40
    python -m cla_jax.capacity --config=configs/default.py --dtype=int8
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from cla_jax.cache import init_cache, kv_bytes
from cla_jax.config import ModelConfig


def without_cla(config: ModelConfig) -> ModelConfig:
    """The same model with every layer producing its own K/V (no sharing; the layer types
    and local windows stay)."""
    return config.replace(kv_sharing=1, group_sizes=None, kv_sources="")


def all_global(config: ModelConfig) -> ModelConfig:
    """The same model with every layer global and producing its own K/V."""
    return config.replace(kv_sharing=1, group_sizes=None, kv_sources="", layer_types="",
                          local_window=0)


def cache_bytes(config: ModelConfig, batch_size: int, context: int, dtype="bfloat16") -> int:
    """Bytes of the KV cache for `batch_size` sequences of `context` tokens, from its shapes
    (nothing is allocated)."""
    shapes = jax.eval_shape(lambda: init_cache(config, batch_size, context, jnp.dtype(dtype)))
    return kv_bytes(shapes)


def capacity(config: ModelConfig, budget_bytes: int, context: int | None = None,
             dtype="bfloat16") -> dict:
    """Cached tokens and sequences of `context` tokens that fit `budget_bytes`, for the
    config and for its no-CLA twin."""
    context = context or config.max_seq_len
    report = {"budget_bytes": int(budget_bytes), "context": context, "dtype": str(dtype)}
    twins = [("cla", config), ("no_cla", without_cla(config))]
    if config.has_local_layers:
        twins.append(("all_global", all_global(config)))
    for name, cfg in twins:
        per_sequence = cache_bytes(cfg, 1, context, dtype)
        per_token = per_sequence // context
        report[name] = {"bytes_per_token": per_token,
                        "max_cached_tokens": budget_bytes // per_token,
                        "max_batch_at_context": budget_bytes // per_sequence}
    for twin, key in (("no_cla", "capacity_ratio"), ("all_global", "ratio_vs_all_global")):
        if twin in report:
            report[key] = report["cla"]["max_cached_tokens"] / report[twin]["max_cached_tokens"]
    return report


def main(argv):
    """cla-capacity's work once its flags are parsed: prints how many tokens and sequences
    fit the memory budget."""
    from absl import flags
    config = ModelConfig.from_dict(flags.FLAGS.config.model)
    budget = int(flags.FLAGS.budget_gib * 2**30)
    r = capacity(config, budget, flags.FLAGS.context, flags.FLAGS.dtype)
    scales = " (int8 K/V + bfloat16 scales)" if r["dtype"] == "int8" else ""
    print(f"KV-cache budget {flags.FLAGS.budget_gib} GiB at {r['dtype']}{scales}, "
          f"context {r['context']}:")
    for name, label in (("cla", f"this config ({config.num_kv_layers} of {config.num_layers} "
                                f"layers cache K/V)"),
                        ("no_cla", "its no-CLA twin"),
                        ("all_global", "its all-global no-sharing twin")):
        if name not in r:
            continue
        c = r[name]
        print(f"  {label}: {c['bytes_per_token']} bytes/token, {c['max_cached_tokens']:,} "
              f"cached tokens = batch {c['max_batch_at_context']:,} x {r['context']}")
    print(f"  capacity ratio: {r['capacity_ratio']:.3f}x" + (
        f" (vs all-global: {r['ratio_vs_all_global']:.3f}x)" if "ratio_vs_all_global" in r
        else ""))


def run():
    """The command line (cla-capacity); its flags are defined here, so importing the module
    defines none."""
    from absl import flags
    from ml_collections import config_flags

    from cla_jax import cli
    config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
    flags.DEFINE_float("budget_gib", 16.0, "Memory for the KV cache, GiB.")
    flags.DEFINE_integer("context", None, "Tokens per sequence (default: model.max_seq_len).")
    flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16", "float32", "int8"],
                      "Cache dtype (int8: quantised K/V with per-token, per-head scales).")
    flags.mark_flags_as_required(["config"])
    cli.start(main)


if __name__ == "__main__":
    run()
