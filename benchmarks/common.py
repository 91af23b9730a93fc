"""What every benchmark shares: the environment record, median timing, config loading and the
results file (benchmarks/results/<benchmark>_<date>_<device>.json)."""
from __future__ import annotations

import datetime
import importlib.util
import json
import os
import pathlib
import platform
import re
import statistics
import time

import flax
import jax
import jaxlib

from cla_jax.config import ModelConfig

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"


def today() -> str:
    return datetime.datetime.now(datetime.timezone.utc).date().isoformat()


def environment() -> dict:
    """Device and versions (no host name)."""
    devices = jax.devices()
    return dict(backend=jax.default_backend(), device_kind=devices[0].device_kind,
                device_count=len(devices), cpu_count=os.cpu_count(),
                python=platform.python_version(), jax=jax.__version__,
                jaxlib=jaxlib.__version__, flax=flax.__version__,
                platform=f"{platform.system()} {platform.machine()}")


def report(benchmark: str, what: str, settings: dict, **results) -> dict:
    """The results file's layout: name, date, what is measured, where, with which settings."""
    return dict(benchmark=benchmark, date=today(), what=what, environment=environment(),
                settings=settings, **results)


def device_slug() -> str:
    kind = jax.devices()[0].device_kind
    return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-") or jax.default_backend()


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of `fn()` (results awaited) over `repeats` calls after one untimed
    call that compiles."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def model_from_config_file(path: str) -> ModelConfig:
    """The `model` of a configs/*.py file (its get_config())."""
    spec = importlib.util.spec_from_file_location("bench_config", path)
    if spec is None or not pathlib.Path(path).is_file():
        raise FileNotFoundError(f"config file {path!r} not found; pass e.g. "
                                "--config=configs/paper/1b_h128_mqa_cla2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return ModelConfig.from_dict(module.get_config().model)


def provenance(report: dict) -> str:
    """The line under a printed table: date, devices, jax version."""
    env = report["environment"]
    return f"{report['date']}, {env['device_count']} x {env['device_kind']}, jax {env['jax']}"


def publish(report: dict, table: str, out: str | None = None) -> None:
    """Writes the results file and prints the table and where the file went."""
    path = write_results(report, out)
    print(table)
    print(f"wrote {path}")


def write_results(report: dict, out: str | None = None) -> pathlib.Path:
    """Writes `report` (with its "benchmark" and "date") as JSON; returns the path."""
    path = pathlib.Path(out) if out else (
        RESULTS_DIR / f"{report['benchmark']}_{report['date']}_{device_slug()}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
