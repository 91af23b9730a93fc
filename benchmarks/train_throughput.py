"""Training throughput: step time, tokens/s and model FLOP utilisation, with MaxText alongside.

    PYTHONPATH=. python benchmarks/train_throughput.py                # reference model, CLA1+CLA2
    PYTHONPATH=. python benchmarks/train_throughput.py --maxtext      # + MaxText, alternating
    PYTHONPATH=. python benchmarks/train_throughput.py --config=configs/paper/1b_h128_mqa_cla2.py \
        --batch_size=8 --seq_len=2048                                 # GPU: the 1B model

The reference model is the one benchmarks/peers/ runs MaxText on: Llama-style MQA, d_model 256,
4 layers, 4 heads of 64, 1 KV head, SwiGLU 1024, vocab 32000, sequence 256, batch 8, float32,
AdamW, scan on, synthetic tokens. cla-jax runs it as CLA1 (the same model) and as its CLA2 twin.

Each round measures, back to back: XLA's float32 (or the config's dtype) matmul rate on this
device, then each cla-jax model's median step time over --steps steps after a warm-up, then
(with --maxtext) one MaxText training run (30 steps, median after step 5, read from its log).
Ratios are taken within a round, medians over rounds: the machines are shared and noisy.
MFU = flops/token (cla_jax.train_flops_per_token) x tokens/s / peak; on CPU the "peak" is the
matmul rate measured in the same round, elsewhere the device's datasheet peak where known.

Writes benchmarks/results/train_throughput_<date>_<device>.json and prints a table.
"""
import pathlib
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))
from benchmarks.common import environment, model_from_config_file, today, write_results  # noqa: E402
from benchmarks.maxtext_peer import REFERENCE, run_peer  # noqa: E402
from cla_jax.config import ModelConfig, num_params, train_flops_per_token  # noqa: E402
from cla_jax.train.metrics import peak_flops  # noqa: E402
from cla_jax.train.optimizer import make_optimizer  # noqa: E402
from cla_jax.train.state import init_state  # noqa: E402
from cla_jax.train.step import make_train_step  # noqa: E402

flags.DEFINE_string("config", None, "A config file whose model to time (default: the "
                    "reference model above, as CLA1 and CLA2).")
flags.DEFINE_integer("batch_size", 8, "Batch size.")
flags.DEFINE_integer("seq_len", 256, "Sequence length.")
flags.DEFINE_integer("steps", 10, "Timed steps per model per round.")
flags.DEFINE_integer("rounds", 3, "Rounds (matmul rate, every model, MaxText).")
flags.DEFINE_bool("maxtext", False, "Also time MaxText 0.2.5 (benchmarks/peers/maxtext_train.sh) "
                  "on the reference model in every round.")
flags.DEFINE_string("remat", None, "Override model.remat.")
flags.DEFINE_string("out", None, "Results JSON (default: benchmarks/results/...).")
FLAGS = flags.FLAGS


def models() -> dict[str, ModelConfig]:
    if FLAGS.config:
        base = model_from_config_file(FLAGS.config)
        name = pathlib.Path(FLAGS.config).stem
    else:
        base, name = ModelConfig(**REFERENCE), "reference"
    if FLAGS.remat:
        base = base.replace(remat=FLAGS.remat)
    if FLAGS.config:
        return {name: base}
    return {"reference CLA1": base, "reference CLA2": base.replace(kv_sharing=2)}


