"""Training metrics: peak FLOP/s for MFU, and one writer for stdout, JSONL and TensorBoard."""
from __future__ import annotations

import json

import jax
from etils import epath

from cla_jax.storage import is_remote

# Dense bf16 peak FLOP/s per device, by jax's device_kind; MFU is reported where known.
PEAK_FLOPS = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
              "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12,
              "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
              "TPU v6 lite": 918e12}


def peak_flops(num_devices: int | None = None) -> float | None:
    """Peak FLOP/s of `num_devices` (default: all) devices like the first, if known."""
    kind = jax.devices()[0].device_kind
    per_device = next((v for k, v in PEAK_FLOPS.items() if kind.startswith(k)), None)
    return per_device * (num_devices or jax.device_count()) if per_device else None


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl line (a torn last line counts as after every step)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


class MetricsWriter:
    """Appends one JSON line per record to <workdir>/metrics.jsonl and mirrors scalars to
    TensorBoard (<workdir>/tensorboard); only process 0 writes.

    A run resumed from step N drops the records after N that the interrupted run wrote (they
    are written again), and TensorBoard purges its events after N the same way, so every step
    appears once. Cloud storage objects cannot be appended to: there the file is rewritten
    whole at each write (one line per log interval keeps it small).
    """

    def __init__(self, workdir: epath.Path, resumed_step: int | None = None):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        self._path = workdir / "metrics.jsonl"
        kept = self._path.read_text() if self._path.exists() else ""
        if resumed_step is not None:
            kept = "".join(line for line in kept.splitlines(keepends=True)
                           if _step_of(line) <= resumed_step)
            temporary = workdir / "metrics.jsonl.tmp"
            temporary.write_text(kept)
            temporary.replace(self._path)
        if is_remote(workdir):
            self._jsonl, self._text = None, kept
        else:
            self._jsonl = self._path.open("a", encoding="utf-8")
        try:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=(
                None if resumed_step is None else resumed_step + 1))
        except ImportError:  # TensorBoard is optional; the JSONL file has everything.
            self._tb = None

    def write(self, step: int, kind: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        line = json.dumps({"step": step, "kind": kind, **values}) + "\n"
        if self._jsonl is None:
            self._text += line
            self._path.write_text(self._text)
        else:
            self._jsonl.write(line)
            self._jsonl.flush()
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        if self.enabled:
            if self._jsonl is not None:
                self._jsonl.close()
            if self._tb is not None:
                self._tb.close()
