"""Decode step time side by side with MaxText's inference engine, on the peer reference model.

    PYTHONPATH=. python benchmarks/decode_vs_maxtext.py             # MaxText via benchmarks/peers/

Model: benchmarks/peers/' reference (Llama-style MQA, d_model 256, 4 layers, 4 heads of 64,
1 KV head, SwiGLU 1024, vocab 32000, float32, random weights); batch 8, 64-token prompts,
64 new tokens, greedy. cla-jax runs it as CLA1 (the same model) and its CLA2 twin.

Each round times cla-jax's `generate` (median of --repeats; decode step = (time of 64 new
tokens - time of 1) / 63, so prefill drops out) and then one run of MaxText's MaxEngine
(benchmarks/peers/maxtext_decode.sh: prefill + insert 8 slots, then 63 generate steps; its
median ms per generate step over 3 rounds). The ratio is taken within each round and the
median over rounds reported: the machines are shared and noisy.

Writes benchmarks/results/decode_vs_maxtext_<date>_<device>.json and prints a table.
"""
import pathlib
import re
import statistics
import sys

import jax
from absl import app, flags
from flax import linen as nn

sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))
from benchmarks.common import environment, median_seconds, today, write_results  # noqa: E402
from benchmarks.maxtext_peer import REFERENCE, run_peer  # noqa: E402
from cla_jax.config import ModelConfig  # noqa: E402
from cla_jax.decoding import Sampling, generate  # noqa: E402
from cla_jax.model import init_params  # noqa: E402

BATCH, PROMPT, NEW = 8, 64, 64

flags.DEFINE_integer("rounds", 3, "Rounds (cla-jax models, then MaxText).")
flags.DEFINE_integer("repeats", 5, "Timed repeats of each cla-jax generate call (median).")
flags.DEFINE_bool("maxtext", True, "Time MaxText too (--nomaxtext: cla-jax only).")
FLAGS = flags.FLAGS


def cla_jax_step_s(config: ModelConfig, params) -> float:
    prompts = [[(7 * i + j) % (config.vocab_size - 3) + 3 for j in range(PROMPT)]
               for i in range(BATCH)]
    greedy = Sampling(temperature=0)
    one = median_seconds(lambda: generate(config, params, prompts, 1, greedy), FLAGS.repeats)
    full = median_seconds(lambda: generate(config, params, prompts, NEW, greedy), FLAGS.repeats)
    return (full - one) / (NEW - 1)


def maxtext_step_s() -> float:
    """MaxText's median ms per generate step (3 rounds inside one run), in seconds."""
    log = run_peer("maxtext_decode.sh", GEN_LEN=str(NEW), ROUNDS="3")
    match = re.search(r"ms_per_decode_step=([\d.]+)", log)
    if not match:
        raise RuntimeError(f"no RESULT line in MaxText's output:\n{log[-2000:]}")
    return float(match.group(1)) / 1e3


def main(argv):
    base = ModelConfig(**{**REFERENCE, "max_seq_len": PROMPT + NEW})
    models = {"cla-jax CLA1": base, "cla-jax CLA2": base.replace(kv_sharing=2)}
    params = {name: nn.meta.unbox(init_params(m, jax.random.key(0))) for name, m in models.items()}
    rounds = []
    for r in range(FLAGS.rounds):
        entry = {name: cla_jax_step_s(m, params[name]) for name, m in models.items()}
        if FLAGS.maxtext:
            entry["MaxText 0.2.5"] = maxtext_step_s()
        rounds.append(entry)
        print(f"round {r + 1}/{FLAGS.rounds}: " +
              ", ".join(f"{k} {v * 1e3:.2f} ms/step" for k, v in entry.items()), flush=True)
    rows = []
    for name in rounds[0]:
        step = statistics.median(e[name] for e in rounds)
        row = {"model": name, "median_decode_step_s": step, "decode_tokens_per_s": BATCH / step}
        if FLAGS.maxtext:
            row["step_time_ratio_vs_maxtext"] = statistics.median(
                e[name] / e["MaxText 0.2.5"] for e in rounds)
        rows.append(row)
    result = {
        "benchmark": "decode_vs_maxtext", "date": today(), "environment": environment(),
        "settings": {"batch": BATCH, "prompt_len": PROMPT, "new_tokens": NEW,
                     "rounds": FLAGS.rounds, "repeats": FLAGS.repeats, "model": base.to_dict()},
        "rounds": rounds, "rows": rows}
    out = write_results(result)
    print(f"{'model':<14} {'ms/step':>8} {'tok/s':>7} {'vs MaxText':>10}")
    for row in rows:
        ratio = f"{row['step_time_ratio_vs_maxtext']:.2f}x" if FLAGS.maxtext else "-"
        print(f"{row['model']:<14} {row['median_decode_step_s'] * 1e3:>8.2f} "
              f"{row['decode_tokens_per_s']:>7.0f} {ratio:>10}")
    print(f"results in {out}")


if __name__ == "__main__":
    app.run(main)
