"""Data at scale (issue 13): token-store preparation throughput, memory, start-up and loading.

For each corpus size (synthetic Shakespeare recombined by benchmarks/synthetic_corpus.py,
jsonl.zst as FineWeb ships) it measures, each phase in its own process so that time and peak memory are
the phase's alone (peak RSS = the largest sum over the process and its children, sampled):

  tokenizer   training the BPE on its bounded sample (data.tokenizer_sample_bytes)
  prepare_w1  building the store with 1 worker process   } text MB/s, peak RSS
  prepare_w2  building it with 2 worker processes        }
  two_hosts   two processes each building their share (as two hosts would), then compared
              file by file with the one-process store (first size only)
  first_step  train.py on the prepared store: process start to the first logged step
  loader      packed batches per second from the store, no model (seq 2048 x batch 64)

    PYTHONPATH=. python benchmarks/data_pipeline.py                    # 0.5 and 2 GB, ~40 min
    PYTHONPATH=. python benchmarks/data_pipeline.py --sizes=50M --work_dir=/tmp/dp
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import environment, today, write_results  # noqa: E402
from benchmarks.synthetic_corpus import parse_size, write_corpus  # noqa: E402


def _tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (Linux /proc)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            status = pathlib.Path(f"/proc/{p}/status").read_text()
            total += int(next(line.split()[1] for line in status.splitlines()
                              if line.startswith("VmRSS:"))) * 1024
            for task in pathlib.Path(f"/proc/{p}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
    return total


def run_phase(code: str, until: callable | None = None, timeout: float = 7200) -> dict:
    """Runs python `code` in a fresh process; returns seconds (to exit, or to `until()` being
    true), peak tree RSS and the last printed line."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, seconds = 0, None
    while process.poll() is None:
        peak = max(peak, _tree_rss(process.pid))
        if until is not None and seconds is None and until():
            seconds = time.perf_counter() - start
            process.terminate()
        if time.perf_counter() - start > timeout:
            process.kill()
        time.sleep(0.1)
    out, err = process.communicate()
    if process.returncode not in (0, -15) or (until is not None and seconds is None):
        raise RuntimeError(f"phase failed ({process.returncode}): {err[-3000:]}")
    return {"seconds": seconds or time.perf_counter() - start, "peak_rss_mib": peak / 2**20,
            "output": (out.strip().splitlines() or [""])[-1]}


def data_config(corpus_glob: str, data_dir: pathlib.Path, tokenizer: str, workers: int) -> dict:
    return dict(source=f"files:{corpus_glob}", tokenizer=tokenizer, data_dir=str(data_dir),
                name="synthetic", prepare_workers=workers)


PREPARE = """
import json, ml_collections
from cla_jax.data import corpus
c = corpus.prepare_corpus(ml_collections.ConfigDict({data!r}), {cache!r})
print(json.dumps({{"train_tokens": len(c.train), "validation_tokens": len(c.validation),
                  "directory": str(c.store.directory), "tokenizer": c.tokenizer.identity}}))
"""

TOKENIZER = """
import json, ml_collections
from cla_jax.data import corpus
from cla_jax.data.sources import training_sample
t = corpus.corpus_tokenizer(ml_collections.ConfigDict({data!r}), {cache!r})
print(json.dumps({{"identity": t.identity}}))
"""

HOST = """
import json, pathlib, time, ml_collections
from cla_jax.data import corpus, sources, store
data = ml_collections.ConfigDict({data!r})
s = corpus.settings(data)
plan = corpus._plan(s, {cache!r})
tok = corpus.corpus_tokenizer(data, {cache!r}, plan)
barrier_dir = pathlib.Path({barrier!r})
def barrier():
    (barrier_dir / "host{index}").touch()
    while len(list(barrier_dir.glob("host*"))) < 2:
        time.sleep(0.2)
store.build_store({directory!r}, plan, tok, workers=1, process_index={index}, process_count=2,
                  barrier=barrier, read_kwargs=corpus._read_kwargs(s, {cache!r}), progress=False)
"""

LOADER = """
import json, time, ml_collections
from cla_jax.data import corpus, pipeline
c = corpus.prepare_corpus(ml_collections.ConfigDict({data!r}), {cache!r})
it = pipeline.train_batches(c.train, 2048, 64, seed=0)
next(it)
start, n = time.perf_counter(), 40
for _ in range(n):
    next(it)
seconds = time.perf_counter() - start
print(json.dumps({{"tokens_per_s": n * 64 * 2048 / seconds, "batches": n}}))
"""


