"""Orbax checkpoints of a run: params, optimizer state, and a JSON meta item (step, data
iterator position, config) so that a resume continues on the exact next batch.

Orbax itself skips the temporary directory of an interrupted save, but an empty or foreign
directory named like a step counts as the latest step and fails to restore with a misleading
message: such steps are skipped here, with a clear line, and never deleted.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import linen as nn

from cla_jax import sharding
from cla_jax.errors import UserError
from cla_jax.model import abstract_params
from cla_jax.storage import as_path

ITEMS = ("params", "opt_state", "meta")


class CheckpointError(UserError):
    """A checkpoint cannot be used; the message says which and what to do."""


def _manager(directory: epath.Path, keep: int | None = None, read_only: bool = False):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not read_only, read_only=read_only,
        enable_async_checkpointing=not read_only)
    return ocp.CheckpointManager(directory, options=options, item_names=ITEMS)


def _step_problem(step_dir: epath.Path) -> str | None:
    """Why this step directory cannot be a checkpoint of ours, or None if it looks whole."""
    missing = [item for item in ITEMS if not (step_dir / item).is_dir()
               or not any((step_dir / item).iterdir())]
    if missing:
        return f"it has no {', '.join(missing)} (empty, foreign or damaged)"
    return None


def good_steps(directory: epath.PathLike) -> list[int]:
    """Steps that look complete, newest last; reports every directory it skips."""
    directory = as_path(directory)
    if not directory.is_dir():
        return []
    for tmp in sorted(directory.glob("*.orbax-checkpoint-tmp*")):
        logging.warning("ignoring %s: a save that was interrupted before it committed", tmp)
    steps = []
    for path in sorted(directory.iterdir()):
        if not path.is_dir() or not path.name.isdigit():
            continue
        problem = _step_problem(path)
        if problem:
            logging.warning("skipping checkpoint step %s in %s: %s", path.name, directory,
                            problem)
        else:
            steps.append(int(path.name))
    return sorted(steps)


class Checkpointer:
    """Saves and restores a run's state under `<workdir>/checkpoints`."""

    def __init__(self, directory: epath.PathLike, keep: int = 2):
        self.directory = as_path(directory)
        self._manager = _manager(self.directory, keep)

    def save(self, step: int, state, meta: dict[str, Any]) -> None:
        self._manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            opt_state=ocp.args.StandardSave(state.opt_state),
            meta=ocp.args.JsonSave({**meta, "step": int(step)})), force=True)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def latest_step(self) -> int | None:
        steps = good_steps(self.directory)
        return steps[-1] if steps else None

    def restore(self, step: int, abstract_state):
        """(state, meta) of `step`, each array placed by the sharding of its leaf in
        `abstract_state` (ShapeDtypeStructs): any mesh, not only the one that saved it."""
        restored = self._manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state.params),
            opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
            meta=ocp.args.JsonRestore()))
        step_array = jax.device_put(np.int32(restored.meta["step"]), abstract_state.step.sharding)
        state = abstract_state.replace(step=step_array, params=restored.params,
                                       opt_state=restored.opt_state)
        return state, restored.meta

    def close(self) -> None:
        self._manager.close()


def read_meta(directory: epath.PathLike, step: int | None = None) -> tuple[int, dict]:
    """(step, meta) of a step (default: the latest good one) without touching arrays."""
    directory = as_path(directory)
    steps = good_steps(directory)
    if not steps:
        raise CheckpointError(f"no usable checkpoint in {directory}; train first, or point "
                              "--workdir at a directory holding one")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise CheckpointError(f"checkpoint step {step} is not in {directory}; available: "
                              f"{steps}")
    manager = _manager(directory, read_only=True)
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    manager.close()
    return step, meta


def restore_params(directory: epath.PathLike, step: int, abstract_params):
    """Only the params of `step` (eval, generate), placed like `abstract_params`."""
    manager = _manager(as_path(directory), read_only=True)
    params = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params))).params
    manager.close()
    return params


def restore_params_onto(directory: epath.PathLike, step: int, config, mesh):
    """The params of `step` for model `config`, sharded onto `mesh` by the rule table."""
    boxed = abstract_params(config)
    target = sharding.with_shardings(nn.meta.unbox(boxed), sharding.param_shardings(boxed, mesh))
    return restore_params(directory, step, target)


def check_same_model(saved: dict, current: dict, where: epath.Path) -> None:
    """Refuses to resume a run whose checkpoint was made for a different model."""
    diffs = [f"{k}: saved {saved.get(k)!r} vs now {current.get(k)!r}"
             for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diffs:
        raise CheckpointError(
            f"{where} holds a checkpoint of a different model ({'; '.join(diffs)}); use a new "
            "--workdir, or the config that made it")
