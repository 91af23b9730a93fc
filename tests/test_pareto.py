"""The Pareto sweep driver and plot: the frontier against a brute-force definition, a tiny sweep
end to end (table rows, KV bytes by hand, resume skips finished runs), a sweep stopped by
SIGTERM, and the PNG."""
import csv
import os
import signal
import subprocess
import sys
import time

import numpy as np

from benchmarks.pareto import plot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def brute_force_frontier(points):
    """Points that no other point weakly dominates (<= on both, < on one, or an earlier
    identical point)."""
    names = list(points)
    keep = []
    for i, a in enumerate(names):
        (ax, ay) = points[a]
        dominated = any(
            (bx <= ax and by <= ay and (bx < ax or by < ay)) or ((bx, by) == (ax, ay) and j < i)
            for j, b in enumerate(names) if b != a for (bx, by) in [points[b]])
        if not dominated:
            keep.append(a)
    return sorted(keep, key=lambda n: points[n])


def test_frontier_matches_the_definition():
    rng = np.random.RandomState(0)
    for trial in range(200):
        n = rng.randint(1, 9)
        xs = rng.choice([256, 384, 768, 1536], n)  # ties on x, as in a real sweep
        ys = rng.choice([10.0, 11.0, 12.5, 13.0, 14.0], n)  # and on y
        points = {f"m{i}": (int(x), float(y)) for i, (x, y) in enumerate(zip(xs, ys))}
        assert plot.pareto_frontier(points) == brute_force_frontier(points), points


def sweep(tmp_path, corpus_glob, *extra):
    command = [sys.executable, "benchmarks/pareto/sweep.py", "--models=H32-MQA,H32-MQA-CLA3",
               "--seeds=0,1", "--steps=3", "--batch_size=2", "--seq_len=32",
               f"--source={corpus_glob}", "--tokenizer=byte", "--vocab_size=259",
               f"--workdir={tmp_path / 'runs'}", f"--cache_dir={tmp_path / 'cache'}",
               f"--out={tmp_path / 'table.csv'}", *extra]
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_a_tiny_sweep_writes_the_table_resumes_and_plots(tmp_path, corpus_glob):
    out = sweep(tmp_path, corpus_glob)
    with open(tmp_path / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["model"], r["seed"]) for r in rows) == [
        ("H32-MQA", "0"), ("H32-MQA", "1"), ("H32-MQA-CLA3", "0"), ("H32-MQA-CLA3", "1")]
    for r in rows:
        sharing = 3 if r["model"].endswith("CLA3") else 1
        # K and V, 6 layers / sharing producers, 1 KV head of 32, 2 bytes each.
        assert int(r["kv_bytes_per_token"]) == 2 * (6 // sharing) * 1 * 32 * 2
        assert r["cla"] == str(int(sharing > 1))
        assert int(r["steps"]) == 3 and int(r["tokens_seen"]) == 3 * 2 * 32
        assert 1 < float(r["val_ppl"]) < 259 * 2 and int(r["val_tokens"]) > 0
    # Seeds change the run; the same seed on another model does not share its result.
    ppl = {(r["model"], r["seed"]): float(r["val_ppl"]) for r in rows}
    assert ppl["H32-MQA", "0"] != ppl["H32-MQA", "1"]
    assert "frontier" in out
    # A second invocation finds every run in the table and trains nothing.
    again = sweep(tmp_path, corpus_glob)
    assert again.count("skipped") == 4
    with open(tmp_path / "table.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    png = tmp_path / "pareto.png"
    plot.main([str(tmp_path / "table.csv"), f"--out={png}"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    models = plot.read_table(tmp_path / "table.csv")
    assert np.isclose(models["H32-MQA"]["mean"], (ppl["H32-MQA", "0"] + ppl["H32-MQA", "1"]) / 2)


def test_sigterm_stops_the_sweep_without_recording_the_run_and_a_rerun_resumes_it(
        tmp_path, corpus_glob):
    # Far more steps than the test waits for: only the signal can end the first run in time.
    command = [sys.executable, "benchmarks/pareto/sweep.py", "--models=H32-MQA,H32-MQA-CLA3",
               "--seeds=0", "--steps=1000000", "--batch_size=2", "--seq_len=32",
               f"--source={corpus_glob}", "--tokenizer=byte", "--vocab_size=259",
               f"--workdir={tmp_path / 'runs'}", f"--cache_dir={tmp_path / 'cache'}",
               f"--out={tmp_path / 'table.csv'}"]
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="")
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    with open(stdout, "w") as out, open(stderr, "w") as err:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err)
        try:
            # The progress bar appears once the loop's SIGTERM handler is in place.
            deadline = time.monotonic() + 300
            while "train:" not in stderr.read_text() and process.poll() is None:
                assert time.monotonic() < deadline, stderr.read_text()[-3000:]
                time.sleep(0.2)
            process.send_signal(signal.SIGTERM)
            returncode = process.wait(timeout=120)
        finally:
            process.kill()
    assert returncode == 128 + signal.SIGTERM, stderr.read_text()[-3000:]
    printed = stdout.read_text()
    assert "stopped at step" in printed and "[2/2]" not in printed, printed
    assert not (tmp_path / "table.csv").exists()
    steps = [int(p.name) for p in (tmp_path / "runs" / "H32-MQA_s0" / "checkpoints").iterdir()
             if p.name.isdigit()]
    assert len(steps) == 1 and 1 <= steps[0] < 1000000
    # A rerun (of this model, to a step count within reach) continues the stopped run.
    stopped_at = steps[0]
    rerun = subprocess.run(command + ["--models=H32-MQA", f"--steps={stopped_at + 2}"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from step {stopped_at}" in rerun.stdout + rerun.stderr
    with open(tmp_path / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["seed"], int(r["steps"])) for r in rows] == [
        ("H32-MQA", "0", stopped_at + 2)]