def file_digests(directory: str) -> dict[str, str]:
    root = pathlib.Path(directory)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def first_step(corpus_glob: str, data_dir: pathlib.Path, tokenizer: str, work: pathlib.Path):
    workdir = work / "train"
    shutil.rmtree(workdir, ignore_errors=True)
    overrides = [f"--config.data.{k}={v}" for k, v in
                 data_config(corpus_glob, data_dir, tokenizer, 0).items()]
    code = ("import sys; sys.argv = ['train.py', '--config=configs/default.py', "
            f"'--workdir={workdir}', '--cache_dir={work / 'cache'}', "
            "'--config.train.steps=30', '--config.train.log_every=1', " +
            ", ".join(repr(o) for o in overrides) +
            "]; import runpy; runpy.run_path('train.py', run_name='__main__')")
    metrics = workdir / "metrics.jsonl"
    return run_phase(code, until=lambda: metrics.exists() and metrics.stat().st_size > 0)


def measure_size(size: int, work: pathlib.Path, files: int, two_hosts: bool) -> dict:
    corpus_dir = work / f"corpus_{size}"
    if not corpus_dir.exists():
        write_corpus(corpus_dir, size, "jsonl.zst", files, seed=0)
    corpus_glob, cache = str(corpus_dir / "*.jsonl.zst"), str(work / "cache")
    result = {"text_bytes": size, "files": files, "format": "jsonl.zst"}
    bpe_dir = work / f"data_{size}_bpe"
    result["tokenizer"] = run_phase(TOKENIZER.format(
        data=data_config(corpus_glob, bpe_dir, "bpe:4096", 0), cache=cache))
    model = next((bpe_dir / "tokenizers").rglob("bpe4096.model"))
    for workers in (1, 2):
        data_dir = work / f"data_{size}_w{workers}"
        shutil.rmtree(data_dir, ignore_errors=True)
        phase = run_phase(PREPARE.format(data=data_config(corpus_glob, data_dir, str(model),
                                                          workers), cache=cache))
        phase.update(json.loads(phase.pop("output")), text_mb_per_s=size / 1e6 / phase["seconds"])
        result[f"prepare_w{workers}"] = phase
    result["w2_over_w1_time"] = (result["prepare_w2"]["seconds"]
                                 / result["prepare_w1"]["seconds"])
    one = result["prepare_w1"]["directory"]
    if two_hosts:
        directory = work / f"two_hosts_{size}" / pathlib.Path(one).name
        barrier = work / f"barrier_{size}"
        for path in (directory.parent, barrier):
            shutil.rmtree(path, ignore_errors=True)
        barrier.mkdir(parents=True)
        data = data_config(corpus_glob, work / f"data_{size}_w1", str(model), 1)
        start = time.perf_counter()
        hosts = [subprocess.Popen([sys.executable, "-c", HOST.format(
            data=data, cache=cache, barrier=str(barrier), index=i, directory=str(directory))],
            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT))) for i in range(2)]
        codes = [h.wait() for h in hosts]
        result["two_hosts"] = {"seconds": time.perf_counter() - start, "exit_codes": codes,
                               "identical_to_one_process":
                                   file_digests(one) == file_digests(str(directory))}
    warm = work / f"data_{size}_w1"
    result["first_step"] = first_step(corpus_glob, warm, str(model), work)
    phase = run_phase(LOADER.format(data=data_config(corpus_glob, warm, str(model), 0),
                                    cache=cache))
    phase.update(json.loads(phase.pop("output")))
    result["loader"] = phase
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="500M,2G")
    parser.add_argument("--work_dir", default="/tmp/cla_jax_data_pipeline")
    parser.add_argument("--mb_per_file", type=int, default=32)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    work = pathlib.Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "data_pipeline", "date": today(), "environment": environment(),
              "sizes": {}}
    for i, text in enumerate(args.sizes.split(",")):
        size = parse_size(text)
        files = max(2, size // (args.mb_per_file * 10**6))
        report["sizes"][text] = measure_size(size, work, files, two_hosts=i == 0)
        path = write_results(report, args.out)  # after each size: a partial run keeps its data
    rows = [f"{'size':>6} {'tok train s':>11} {'w1 MB/s':>8} {'w2 MB/s':>8} {'w2/w1':>6} "
            f"{'prep RSS MiB':>12} {'1st step s':>10} {'train RSS':>9} {'loader tok/s':>12}"]
    for text, r in report["sizes"].items():
        rows.append(f"{text:>6} {r['tokenizer']['seconds']:11.1f} "
                    f"{r['prepare_w1']['text_mb_per_s']:8.1f} "
                    f"{r['prepare_w2']['text_mb_per_s']:8.1f} {r['w2_over_w1_time']:6.2f} "
                    f"{max(r[f'prepare_w{w}']['peak_rss_mib'] for w in (1, 2)):12.0f} "
                    f"{r['first_step']['seconds']:10.1f} {r['first_step']['peak_rss_mib']:9.0f} "
                    f"{r['loader']['tokens_per_s']:12.3g}")
    print("\n".join(rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
