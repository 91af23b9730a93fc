"""The paper's Pareto claim at small scale: train a list of models on the same data, tokens and
seeds, evaluate each over the whole validation split, and append one row per run to a table.

    PYTHONPATH=. python benchmarks/pareto/sweep.py              # 6 models x 3 seeds, ~35 min CPU
    PYTHONPATH=. python benchmarks/pareto/sweep.py --models=H32-MQA,H32-MQA-CLA2 --seeds=0 \
        --steps=100 --out=/tmp/pareto.csv
    PYTHONPATH=. python benchmarks/pareto/plot.py benchmarks/results/pareto_<date>_cpu.csv

The models are scaled-down twins of the paper's 1B design space (Table 1: d_model 2048, 16 x 128
query dims, 20 layers): d_model 128, 4 x 32 query dims, 6 layers (so CLA2 and CLA3 both divide
the depth), SwiGLU 352 (the paper's 2.67 x d_model), each twin changing only the head size,
head counts and grouping, as the paper's rows do. Runs already in the table are skipped, so an
interrupted sweep continues where it stopped; each run's workdir is kept under --workdir. SIGTERM
(a preemption) checkpoints the run in progress and ends the sweep with exit code 143 without
recording that run; the next invocation resumes it from its checkpoint.
"""
import csv
import datetime
import pathlib
import platform
import signal
import sys
import time

import jax
from absl import app, flags, logging

sys.path.insert(0, str(pathlib.Path(__file__).parents[2]))
from cla_jax import checkpoint  # noqa: E402
from cla_jax.config import ModelConfig, kv_bytes_per_token, num_params  # noqa: E402
from cla_jax.evaluation import evaluate_checkpoint  # noqa: E402
from cla_jax.train.loop import train_and_evaluate  # noqa: E402
from configs import default  # noqa: E402

SCALE = dict(d_model=128, num_layers=6, mlp_dim=352)
# name: (head_dim, query heads, KV heads, kv_sharing); "d" = 32 is the paper's H128.
MODELS = {
    "H32-MQA": (32, 4, 1, 1),        # the paper's H128-MQA
    "H16-MQA": (16, 8, 1, 1),        # H64-MQA: half the KV bytes by shrinking d_head
    "H32-MQA-CLA2": (32, 4, 1, 2),   # H128-MQA-CLA2: half the KV bytes by sharing
    "H64-MQA-CLA2": (64, 2, 1, 2),   # H256-MQA-CLA2: H32-MQA's bytes, spent on bigger heads
    "H32-GQA2": (32, 4, 2, 1),       # H128-GQA2: twice H32-MQA's bytes
    "H32-MQA-CLA3": (32, 4, 1, 3),   # H128-MQA-CLA3: a third of the bytes
}
EXIT_STOPPED = 128 + signal.SIGTERM  # what a shell reports for a process SIGTERM ended
COLUMNS = ("model", "seed", "cla", "kv_bytes_per_token", "params", "steps", "tokens_seen",
           "val_tokens", "val_ppl", "bits_per_byte", "train_s", "date", "device", "jax")

flags.DEFINE_list("models", list(MODELS), f"Models to train, from {list(MODELS)}.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (init and data order); every model gets each.")
flags.DEFINE_integer("steps", 400, "Training steps per run (batch x seq_len tokens each).")
flags.DEFINE_integer("batch_size", 8, "Batch size.")
flags.DEFINE_integer("seq_len", 128, "Sequence length.")
flags.DEFINE_float("learning_rate", 3e-3, "Peak learning rate (one for all models).")
flags.DEFINE_string("source", "shakespeare", "config.data.source: shakespeare, files:<glob>, ...")
flags.DEFINE_string("tokenizer", "bpe:4096", "config.data.tokenizer.")
flags.DEFINE_integer("vocab_size", 4096, "model.vocab_size (at least the tokenizer's).")
flags.DEFINE_string("workdir", "~/.cache/cla-jax/pareto", "Parent of the runs' workdirs.")
flags.DEFINE_string("cache_dir", "~/.cache/cla-jax", "Corpus and tokenizer cache.")
flags.DEFINE_string("out", None, "Results CSV (default: "
                    "benchmarks/results/pareto_<date>_<backend>.csv); existing rows are kept.")
