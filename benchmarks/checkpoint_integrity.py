"""What checkpoint checksums cost: save and restore time with and without them.

Answers: how much does computing the array checksums (cla_jax.checksum, one jitted call on
device) add to a save, and verifying them to a restore, for the demo model's train state
(configs/default.py) and a 1B model (configs/paper/1b_h128_mqa_cla2.py)?

- "save" is `checkpoint.Checkpointer.save` + waiting for the write (checksums first, then
  orbax); "save, no checksums" is the same orbax save of the same items without them.
- "restore" is `checkpoint.restore_state` / the params restore (read + verify); "restore, no
  verification" is the same orbax read without the checksum pass.
- "checksum" alone is `checksum.tree_checksums` over the same arrays.
The 1B train state in float32 (params + two Adam moments, ~12.6 GB) does not fit next to its
save and restore copies in this machine's memory, so for 1B only the params (4.2 GB) are
saved and restored; the full state's figures are extrapolated x3 (every cost here is linear
in bytes) and marked as such.

    PYTHONPATH=. python benchmarks/checkpoint_integrity.py               # ~5 min on 2 CPU cores
    PYTHONPATH=. python benchmarks/checkpoint_integrity.py --skip_1b     # the demo model only
"""
from __future__ import annotations

import argparse
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from flax import linen as nn

sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))
from benchmarks.common import model_from_config_file, provenance, publish, report  # noqa: E402
from cla_jax import checkpoint, sharding  # noqa: E402
from cla_jax.checksum import tree_checksums  # noqa: E402
from cla_jax.config import num_params  # noqa: E402
from cla_jax.model import init_params  # noqa: E402
from cla_jax.train.optimizer import make_optimizer  # noqa: E402
from cla_jax.train.state import abstract_state, init_state  # noqa: E402

GB = 1e9
OPTIMIZER = ml_collections.ConfigDict(dict(
    learning_rate=1e-3, steps=1000, warmup_fraction=0.05, final_lr_fraction=0.1, b1=0.9,
    b2=0.95, weight_decay=0.1, grad_clip=1.0))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median) per figure")
    p.add_argument("--skip_1b", action="store_true", help="only the demo model")
    p.add_argument("--work_dir", default="", help="where checkpoints are written (default: a "
                                                  "temporary directory, removed after)")
    p.add_argument("--out", default="", help="results JSON path (default: benchmarks/results/"
                                             "checkpoint_integrity_<date>_<device>.json)")
    return p.parse_args(argv)


def timed(fns: dict, repeats: int, setup=lambda: None) -> dict[str, list[float]]:
    """Seconds of each of `repeats` calls of every fn in `fns`, taking turns and reversing the
    order every round (a b, b a, a b...), so that drift in the disk's or the machine's speed
    and the after-effects of the previous call (page-cache writeback) hit all alike, after one
    untimed round (compiles, first touches); setup() runs untimed before every call."""
    times = {name: [] for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in list(fns.items())[::1 if round_ % 2 else -1]:
            setup()
            start = time.perf_counter()
            jax.block_until_ready(fn())
            if round_:
                times[name].append(time.perf_counter() - start)
    return times


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def save_plain(directory: pathlib.Path, items: dict) -> None:
    """The orbax save Checkpointer.save makes, without the checksums in the meta."""
    manager = ocp.CheckpointManager(directory, item_names=(*items, "meta"))
    manager.save(1, args=ocp.args.Composite(
        meta=ocp.args.JsonSave({"step": 1}),
        **{name: ocp.args.StandardSave(tree) for name, tree in items.items()}), force=True)
    manager.wait_until_finished()
    manager.close()


def save_checked(directory: pathlib.Path, state) -> None:
    saver = checkpoint.Checkpointer(directory, keep=None)
    saver.save(1, state, {"data": None, "config": {}})
    saver.wait()
    saver.close()


class ParamsOnly:
    """Params and a one-scalar optimizer state: what a Checkpointer saves, params alone."""

    def __init__(self, params, opt_state):
        self.params, self.opt_state = params, opt_state


def measure(name: str, state, target, work: pathlib.Path, repeats: int) -> dict:
    """Times checksum, save and restore of `state` (TrainState or ParamsOnly) onto `target`
    (its abstract twin, with shardings)."""
    directory = work / name
    fresh = lambda: shutil.rmtree(directory, ignore_errors=True)  # noqa: E731
    items = {"params": state.params, "opt_state": state.opt_state}
    jax.block_until_ready(items)  # the state's initialisation is asynchronous: not timed
    repeats_s = timed(dict(checksum=lambda: tree_checksums(items)), repeats)
    repeats_s.update(timed(dict(save=lambda: save_checked(directory, state),
                                save_plain=lambda: save_plain(directory, items)),
                           repeats, fresh))
    fresh()
    save_checked(directory, state)
    step_dir = directory / "1"
    if isinstance(state, ParamsOnly):
        restores = dict(
            restore=lambda: checkpoint.restore_params(directory, 1, target.params),
            restore_plain=lambda: checkpoint._read_arrays(1, step_dir / "params",
                                                          target.params))
    else:
        meta = checkpoint.read_meta(directory, 1)[1]
        restores = dict(
            restore=lambda: checkpoint.restore_state(directory, 1, target, meta),
            restore_plain=lambda: [
                checkpoint._read_arrays(1, step_dir / item, getattr(target, item))
                for item in ("params", "opt_state")])
    repeats_s.update(timed(restores, repeats))
    fresh()
    figures = dict(bytes=nbytes(items), repeats_s=repeats_s,
                   **{f"{k}_s": statistics.median(v) for k, v in repeats_s.items()})
    figures["checksum_gb_per_s"] = figures["bytes"] / GB / figures["checksum_s"]
    figures["save_overhead"] = figures["save_s"] / figures["save_plain_s"] - 1
    figures["restore_overhead"] = figures["restore_s"] / figures["restore_plain_s"] - 1
    print(f"  {name}: {figures['bytes'] / GB:.3f} GB, checksum {figures['checksum_s']:.3f} s, "
          f"save {figures['save_s']:.2f} s (plain {figures['save_plain_s']:.2f}), restore "
          f"{figures['restore_s']:.2f} s (plain {figures['restore_plain_s']:.2f})",
          file=sys.stderr, flush=True)
    return figures


def demo_state(mesh):
    model = model_from_config_file("configs/default.py")
    optimizer = make_optimizer(OPTIMIZER)
    return (model, init_state(model, optimizer, 0, mesh),
            abstract_state(model, optimizer, mesh))


def one_b_params(mesh):
    model = model_from_config_file("configs/paper/1b_h128_mqa_cla2.py")
    target = checkpoint.params_target(model, mesh)
    shardings = jax.tree_util.tree_map(lambda x: x.sharding, target)
    params = jax.jit(lambda: nn.meta.unbox(init_params(model, jax.random.key(0))),
                     out_shardings=shardings)()
    count = jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(mesh))
    abstract_count = jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh))
    return model, ParamsOnly(params, {"count": count}), ParamsOnly(target,
                                                                   {"count": abstract_count})


