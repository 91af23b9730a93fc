"""The paper's Pareto claim at small scale: train a list of models on the same data, tokens and
seeds, evaluate each over the whole validation split, and append one row per run to a table.

    PYTHONPATH=. python benchmarks/pareto/sweep.py              # 6 models x 3 seeds, ~35 min CPU
    PYTHONPATH=. python benchmarks/pareto/sweep.py --models=H32-MQA,H32-MQA-CLA2 --seeds=0 \
        --steps=100 --out=/tmp/pareto.csv
    PYTHONPATH=. python benchmarks/pareto/plot.py benchmarks/results/pareto_<date>_cpu.csv
    # The KV-sharing family (issue 29) at a 2k context, a learning rate per design:
    PYTHONPATH=. python benchmarks/pareto/sweep.py --models=family --seq_len=512 \
        --batch_size=2 --kv_context=2048 --learning_rates=1e-3,3e-3,1e-2 \
        --out=benchmarks/results/pareto_family_<date>_cpu.csv

The models are scaled-down twins of the paper's 1B design space (Table 1: d_model 2048, 16 x 128
query dims, 20 layers): d_model 128, 4 x 32 query dims, 6 layers (so CLA2 and CLA3 both divide
the depth), SwiGLU 352 (the paper's 2.67 x d_model), each twin changing only the head size,
head counts and grouping, as the paper's rows do; the family's twins of H32-MQA change only
their KV map (last half reuses, 5:1 local:global with window 128, that with CLA2, and that
evaluated through an int8 cache: the same checkpoints). Runs already in the table are skipped, so an
interrupted sweep continues where it stopped; each run's workdir is kept under --workdir. SIGTERM
(a preemption) checkpoints the run in progress and ends the sweep with exit code 143 without
recording that run; the next invocation resumes it from its checkpoint.
"""
import csv
import datetime
import math
import pathlib
import platform
import signal
import sys
import time

import jax
from absl import app, flags, logging

sys.path.insert(0, str(pathlib.Path(__file__).parents[2]))
from cla_jax import checkpoint  # noqa: E402
from cla_jax.capacity import cache_bytes  # noqa: E402
from cla_jax.config import ModelConfig, num_params  # noqa: E402
from cla_jax.evaluation import evaluate_checkpoint  # noqa: E402
from cla_jax.train.loop import train_and_evaluate  # noqa: E402
from configs import default  # noqa: E402

SCALE = dict(d_model=128, num_layers=6, mlp_dim=352)
MQA = dict(head_dim=32, num_heads=4, num_kv_heads=1)  # the paper's H128-MQA, scaled down
# name: the twin's model fields; "d" = 32 is the paper's H128.
MODELS = {
    "H32-MQA": MQA,
    "H16-MQA": dict(head_dim=16, num_heads=8, num_kv_heads=1),  # H64-MQA: half the bytes
    "H32-MQA-CLA2": dict(MQA, kv_sharing=2),     # H128-MQA-CLA2: half the bytes by sharing
    "H64-MQA-CLA2": dict(head_dim=64, num_heads=2, num_kv_heads=1, kv_sharing=2),  # H256
    "H32-GQA2": dict(MQA, num_kv_heads=2),       # H128-GQA2: twice H32-MQA's bytes
    "H32-MQA-CLA3": dict(MQA, kv_sharing=3),     # H128-MQA-CLA3: a third of the bytes
    # The KV-sharing family (issue 29), each an H32-MQA twin changing only its KV map:
    "MQA-last-half": dict(MQA, kv_sources="last:3"),  # Gemma 3n / YOCO: 3 layers reuse 1
    "MQA-5:1-w128": dict(MQA, layer_types="5:1", local_window=128),  # Gemma / Character.AI
    "MQA-5:1-w128-CLA2": dict(MQA, layer_types="5:1", local_window=128, kv_sharing=2),
}
# name: (the trained model it evaluates, cache dtype): the same checkpoints, perplexity
# teacher-forced through a cache of that dtype (`benchmarks/int8_cache.py`'s cache path).
CACHE_EVALS = {"MQA-5:1-w128-CLA2-int8": ("MQA-5:1-w128-CLA2", "int8")}
FAMILY = ["H32-MQA", "H32-MQA-CLA2", "MQA-last-half", "MQA-5:1-w128", "MQA-5:1-w128-CLA2",
          "MQA-5:1-w128-CLA2-int8"]
EXIT_STOPPED = 128 + signal.SIGTERM  # what a shell reports for a process SIGTERM ended
COLUMNS = ("model", "seed", "cla", "kv_bytes_per_token", "params", "steps", "tokens_seen",
           "val_tokens", "val_ppl", "bits_per_byte", "train_s", "date", "device", "jax",
           "learning_rate", "seq_len", "kv_context")

