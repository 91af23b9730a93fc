"""Multi-host for real: two processes on 127.0.0.1 (4 CPU devices each, gloo collectives)
train with train.py through jax.distributed; one process then restores the checkpoint onto
another mesh with eval.py and must get the loss the two processes measured."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import ml_collections
import pytest
from test_train import ROOT, losses, tiny_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(devices: int) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def write_config(config: ml_collections.ConfigDict, path) -> str:
    path.write_text("import json\nimport ml_collections\n\n\ndef get_config():\n"
                    f"    return ml_collections.ConfigDict(json.loads({config.to_json()!r}))\n")
    return str(path)


def start_two_trainers(config, tmp_path, workdir, cache):
    config_file = write_config(config, tmp_path / "tiny.py")
    coordinator = f"127.0.0.1:{free_port()}"
    return [subprocess.Popen(
        [sys.executable, "train.py", f"--config={config_file}", f"--workdir={workdir}",
         f"--cache_dir={cache}", f"--coordinator_address={coordinator}", "--num_processes=2",
         f"--process_id={i}"], cwd=ROOT, env=cpu_env(4), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for i in range(2)]


def test_two_processes_train_then_one_process_evaluates_the_checkpoint(tmp_path, corpus_glob):
    # eval_batches=0: the training run's eval covers the whole split, as eval.py does.
    config = tiny_config(corpus_glob, steps=4, eval_every=4, checkpoint_every=2,
                         eval_batches=0)
    # The global mesh (2, 4, 1): data parallel across the processes (the DCN axis), FSDP over
    # each process's 4 devices. The corpus is not prepared yet: process 0 builds it first.
    config.mesh.update(data=1, fsdp=-1, tensor=1, dcn_data=2)
    workdir, cache = tmp_path / "run", tmp_path / "cache"
    processes = start_two_trainers(config, tmp_path, workdir, cache)
    outputs = [p.communicate(timeout=400) for p in processes]
    for p, (out, err) in zip(processes, outputs):
        assert p.returncode == 0, err[-3000:]
    # Only process 0 prints: the final line and the validation line of step 4 alike.
    for line in ("final validation", "step 4: train loss"):
        assert line in outputs[0][0] and line not in outputs[1][0] + outputs[1][1]
    assert "mesh data=2 x fsdp=4 x tensor=1 (8 devices, 2 processes)" in outputs[0][1] + \
        outputs[0][0]

    # Written once, by process 0: one train record per step, one eval record.
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert losses(workdir)[4] < losses(workdir)[1]
    (two_process_eval,) = [r for r in records if r["kind"] == "eval"]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]

    # One process, 4 devices as data=2 x tensor=2: a mesh the checkpoint never saw.
    result = subprocess.run(
        [sys.executable, "eval.py", f"--workdir={workdir}", f"--cache_dir={cache}",
         "--mesh=data=2,tensor=2", f"--output={tmp_path / 'eval.json'}"],
        cwd=ROOT, env=cpu_env(4), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    single = json.loads((tmp_path / "eval.json").read_text())
    assert single["step"] == 4 and single["mesh"] == {"data": 2, "fsdp": 1, "tensor": 2}
    assert single["tokens"] == two_process_eval["tokens"]
    assert single["mean_nll"] == pytest.approx(two_process_eval["mean_nll"], rel=1e-5)


def test_sigterm_to_one_process_stops_both_at_one_checkpointed_step(tmp_path, corpus_glob):
    config = tiny_config(corpus_glob, steps=100_000, checkpoint_every=100_000,
                         eval_every=100_000, log_every=5)
    config.mesh.update(data=1, fsdp=-1, tensor=1, dcn_data=2)
    workdir = tmp_path / "run"
    processes = start_two_trainers(config, tmp_path, workdir, tmp_path / "cache")
    metrics, deadline = workdir / "metrics.jsonl", time.time() + 300
    while not (metrics.exists() and metrics.read_text()) and time.time() < deadline:
        time.sleep(0.2)
    processes[1].send_signal(signal.SIGTERM)  # as a scheduler preempting one host would
    outputs = [p.communicate(timeout=300) for p in processes]
    for p, (out, err) in zip(processes, outputs):
        assert p.returncode == 0, err[-3000:]
    # One committed step: an orbax save needs every process, so both stopped at that step (a
    # process left training would wait on its collectives until the timeout above).
    steps = [int(d.name) for d in (workdir / "checkpoints").iterdir()]
    assert len(steps) == 1 and 5 <= steps[0] < 100_000