def extrapolated_state(params_figures: dict) -> dict:
    """The 1B float32 train state = params + two Adam moments of the same shapes: 3x the
    bytes, and every measured cost here is linear in bytes."""
    keys = ("bytes", "checksum_s", "save_s", "save_plain_s", "restore_s", "restore_plain_s")
    figures = {k: 3 * params_figures[k] for k in keys}
    figures.update({k: params_figures[k] for k in ("checksum_gb_per_s", "save_overhead",
                                                   "restore_overhead")})
    return dict(figures, extrapolated="x3 from the 1B params measurement, not measured")


def run(args) -> dict:
    mesh = sharding.single_device_mesh()
    work = pathlib.Path(args.work_dir or tempfile.mkdtemp(prefix="ckpt-bench-"))
    results = {}
    try:
        model, state, target = demo_state(mesh)
        results["demo_train_state"] = dict(params=num_params(model), **measure(
            "demo_train_state", state, target, work, args.repeats))
        del state
        if not args.skip_1b:
            model, state, target = one_b_params(mesh)
            results["1b_params"] = dict(params=num_params(model), **measure(
                "1b_params", state, target, work, args.repeats))
            del state
            results["1b_train_state"] = extrapolated_state(results["1b_params"])
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    return report(
        "checkpoint_integrity",
        what=("seconds to checksum, save (Checkpointer.save + wait; plain = the same orbax save "
              "without checksums) and restore (read + verify; plain = the same orbax read) a "
              "state on one device; medians; overhead = with / plain - 1"),
        settings=dict(repeats=args.repeats, mesh="1 device",
                      work_dir="tmpfs/disk of this machine" if not args.work_dir
                      else args.work_dir),
        results=results)


def table(report) -> str:
    lines = ["| state | GB | checksum | GB/s | save | save, no checksums | overhead | restore "
             "| restore, no verification | overhead |", "|---" * 10 + "|"]
    for name, f in report["results"].items():
        mark = " (extrapolated)" if "extrapolated" in f else ""
        lines.append(
            f"| {name}{mark} | {f['bytes'] / GB:.3f} | {f['checksum_s']:.3f} s | "
            f"{f['checksum_gb_per_s']:.2f} | {f['save_s']:.2f} s | {f['save_plain_s']:.2f} s | "
            f"{100 * f['save_overhead']:+.0f}% | {f['restore_s']:.2f} s | "
            f"{f['restore_plain_s']:.2f} s | {100 * f['restore_overhead']:+.0f}% |")
    return "\n".join(lines) + f"\n\n{provenance(report)}"


def main(argv=None):
    args = parse_args(argv)
    report = run(args)
    publish(report, table(report), args.out or None)


if __name__ == "__main__":
    main()