flags.DEFINE_list("models", list(MODELS)[:6], "Models to train, from "
                  f"{list(MODELS) + list(CACHE_EVALS)}, or 'family' for {FAMILY}.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (init and data order); every model gets each.")
flags.DEFINE_integer("steps", 400, "Training steps per run (batch x seq_len tokens each).")
flags.DEFINE_integer("batch_size", 8, "Batch size.")
flags.DEFINE_integer("seq_len", 128, "Sequence length.")
flags.DEFINE_list("learning_rates", ["3e-3"], "Peak learning rate; several: a short run of "
                  "each (--lr_steps, seed 0) picks every model's own before its seeds run.")
flags.DEFINE_integer("lr_steps", 100, "Steps of each learning-rate trial.")
flags.DEFINE_integer("kv_context", None, "Context (tokens) the KV bytes per token are counted "
                     "at: local layers keep only their window (default: model.max_seq_len).")
flags.DEFINE_string("source", "shakespeare", "config.data.source: shakespeare, files:<glob>, ...")
flags.DEFINE_string("tokenizer", "bpe:4096", "config.data.tokenizer.")
flags.DEFINE_integer("vocab_size", 4096, "model.vocab_size (at least the tokenizer's).")
flags.DEFINE_string("workdir", "~/.cache/cla-jax/pareto", "Parent of the runs' workdirs.")
flags.DEFINE_string("cache_dir", "~/.cache/cla-jax", "Corpus and tokenizer cache.")
flags.DEFINE_string("out", None, "Results CSV (default: "
                    "benchmarks/results/pareto_<date>_<backend>.csv); existing rows are kept.")
FLAGS = flags.FLAGS