def matmul_rate(dtype: str, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a jitted n x n x n matmul, median of `repeats`."""
    a = jnp.asarray(np.random.RandomState(0).randn(n, n), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


class ClaJaxRun:
    """A compiled train step and state of one model, timed a few steps at a time."""

    def __init__(self, model: ModelConfig):
        self.model = model
        train = ml_collections.ConfigDict(dict(
            learning_rate=1e-3, steps=1000, warmup_fraction=0.05, final_lr_fraction=0.1,
            b1=0.9, b2=0.95, weight_decay=0.1, grad_clip=1.0))
        optimizer = make_optimizer(train)
        self.state = init_state(model, optimizer, 0)
        self.step = make_train_step(model, optimizer)
        rng = np.random.RandomState(0)
        b, t = FLAGS.batch_size, FLAGS.seq_len
        tokens = rng.randint(3, model.vocab_size, (b, t + 1)).astype(np.int32)
        self.batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                      "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
                      "segment_ids": np.ones((b, t), np.int32),
                      "weights": np.ones((b, t), np.float32)}
        start = time.perf_counter()
        self.state, metrics = self.step(self.state, self.batch)
        jax.block_until_ready(metrics)
        self.first_step_s = time.perf_counter() - start  # includes compilation

    def median_step_s(self, steps: int) -> float:
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            self.state, metrics = self.step(self.state, self.batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
        return statistics.median(times)


def maxtext_step_s() -> float:
    """Median MaxText step time (steps 5..29) of one run of the peer training script."""
    log = run_peer("maxtext_train.sh")
    seconds = [float(m.group(2)) for m in re.finditer(
        r"completed step: (\d+), seconds: ([\d.]+)", log) if int(m.group(1)) >= 5]
    if not seconds:
        raise RuntimeError(f"no step times in MaxText's log:\n{log[-2000:]}")
    return statistics.median(seconds)


def main(argv):
    if FLAGS.maxtext and FLAGS.config:
        raise app.UsageError("--maxtext times the reference model; drop --config")
    tokens_per_step = FLAGS.batch_size * FLAGS.seq_len
    runs = {name: ClaJaxRun(model) for name, model in models().items()}
    dtype = next(iter(runs.values())).model.dtype
    peak = peak_flops(1)  # one device: the benchmark runs unsharded
    rounds = []
    for r in range(FLAGS.rounds):
        entry = {"matmul_flops_per_s": matmul_rate(dtype),
                 "step_s": {name: run.median_step_s(FLAGS.steps) for name, run in runs.items()}}
        if FLAGS.maxtext:
            entry["step_s"]["MaxText 0.2.5"] = maxtext_step_s()
        rounds.append(entry)
        print(f"round {r + 1}/{FLAGS.rounds}: matmul {entry['matmul_flops_per_s'] / 1e9:.0f} "
              f"GFLOP/s; " + ", ".join(f"{k} {v:.3f} s" for k, v in entry["step_s"].items()),
              flush=True)
    rows = []
    model_of = {name: run.model for name, run in runs.items()}
    model_of["MaxText 0.2.5"] = ModelConfig(**REFERENCE)  # the same model, MaxText's code
    for name in rounds[0]["step_s"]:
        model = model_of[name]
        flops_per_token = train_flops_per_token(model, FLAGS.seq_len)
        step_s = statistics.median(e["step_s"][name] for e in rounds)
        of_matmul = statistics.median(
            flops_per_token * tokens_per_step / e["step_s"][name] / e["matmul_flops_per_s"]
            for e in rounds)
        row = {"model": name, "params": num_params(model), "flops_per_token": flops_per_token,
               "median_step_s": step_s, "tokens_per_s": tokens_per_step / step_s,
               "achieved_flops_per_s": flops_per_token * tokens_per_step / step_s,
               "fraction_of_measured_matmul_rate": of_matmul,
               "mfu_vs_peak": (flops_per_token * tokens_per_step / step_s / peak) if peak else None,
               "first_step_s_with_compile": runs[name].first_step_s if name in runs else None}
        if FLAGS.maxtext:
            row["step_time_ratio_vs_maxtext"] = statistics.median(
                e["step_s"][name] / e["step_s"]["MaxText 0.2.5"] for e in rounds)
        rows.append(row)
    result = {
        "benchmark": "train_throughput", "date": today(), "environment": environment(),
        "settings": {"config": FLAGS.config or "reference", "batch_size": FLAGS.batch_size,
                     "seq_len": FLAGS.seq_len, "steps": FLAGS.steps, "rounds": FLAGS.rounds,
                     "maxtext": FLAGS.maxtext, "dtype": dtype,
                     "models": {n: r.model.to_dict() for n, r in runs.items()}},
        "peak_flops_per_s": peak, "rounds": rounds, "rows": rows}
    out = write_results(result, FLAGS.out)
    print(f"{'model':<16} {'step s':>7} {'tok/s':>7} {'GFLOP/s':>8} {'of matmul':>9} "
          f"{'MFU':>6} {'vs MaxText':>10}")
    for row in rows:
        mfu = f"{row['mfu_vs_peak']:.1%}" if row["mfu_vs_peak"] else "-"
        ratio = f"{row['step_time_ratio_vs_maxtext']:.2f}x" if FLAGS.maxtext else "-"
        print(f"{row['model']:<16} {row['median_step_s']:>7.3f} {row['tokens_per_s']:>7.0f} "
              f"{row['achieved_flops_per_s'] / 1e9:>8.1f} "
              f"{row['fraction_of_measured_matmul_rate']:>9.1%} {mfu:>6} {ratio:>10}")
    print(f"results in {out}")


if __name__ == "__main__":
    app.run(main)
