"""benchmarks/device_check.py end to end on the CPU, at its tiny shapes, with
tensorflow-datasets, grain and ml_collections unimportable (as on the bare GPU machine), so
the check cannot rot while no GPU is lent; and its restated paper model against the config
file."""
import json
import math
import os
import pathlib
import subprocess
import sys

from benchmarks import common, device_check

ROOT = pathlib.Path(__file__).resolve().parents[1]
SECTIONS = ("kernels", "decode_equals_forward", "train_step", "decode_roofline",
            "cla2_vs_cla1_decode")  # as the issue lists them
# Runs a script with the three packages blocked: any import of them, direct or deep in a
# dependency, raises ModuleNotFoundError.
BLOCKED_RUN = """
import runpy, sys
BLOCKED = ("tensorflow_datasets", "grain", "ml_collections")

class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"{name} is blocked: the GPU machine has none", name=name)

for name in list(sys.modules):
    if name.split(".")[0] in BLOCKED:
        del sys.modules[name]
sys.meta_path.insert(0, Blocked())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_paper_model_is_the_config_files():
    want = common.model_from_config_file(str(ROOT / "configs/paper/1b_h128_mqa_cla2.py"))
    assert device_check.paper_model({}) == want


def test_device_check_runs_on_cpu_without_tfds_grain_or_ml_collections(tmp_path):
    out = tmp_path / "device_check.json"
    run = subprocess.run(
        [sys.executable, "-c", BLOCKED_RUN, str(ROOT / "benchmarks/device_check.py"),
         "--platform=cpu", "--small", f"--out={out}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    report = json.loads(out.read_text())
    sections = report["sections"]
    assert tuple(sections) == SECTIONS
    assert report["summary"] == {name: "ok" for name in SECTIONS}, {
        name: {k: v for k, v in s.items() if k in ("status", "error", "reason", "traceback")}
        for name, s in sections.items()}
    assert report["environment"]["backend"] == "cpu" and report["settings"]["small"]

    kernels = sections["kernels"]
    ran = {case["kind"] for case in kernels["cases"] if case["status"] == "ok"}
    assert ran == set(kernels["kinds"]) - {"cudnn"} and {"xla", "reference"} <= ran
    for case in kernels["cases"]:
        if case["kind"] == "cudnn":
            assert case["status"] == "skipped" and "compiled for gpu" in case["reason"]
            continue
        assert case["fwd_bwd_seconds"] > 0
        errors, tolerance = case["errors"], kernels["tolerance"]
        assert 0 < errors["output"] <= tolerance["output"], case
        assert max(errors[g] for g in ("d_q", "d_k", "d_v")) <= tolerance["gradients"], case

    for run_ in sections["decode_equals_forward"]["runs"].values():
        assert run_["relative_error"] <= run_["tolerance"] and run_["greedy_agreement"] > 0.9

    train = sections["train_step"]
    assert train["tokens_per_s"] > 0 and train["remat"] == "none"
    assert train["mfu"] is None and "no peak FLOP/s" in train["mfu_reason"]
    # Random init: the first losses are close to a uniform guess over the vocabulary.
    assert abs(train["loss"] - math.log(train["model"]["vocab_size"])) < 0.5

    decode = sections["decode_roofline"]
    per_sequence = decode["kv_bytes_per_token"] * decode["context"]
    assert decode["batch"] == decode["budget_bytes"] // per_sequence
    assert decode["cache_bytes"] == decode["batch"] * per_sequence <= decode["budget_bytes"]
    assert decode["bytes_read_per_step"] == decode["cache_bytes"] + decode["param_bytes"]
    assert decode["step_s"] > 0 and decode["roofline_fraction"] is None
    assert "no HBM bandwidth" in decode["roofline_reason"]

    cla = sections["cla2_vs_cla1_decode"]
    assert cla["cla2_over_cla1_batch"] == 2.0  # half the KV bytes per token
    assert cla["runs"]["cla2"]["batch"] == decode["batch"]
    assert all(r["tokens_per_s"] > 0 for r in cla["runs"].values())


def test_make_device_check_uses_the_venv_when_there_is_one(tmp_path):
    """`make demo` / `make test` build .venv; `make device-check` on the same machine must use
    it (it once ran python3, which has no jax there), and python3 where there is no venv."""
    (tmp_path / "Makefile").write_text((ROOT / "Makefile").read_text())

    def command() -> str:
        env = {k: v for k, v in os.environ.items()  # as typed: not inside `make test`'s make
               if k not in ("PYTHON", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
        result = subprocess.run(["make", "-n", "device-check"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, check=True)
        return result.stdout.strip()

    assert command() == "python3 benchmarks/device_check.py"
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "python").touch()
    assert command() == ".venv/bin/python benchmarks/device_check.py"