def run_config(name: str, seed: int, learning_rate: float, steps: int):
    """The ml_collections config of one run: the demo config with the twin's model."""
    config = default.get_config()
    config.model.update(SCALE, kv_sharing=1, group_sizes="", kv_sources="", layer_types="",
                        local_window=0, vocab_size=FLAGS.vocab_size,
                        max_seq_len=max(FLAGS.seq_len, FLAGS.kv_context or 0,
                                        config.model.max_seq_len))
    config.model.update(MODELS[name])
    config.train.update(seed=seed, steps=steps, batch_size=FLAGS.batch_size,
                        seq_len=FLAGS.seq_len, learning_rate=learning_rate,
                        log_every=max(steps // 4, 1), eval_every=steps,
                        eval_batches=1, checkpoint_every=steps, keep_checkpoints=1)
    config.data.update(source=FLAGS.source, tokenizer=FLAGS.tokenizer)
    return config


def kv_bytes(model: ModelConfig, cache_dtype: str = "bfloat16") -> float:
    """KV-cache bytes per token at --kv_context, from the cache's shapes (scales counted)."""
    context = FLAGS.kv_context or model.max_seq_len
    return cache_bytes(model.replace(max_seq_len=max(context, model.max_seq_len)), 1, context,
                       cache_dtype) / context


def cache_path_perplexity(workdir, cache_dtype: str) -> float:
    """Validation perplexity teacher-forced through a `cache_dtype` KV cache (every window
    prefilled into a fresh cache, logits read through it)."""
    from benchmarks.int8_cache import perplexities  # noqa: PLC0415
    from cla_jax.data.corpus import prepare_corpus  # noqa: PLC0415
    run = checkpoint.restore_model(workdir / "checkpoints", None, None)
    corpus = prepare_corpus(run.config.data, str(pathlib.Path(FLAGS.cache_dir).expanduser()),
                            max_vocab_size=run.model.vocab_size)
    ppl = perplexities(run.model, run.params, corpus.validation, run.config.train.seq_len,
                       run.config.train.batch_size, 64, False)
    return ppl[cache_dtype]["perplexity"]


def train_run(name: str, seed: int, learning_rate: float, steps: int, workdir):
    """Trains (or resumes) one run; exits the sweep if a SIGTERM stopped it short."""
    config = run_config(name, seed, learning_rate, steps)
    start = time.perf_counter()
    train_and_evaluate(config, workdir, FLAGS.cache_dir)
    train_s = time.perf_counter() - start
    # After a SIGTERM, train_and_evaluate checkpoints and returns normally, short of the
    # last step: that run is not finished, and the signal asks the sweep to stop too.
    reached = max(checkpoint.good_steps(workdir / "checkpoints"), default=0)
    if reached < steps:
        print(f"    stopped at step {reached} of {steps}: not recorded; run the sweep "
              "again to resume it", flush=True)
        raise SystemExit(EXIT_STOPPED)
    return train_s


def pick_learning_rates(models: list[str], root: pathlib.Path, out: pathlib.Path) -> dict:
    """Each trained model's learning rate: the only one given, or the best validation
    perplexity of a short seed-0 run at each (the trials go to <out>_lr.csv, resumable)."""
    rates = [float(r) for r in FLAGS.learning_rates]
    if len(rates) == 1:
        return {m: rates[0] for m in models}
    table = out.with_name(out.stem + "_lr.csv")
    done = {}
    if table.exists():
        with open(table) as f:
            done = {(r["model"], float(r["learning_rate"])): float(r["val_ppl"])
                    for r in csv.DictReader(f)}
    for name in models:
        for lr in rates:
            if (name, lr) in done:
                continue
            workdir = root / f"{name}_lr{lr:g}_{FLAGS.lr_steps}"
            print(f"[lr] {name} at {lr:g} for {FLAGS.lr_steps} steps", flush=True)
            train_run(name, 0, lr, FLAGS.lr_steps, workdir)
            done[name, lr] = evaluate_checkpoint(workdir, FLAGS.cache_dir)["perplexity"]
            new_file = not table.exists()
            with open(table, "a", newline="") as f:
                writer = csv.DictWriter(f, ("model", "learning_rate", "steps", "val_ppl"))
                if new_file:
                    writer.writeheader()
                writer.writerow(dict(model=name, learning_rate=lr, steps=FLAGS.lr_steps,
                                     val_ppl=round(done[name, lr], 3)))
            print(f"    val ppl {done[name, lr]:.2f}", flush=True)
    best = {m: min(rates, key=lambda lr, m=m: done[m, lr]) for m in models}
    print("learning rates: " + ", ".join(f"{m} {lr:g}" for m, lr in best.items()), flush=True)
    return best


def done_runs(path: pathlib.Path) -> set[tuple[str, int]]:
    if not path.exists():
        return set()
    with open(path) as f:
        return {(row["model"], int(row["seed"])) for row in csv.DictReader(f)}


def main(argv):
    logging.set_verbosity(logging.WARNING)
    names = FAMILY if FLAGS.models == ["family"] else FLAGS.models
    unknown = [m for m in names if m not in MODELS and m not in CACHE_EVALS]
    if unknown:
        raise app.UsageError(f"--models: unknown {unknown}; choose from "
                             f"{list(MODELS) + list(CACHE_EVALS)} or 'family'")
    date, backend = datetime.date.today().isoformat(), jax.default_backend()
    out = pathlib.Path(FLAGS.out or pathlib.Path(__file__).parents[1] / "results" /
                       f"pareto_{date}_{backend}.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    root = pathlib.Path(FLAGS.workdir).expanduser()
    trained = list(dict.fromkeys(CACHE_EVALS[m][0] if m in CACHE_EVALS else m for m in names))
    rates = pick_learning_rates(trained, root, out)
    done = done_runs(out)
    device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    runs = [(m, int(s)) for s in FLAGS.seeds for m in names]
    for i, (name, seed) in enumerate(runs):
        if (name, seed) in done:
            print(f"[{i + 1}/{len(runs)}] {name} seed {seed}: already in {out}, skipped")
            continue
        base, cache_dtype = CACHE_EVALS.get(name, (name, "bfloat16"))
        lr = rates[base]
        model = ModelConfig.from_dict(run_config(base, seed, lr, FLAGS.steps).model)
        workdir = root / (f"{base}_s{seed}" if len(FLAGS.learning_rates) == 1
                          else f"{base}_lr{lr:g}_s{seed}")
        print(f"[{i + 1}/{len(runs)}] {name} seed {seed}: {num_params(model):,} params, "
              f"{kv_bytes(model, cache_dtype):g} KV B/token ({cache_dtype}), lr {lr:g}, "
              f"in {workdir}", flush=True)
        train_s = 0.0
        if not (workdir / "checkpoints").exists() or \
                max(checkpoint.good_steps(workdir / "checkpoints"), default=0) < FLAGS.steps:
            train_s = train_run(base, seed, lr, FLAGS.steps, workdir)
        val = evaluate_checkpoint(workdir, FLAGS.cache_dir)
        ppl = val["perplexity"]
        if name in CACHE_EVALS:
            ppl = cache_path_perplexity(workdir, cache_dtype)
        per_token = kv_bytes(model, cache_dtype)
        row = dict(model=name, seed=seed, cla=int(len(model.groups) < model.num_layers),
                   kv_bytes_per_token=int(per_token) if per_token == int(per_token)
                   else round(per_token, 2),
                   params=val["params"], steps=val["step"],
                   tokens_seen=val["step"] * FLAGS.batch_size * FLAGS.seq_len,
                   val_tokens=val["tokens"], val_ppl=round(ppl, 3),
                   bits_per_byte=round(val["bits_per_byte"] * math.log(ppl)
                                       / math.log(val["perplexity"]), 4),
                   train_s=round(train_s, 1), date=date, device=device, jax=jax.__version__,
                   learning_rate=lr, seq_len=FLAGS.seq_len,
                   kv_context=FLAGS.kv_context or model.max_seq_len)
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
