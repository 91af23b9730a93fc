"""How much the demo's headline numbers move from run to run: `make demo`'s training and
evaluation repeated over seeds (and a seed repeated, to see whether one machine reproduces
itself), with the lm-eval cloze task of the README on each.

    PYTHONPATH=. python benchmarks/demo_spread.py --seeds=0,0,1,2    # ~5 min a run, 2 CPUs

Each run trains configs/default.py from scratch in its own workdir under --root (the token
store in --cache_dir is shared, so the tokenizer is the same file for every run), then runs
eval.py (windows protocol, whole validation split) and lm-eval's shakespeare_mc task.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import provenance, publish, report  # noqa: E402


def _run(*args: str) -> None:
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def one_run(seed: int, workdir: pathlib.Path, cache_dir: str) -> dict:
    start = time.perf_counter()
    _run("train.py", "--config=configs/default.py", f"--workdir={workdir}",
         f"--cache_dir={cache_dir}", f"--config.train.seed={seed}")
    train_s = time.perf_counter() - start
    _run("eval.py", f"--workdir={workdir}", f"--cache_dir={cache_dir}")
    result = json.loads(max(workdir.glob("eval_validation_*.json")).read_text())
    _run("-m", "cla_jax.lm_eval", "--model", "cla_jax", "--model_args",
         f"workdir={workdir},batch_size=32", "--include_path", "tests/fixtures/lm_eval",
         "--tasks", "shakespeare_mc", "--output_path", str(workdir / "lm_eval"))
    lm_eval = json.loads(next((workdir / "lm_eval").rglob("results*.json")).read_text())
    mc = lm_eval["results"]["shakespeare_mc"]
    return dict(seed=seed, train_seconds=round(train_s, 1), perplexity=result["perplexity"],
                bits_per_byte=result["bits_per_byte"], mc_acc=mc["acc,none"],
                mc_acc_norm=mc["acc_norm,none"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,0,1,2", help="one run per entry; repeat a seed "
                        "to see whether a machine reproduces its own run")
    parser.add_argument("--root", default="runs/demo_spread")
    parser.add_argument("--cache_dir", default="~/.cache/cla-jax")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    runs = []
    for index, seed in enumerate(int(s) for s in args.seeds.split(",")):
        runs.append(one_run(seed, ROOT / args.root / f"run{index}_seed{seed}", args.cache_dir))
        print(runs[-1], flush=True)
    ppl = [r["perplexity"] for r in runs]
    summary = dict(perplexity_min=min(ppl), perplexity_max=max(ppl),
                   perplexity_mean=statistics.mean(ppl),
                   perplexity_stdev=statistics.stdev(ppl) if len(ppl) > 1 else 0.0)
    result = report("demo_spread", "make demo's validation perplexity (whole split, windows) "
                    "and lm-eval shakespeare_mc acc over repeated runs", vars(args),
                    runs=runs, summary=summary)
    table = "\n".join(f"seed {r['seed']}: ppl {r['perplexity']:.2f}, bits/byte "
                      f"{r['bits_per_byte']:.4f}, mc acc {r['mc_acc']:.3f}, train "
                      f"{r['train_seconds']:.0f} s" for r in runs)
    publish(result, f"{table}\n{summary}\n{provenance(result)}", args.out)


if __name__ == "__main__":
    main()