FLAGS = flags.FLAGS


def run_config(name: str, seed: int):
    """The ml_collections config of one run: the demo config with the twin's model."""
    head_dim, heads, kv_heads, sharing = MODELS[name]
    config = default.get_config()
    config.model.update(SCALE, head_dim=head_dim, num_heads=heads, num_kv_heads=kv_heads,
                        kv_sharing=sharing, group_sizes="", vocab_size=FLAGS.vocab_size)
    config.train.update(seed=seed, steps=FLAGS.steps, batch_size=FLAGS.batch_size,
                        seq_len=FLAGS.seq_len, learning_rate=FLAGS.learning_rate,
                        log_every=max(FLAGS.steps // 4, 1), eval_every=FLAGS.steps,
                        eval_batches=1, checkpoint_every=FLAGS.steps, keep_checkpoints=1)
    config.data.update(source=FLAGS.source, tokenizer=FLAGS.tokenizer)
    return config


def done_runs(path: pathlib.Path) -> set[tuple[str, int]]:
    if not path.exists():
        return set()
    with open(path) as f:
        return {(row["model"], int(row["seed"])) for row in csv.DictReader(f)}


def main(argv):
    logging.set_verbosity(logging.WARNING)
    unknown = [m for m in FLAGS.models if m not in MODELS]
    if unknown:
        raise app.UsageError(f"--models: unknown {unknown}; choose from {list(MODELS)}")
    date, backend = datetime.date.today().isoformat(), jax.default_backend()
    out = pathlib.Path(FLAGS.out or pathlib.Path(__file__).parents[1] / "results" /
                       f"pareto_{date}_{backend}.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    done = done_runs(out)
    device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    runs = [(m, int(s)) for s in FLAGS.seeds for m in FLAGS.models]
    for i, (name, seed) in enumerate(runs):
        if (name, seed) in done:
            print(f"[{i + 1}/{len(runs)}] {name} seed {seed}: already in {out}, skipped")
            continue
        config = run_config(name, seed)
        model = ModelConfig.from_dict(config.model)
        workdir = pathlib.Path(FLAGS.workdir).expanduser() / f"{name}_s{seed}"
        print(f"[{i + 1}/{len(runs)}] {name} seed {seed}: {num_params(model):,} params, "
              f"{kv_bytes_per_token(model)} KV B/token, training in {workdir}", flush=True)
        start = time.perf_counter()
        train_and_evaluate(config, workdir, FLAGS.cache_dir)
        train_s = time.perf_counter() - start
        # After a SIGTERM, train_and_evaluate checkpoints and returns normally, short of the
        # last step: that run is not finished, and the signal asks the sweep to stop too.
        reached = max(checkpoint.good_steps(workdir / "checkpoints"), default=0)
        if reached < FLAGS.steps:
            print(f"    stopped at step {reached} of {FLAGS.steps}: not recorded; run the sweep "
                  "again to resume it", flush=True)
            raise SystemExit(EXIT_STOPPED)
        val = evaluate_checkpoint(workdir, FLAGS.cache_dir)
        row = dict(model=name, seed=seed, cla=int(len(model.groups) < model.num_layers),
                   kv_bytes_per_token=val["kv_bytes_per_token"], params=val["params"],
                   steps=val["step"], tokens_seen=val["step"] * FLAGS.batch_size * FLAGS.seq_len,
                   val_tokens=val["tokens"], val_ppl=round(val["perplexity"], 3),
                   bits_per_byte=round(val["bits_per_byte"], 4), train_s=round(train_s, 1),
                   date=date, device=device, jax=jax.__version__)
        new_file = not out.exists()
        with open(out, "a", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS)
            if new_file:
                writer.writeheader()
            writer.writerow(row)
        print(f"    val ppl {row['val_ppl']:.2f}, {row['bits_per_byte']:.4f} bits/byte "
              f"({train_s:.0f} s)", flush=True)
    from benchmarks.pareto.plot import read_table, summary_lines  # noqa: PLC0415
    print("\n".join(summary_lines(read_table(out))))
    print(f"results in {out} (python {platform.python_version()})")


if __name__ == "__main__":
    app.run(main)
