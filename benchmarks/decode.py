"""Decode benchmark: prefill time, per-token latency and tokens/s through the grouped cache,
for CLA1 / CLA2 / CLA3 twins of one model, at batch 1 and at the largest batch whose cache
fits a memory budget; plus the capacity ratio against the no-CLA twin.

    python benchmarks/decode.py                       # CPU-sized twins, 8 MiB cache budget
    python benchmarks/decode.py --config=configs/paper/1b_h128_mqa_cla2.py --budget_gib=40

Writes benchmarks/results/decode_<date>_<device>.json and prints a table.
"""
import pathlib
import sys

import jax
from absl import app, flags
from flax import linen as nn

sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))
from benchmarks.common import (  # noqa: E402
    environment,
    median_seconds,
    model_from_config_file,
    today,
    write_results,
)
from cla_jax.capacity import capacity  # noqa: E402
from cla_jax.decoding import Sampling, generate  # noqa: E402
from cla_jax.model import init_params  # noqa: E402

flags.DEFINE_string("config", "configs/default.py", "Config file; its model is the CLA2 row's "
                    "shape, and the twins change only the layer groups.")
flags.DEFINE_float("budget_gib", 8 / 1024, "KV-cache memory budget for the large-batch row "
                   "(default 8 MiB: on the CPU twins it separates CLA1/2/3 below the cap).")
flags.DEFINE_integer("prompt_len", 64, "Prompt tokens.")
flags.DEFINE_integer("new_tokens", 64, "Generated tokens.")
flags.DEFINE_integer("max_batch", 64, "Cap on the large batch (CPU run time).")
flags.DEFINE_integer("repeats", 3, "Timed repeats (median).")
FLAGS = flags.FLAGS


def measure(config, params, batch):
    prompts = [[(7 * i + j) % config.vocab_size for j in range(FLAGS.prompt_len)]
               for i in range(batch)]
    greedy = Sampling(temperature=0)
    prefill = median_seconds(lambda: generate(config, params, prompts, 1, greedy),
                             FLAGS.repeats)
    full = median_seconds(lambda: generate(config, params, prompts, FLAGS.new_tokens, greedy),
                 FLAGS.repeats)
    per_step = (full - prefill) / (FLAGS.new_tokens - 1)
    return {"batch": batch, "prefill_s": prefill, "decode_step_s": per_step,
            "decode_tokens_per_s": batch / per_step}


def main(argv):
    base = model_from_config_file(FLAGS.config)
    base = base.replace(max_seq_len=max(base.max_seq_len, FLAGS.prompt_len + FLAGS.new_tokens))
    context = FLAGS.prompt_len + FLAGS.new_tokens
    budget = int(FLAGS.budget_gib * 2**30)
    cache_dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    rows = []
    for sharing in (1, 2, 3):
        config = base.replace(kv_sharing=sharing, group_sizes=None)
        params = nn.meta.unbox(init_params(config, jax.random.key(0)))
        cap = capacity(config, budget, context, cache_dtype)
        big = max(1, min(FLAGS.max_batch, cap["cla"]["max_batch_at_context"]))
        rows.append({"kv_sharing": sharing, "groups": list(config.groups),
                     "kv_bytes_per_token": cap["cla"]["bytes_per_token"],
                     "fits_batch_at_context": cap["cla"]["max_batch_at_context"],
                     "capacity_ratio_vs_cla1": cap["capacity_ratio"],
                     "batch_1": measure(config, params, 1),
                     "large_batch": measure(config, params, big)})
    result = {
        "benchmark": "decode", "date": today(), "environment": environment(),
        "settings": {"config": FLAGS.config, "prompt_len": FLAGS.prompt_len,
                     "new_tokens": FLAGS.new_tokens, "budget_bytes": budget,
                     "cache_dtype": cache_dtype, "repeats": FLAGS.repeats,
                     "max_batch_cap": FLAGS.max_batch, "model": base.to_dict()},
        "note": "Random-init params, greedy, no EOS. Shared noisy machine: compare rows of one "
                "run; decode_step_s = (time(N tokens) - time(1 token)) / (N - 1).",
        "rows": rows}
    out = write_results(result)
    print(f"{'CLA':>4} {'B/token':>8} {'fits':>6} {'ratio':>6} {'prefill ms':>10} "
          f"{'step ms b1':>10} {'tok/s b1':>8} {'batch':>5} {'tok/s':>8}")
    for r in rows:
        b1, big = r["batch_1"], r["large_batch"]
        print(f"{r['kv_sharing']:>4} {r['kv_bytes_per_token']:>8} {r['fits_batch_at_context']:>6} "
              f"{r['capacity_ratio_vs_cla1']:>6.2f} {b1['prefill_s'] * 1e3:>10.1f} "
              f"{b1['decode_step_s'] * 1e3:>10.2f} {b1['decode_tokens_per_s']:>8.0f} "
              f"{big['batch']:>5} {big['decode_tokens_per_s']:>8.0f}")
    print(f"results in {out}")


if __name__ == "__main__":
    app.run(main)
