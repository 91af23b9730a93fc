"""Orbax checkpoints of a run: params, optimizer state, and a JSON meta item (step, data
iterator position, config) so that a resume continues on the exact next batch.

Integrity. Orbax does not notice a flipped bit in an array file (it restores wrong values)
and fails on a truncated one with a raw TensorStore error. So every save stores, in the meta,
a checksum of every array (cla_jax.checksum: computed on device, the same on any mesh) and a
crc32 of the rest of the meta; every restore verifies them. A step that fails is damaged:
`DamagedCheckpointError`, one line naming the step, the item and the array. Training then
moves the damaged step aside (`N` -> `N.damaged`, every byte kept, and out of orbax's sight,
so that neither its garbage collection nor a new save of step N touches it) and resumes from
the newest good step; eval and generate refuse it and name the steps they could use.

Orbax itself skips the temporary directory of an interrupted save; a directory named like a
step that no save committed (empty or foreign) is skipped here, with a clear line, and never
deleted. Reads go through orbax's item handlers, not a CheckpointManager: a read-only manager
logs warnings nobody can act on, and its restore barrier would hang the other processes
when one of them fails to read.
"""
from __future__ import annotations

import json
import re
import sys
import zlib
from typing import Any, Callable, NamedTuple

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import linen as nn
from jax.experimental import multihost_utils

from cla_jax import sharding
from cla_jax.checksum import tree_checksums
from cla_jax.config import ModelConfig
from cla_jax.errors import UserError
from cla_jax.model import abstract_params
from cla_jax.storage import as_path, is_remote

ITEMS = ("params", "opt_state", "meta")
ARRAY_ITEMS = ("params", "opt_state")
DAMAGED_SUFFIX = ".damaged"  # not a step name to orbax (it wants digits, or `<prefix>_<n>`)
COMMIT_FILE = "commit_success.txt"  # orbax writes it last, locally and on gs://
# TensorStore status codes of a read that may succeed if retried: not damage.
TRANSIENT_STATUS = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED",
                    "PERMISSION_DENIED", "UNAUTHENTICATED", "ABORTED", "CANCELLED")


class CheckpointError(UserError):
    """A checkpoint cannot be used; the message says which and what to do."""


class DamagedCheckpointError(CheckpointError):
    """A committed step whose bytes are not what was saved (or cannot be read)."""

    def __init__(self, step: int, problem: str, advice: str = ""):
        self.step, self.problem = step, problem
        super().__init__(f"checkpoint step {step} is damaged: {problem}"
                         + (f"; {advice}" if advice else ""))


class StructureMismatchError(CheckpointError):
    """A step whose arrays are whole but not the ones this code restores (e.g. an optimizer
    state saved by another optax): never set aside as damaged."""


# --- Which steps there are -------------------------------------------------------------------

def _is_committed(step_dir: epath.Path) -> bool:
    if (step_dir / COMMIT_FILE).exists():
        return True
    # A local save is committed by its rename, before the commit file is written.
    return not is_remote(step_dir) and (step_dir / "_CHECKPOINT_METADATA").exists()


def committed_steps(directory: epath.PathLike) -> list[int]:
    """Steps a save committed, damaged or not, oldest first; reports what it skips."""
    directory = as_path(directory)
    if not directory.is_dir():
        return []
    for tmp in sorted(directory.glob("*.orbax-checkpoint-tmp*")):
        logging.warning("ignoring %s: a save that was interrupted before it committed", tmp)
    steps = []
    for path in sorted(directory.iterdir()):
        if not path.is_dir() or not path.name.isdigit():
            continue
        if _is_committed(path):
            steps.append(int(path.name))
        else:
            logging.warning("skipping checkpoint step %s in %s: no save committed it (empty, "
                            "foreign, or a save interrupted)", path.name, directory)
    return sorted(steps)


def _missing_items(step_dir: epath.Path) -> list[str]:
    return [item for item in ITEMS if not (step_dir / item).is_dir()
            or not any((step_dir / item).iterdir())]


def good_steps(directory: epath.PathLike) -> list[int]:
    """Committed steps that have all their items, oldest first. Their bytes are verified when
    they are restored."""
    directory = as_path(directory)
    return [s for s in committed_steps(directory) if not _missing_items(directory / str(s))]


# --- Saving ----------------------------------------------------------------------------------

def _meta_crc(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "meta_crc32"}
    return f"{zlib.crc32(json.dumps(body, sort_keys=True).encode()):08x}"


def sealed_meta(meta: dict, state) -> dict:
    """`meta` with the checksums of the state's arrays and a crc32 of itself."""
    meta = json.loads(json.dumps(meta))  # as it will read back (tuples become lists)
    meta["checksums"] = {item: tree_checksums(getattr(state, item)) for item in ARRAY_ITEMS}
    meta["meta_crc32"] = _meta_crc(meta)
    return meta


def _manager(directory: epath.Path, keep: int | None):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(directory, options=options, item_names=ITEMS)


class Checkpointer:
    """Saves a run's state under `<workdir>/checkpoints` (asynchronously)."""

    def __init__(self, directory: epath.PathLike, keep: int = 2):
        self.directory = as_path(directory)
        self._manager = _manager(self.directory, keep)

    def save(self, step: int, state, meta: dict[str, Any]) -> None:
        # The checksums are computed (on device, one jitted call) before the arrays are
        # copied out, so they describe exactly what is handed to orbax.
        meta = sealed_meta({**meta, "step": int(step)}, state)
        self._manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            opt_state=ocp.args.StandardSave(state.opt_state),
            meta=ocp.args.JsonSave(meta)), force=True)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


# --- Reading and verifying -------------------------------------------------------------------

def _read_meta(directory: epath.Path, step: int) -> dict:
    """The verified meta of a committed step; DamagedCheckpointError if it is not whole."""
    step_dir = directory / str(step)
    missing = _missing_items(step_dir)
    if missing:
        raise DamagedCheckpointError(step, f"{step_dir} has no {', '.join(missing)}")
    handler = ocp.JsonCheckpointHandler()
    try:
        meta = handler.restore(step_dir / "meta")
    except Exception as error:  # noqa: BLE001 (any failure to parse is damage here)
        raise DamagedCheckpointError(step, f"{step_dir / 'meta'} is not readable JSON "
                                     f"({_first_line(error)})") from error
    finally:
        handler.close()
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise DamagedCheckpointError(step, f"{step_dir / 'meta'} holds no run config")
    if "meta_crc32" not in meta and "checksums" not in meta:
        logging.warning("checkpoint step %d in %s has no checksums (saved by an older cla-jax): "
                        "it is used unverified", step, directory)
    elif meta.get("meta_crc32") != _meta_crc(meta):
        raise DamagedCheckpointError(step, f"{step_dir / 'meta'} does not match its crc32")
    return meta


def _first_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def _error_chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _is_transient(error: BaseException) -> bool:
    return any(isinstance(e, (ConnectionError, TimeoutError, MemoryError))
               or str(e).startswith(TRANSIENT_STATUS) for e in _error_chain(error))


def _is_structure_mismatch(error: BaseException) -> bool:
    return any("tree structures do not match" in str(e) for e in _error_chain(error))


def _orbax_names(tree) -> dict[str, str]:
    """{orbax's key of a leaf ('a.b.c'): its keystr path}, to name the array a read failed on."""
    def name(key):
        return str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key))))
    return {".".join(name(k) for k in path): jax.tree_util.keystr(path)
            for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _tensorstore_reason(message: str) -> str:
    """'STATUS in <file>: <innermost reason>' from a TensorStore error message."""
    message = message.split(" [tensorstore_spec")[0]
    status = message.split(":")[0]
    files = re.findall(r'(?:file|object) "([^"]+)"', message)
    reason = message.rsplit('": ', 1)[-1]
    return f"{status} in {files[-1]}: {reason}" if files else _first_line(message)


def _describe_read_error(error: BaseException, item_dir: epath.Path, target) -> str:
    """One line: which array of `item_dir` could not be read, where, and why."""
    names = _orbax_names(target)
    for cause in _error_chain(error):
        found = re.search(r'Error reading "([^"]+)/[^"/]*"', str(cause))
        if found:
            array = names.get(found.group(1), found.group(1))
            return (f"{item_dir} array {array} cannot be read "
                    f"({_first_line(_tensorstore_reason(str(cause)))})")
    innermost = list(_error_chain(error))[-1]
    return f"{item_dir} cannot be read ({type(innermost).__name__}: {_first_line(innermost)})"


def _drop_closed_loop_callbacks() -> None:
    """After a failed read, orbax has closed its event loop while TensorStore still finishes
    the other reads of the batch; each of their callbacks then reports 'Event loop is closed'
    through sys.unraisablehook, a traceback apiece under the one line that matters. Those, and
    only those, are dropped (the filter is installed once, before the first read)."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_callbacks", False):
        return

    def hook(unraisable):
        value = unraisable.exc_value
        if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_closed_loop_callbacks = True
    sys.unraisablehook = hook


def _agree(local_status: int) -> int:
    """The worst status over all processes (0 ok, 1 damaged, 2 transient, 3 another
    structure): a file that only some processes failed to read must stop all of them the same
    way, not leave the others waiting in a collective."""
    if jax.process_count() == 1:
        return local_status
    return int(np.max(multihost_utils.process_allgather(np.int32(local_status))))


def _read_arrays(step: int, item_dir: epath.Path, target):
    """Restores the arrays of one item onto the shardings of `target`; every process ends
    with the same outcome."""
    handler = ocp.StandardCheckpointHandler()
    restored, error = None, None
    # Installed before the read: the other reads' callbacks can fire before a failed read's
    # exception reaches us.
    _drop_closed_loop_callbacks()
    try:
        restored = handler.restore(item_dir, args=ocp.args.StandardRestore(target))
    except Exception as caught:  # noqa: BLE001 (classified below)
        error = caught
    finally:
        handler.close()
    local = (0 if error is None else 2 if _is_transient(error)
             else 3 if _is_structure_mismatch(error) else 1)
    status = _agree(local)
    if status == 3:  # a checkpoint without checksums (older): orbax found the mismatch
        raise StructureMismatchError(
            f"checkpoint step {step}: {item_dir} holds arrays of another structure than this "
            f"code builds ({_first_line(error) if error else 'on another process'}); resume "
            "with the code and settings that saved it, or train in a new --workdir. Nothing "
            "was changed") from error
    if status == 2:
        raise OSError(f"reading {item_dir} failed on some process ({error or 'elsewhere'}); "
                      "this looks transient: try again") from error
    if status == 1:
        problem = (_describe_read_error(error, item_dir, target) if error is not None
                   else f"{item_dir} cannot be read on another process")
        raise DamagedCheckpointError(step, problem) from error
    return restored


def _verify(step: int, item_dir: epath.Path, arrays, saved: dict | None) -> None:
    """Compares the arrays' checksums, computed on their devices, with the saved ones."""
    if saved is None:
        return  # an older checkpoint: _read_meta warned that it is unverified
    actual = tree_checksums(arrays)
    wrong = [path for path, value in actual.items() if saved.get(path) != value]
    if wrong:
        more = f" (and {len(wrong) - 1} more arrays)" if len(wrong) > 1 else ""
        raise DamagedCheckpointError(
            step, f"{item_dir} array {wrong[0]} does not match its checksum (saved "
            f"{saved.get(wrong[0])}, read {actual[wrong[0]]}){more}")


def _check_structure(step: int, item_dir: epath.Path, target, saved: dict | None) -> None:
    """Refuses, before reading, a target whose arrays are not the saved ones (another optax,
    another optimizer setting, another code version): the user's situation to resolve, not
    damage, so one clear error and nothing set aside."""
    if saved is None:
        return  # an older checkpoint: no record of its arrays; the read will tell
    wanted = {jax.tree_util.keystr(path)
              for path, _ in jax.tree_util.tree_flatten_with_path(target)[0]}
    missing, extra = sorted(wanted - set(saved)), sorted(set(saved) - wanted)
    if missing or extra:
        differences = "; ".join(part for part in (
            f"this code expects {missing[:3]}{' ...' if len(missing) > 3 else ''}, not saved"
            if missing else "",
            f"saved {extra[:3]}{' ...' if len(extra) > 3 else ''}, not expected"
            if extra else "") if part)
        raise StructureMismatchError(
            f"checkpoint step {step}: {item_dir} holds {len(saved)} arrays of another "
            f"structure than this code builds ({len(wanted)} arrays; {differences}). It was "
            "saved by another version of the code or its libraries (optax), or another "
            "optimizer setting: resume with those, or train in a new --workdir. Nothing was "
            "changed")


def _restore_item(directory: epath.Path, step: int, item: str, target, meta: dict | None):
    item_dir = directory / str(step) / item
    saved = (meta or {}).get("checksums", {}).get(item)
    _check_structure(step, item_dir, target, saved)
    arrays = _read_arrays(step, item_dir, target)
    _verify(step, item_dir, arrays, saved)
    return arrays


def restore_state(directory: epath.PathLike, step: int, abstract_state, meta: dict):
    """The verified state of `step` (params, optimizer state and step counter), each array
    placed by the sharding of its leaf in `abstract_state`: any mesh, not only the saver's."""
    directory = as_path(directory)
    params = _restore_item(directory, step, "params", abstract_state.params, meta)
    opt_state = _restore_item(directory, step, "opt_state", abstract_state.opt_state, meta)
    step_array = jax.device_put(np.int32(meta["step"]), abstract_state.step.sharding)
    return abstract_state.replace(step=step_array, params=params, opt_state=opt_state)


def checkpoints_of(directory: epath.PathLike) -> epath.Path:
    """A run directory's `checkpoints/` (what --workdir names), or `directory` itself when it
    is the checkpoints directory: the readers below take either."""
    directory = as_path(directory)
    inside = directory / "checkpoints"
    return inside if inside.is_dir() else directory


def _other_steps_advice(directory: epath.Path, step: int) -> str:
    others = [s for s in good_steps(directory) if s != step]
    if not others:
        return "no other step is left; restore it from a copy or train again"
    return f"pass --step with another step of {directory} ({', '.join(map(str, others))})"


def _chosen_step(directory: epath.Path, step: int | None) -> int:
    """`step`, or the newest committed one, checked to exist (damaged or not)."""
    steps = committed_steps(directory)
    if not steps:
        raise CheckpointError(f"no usable checkpoint in {directory}; train first, or give "
                              "the directory of a training run (its --workdir)")
    if step is None:
        return steps[-1]
    if step not in steps:
        interrupted = list(directory.glob(f"{step}.orbax-checkpoint-tmp*"))
        why = (f"its save was interrupted before it committed ({interrupted[0]})"
               if interrupted else "it is not there")
        raise CheckpointError(f"checkpoint step {step} cannot be used: {why}; available in "
                              f"{directory}: {good_steps(directory)}")
    return step


def read_meta(directory: epath.PathLike, step: int | None = None) -> tuple[int, dict]:
    """(step, verified meta) of a step (default: the newest) without touching arrays."""
    directory = checkpoints_of(directory)
    step = _chosen_step(directory, step)
    try:
        return step, _read_meta(directory, step)
    except DamagedCheckpointError as error:
        raise DamagedCheckpointError(step, error.problem,
                                     _other_steps_advice(directory, step)) from error


def restore_params(directory: epath.PathLike, step: int, abstract_params):
    """Only the params of `step`, placed like `abstract_params`, verified against the step's
    meta when it has one (a bare params item is restored unverified)."""
    directory = checkpoints_of(directory)
    has_meta = (directory / str(step) / "meta").is_dir()
    meta = _read_meta(directory, step) if has_meta else None
    return _restore_item(directory, step, "params", abstract_params, meta)


def params_target(config: ModelConfig, mesh):
    """ShapeDtypeStructs of `config`'s params, sharded onto `mesh` by the rule table."""
    boxed = abstract_params(config)
    return sharding.with_shardings(nn.meta.unbox(boxed), sharding.param_shardings(boxed, mesh))


def restore_params_onto(directory: epath.PathLike, step: int, config: ModelConfig, mesh):
    """The verified params of `step` for model `config`, sharded onto `mesh`."""
    return restore_params(directory, step, params_target(config, mesh))


class RestoredModel(NamedTuple):
    """A checkpoint restored for inference: its step, the run's config, the model config, the
    mesh and the params placed on it."""
    step: int
    config: ml_collections.ConfigDict  # the run's whole config, as saved
    model: ModelConfig
    mesh: Any
    params: Any


def restore_model(directory: epath.PathLike, step: int | None = None,
                  mesh=None) -> RestoredModel:
    """The one way eval, generate and adapt read a run (its directory or its checkpoints/):
    config and verified params of `step`
    (default: the newest; a damaged one is refused, naming the others) onto `mesh` (a Mesh,
    a mesh spec {axis: size}, or None for the run's config.mesh)."""
    directory = checkpoints_of(directory)
    step = _chosen_step(directory, step)
    try:
        meta = _read_meta(directory, step)
        config = ml_collections.ConfigDict(meta["config"])
        model = ModelConfig.from_dict(config.model)
        if not isinstance(mesh, jax.sharding.Mesh):
            mesh = sharding.make_mesh(mesh or config.get("mesh"))
        params = _restore_item(directory, step, "params", params_target(model, mesh), meta)
    except DamagedCheckpointError as error:
        raise DamagedCheckpointError(step, error.problem,
                                     _other_steps_advice(directory, step)) from error
    return RestoredModel(step, config, model, mesh, params)


# --- Resuming training -----------------------------------------------------------------------

def set_aside(directory: epath.Path, step: int) -> epath.Path:
    """Renames a damaged step `N` to `N.damaged` (or `N.damaged-2`, ...), keeping every byte.
    Process 0 renames; every process returns once it is done."""
    target, n = directory / f"{step}{DAMAGED_SUFFIX}", 1
    while target.exists():
        n += 1
        target = directory / f"{step}{DAMAGED_SUFFIX}-{n}"
    _barrier(f"cla_jax set aside {directory}/{step}: named")  # before anyone renames
    if jax.process_index() == 0:
        (directory / str(step)).rename(target)
    _barrier(f"cla_jax set aside {directory}/{step}: renamed")
    return target


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


class Resumed(NamedTuple):
    """A training state resumed from a checkpoint: its step, state and metadata, and the
    damaged checkpoints moved aside on the way (newest first)."""
    step: int
    state: Any
    meta: dict
    set_aside: list[tuple[DamagedCheckpointError, epath.Path]]  # newest first


def restore_newest_state(directory: epath.PathLike, abstract_state,
                         check_meta: Callable[[int, dict], None]) -> Resumed | None:
    """The newest step that restores and verifies; None if there is no checkpoint.

    check_meta(step, meta) runs on a step's verified meta before its arrays are read, and
    refuses (raises) a checkpoint of another model or data order. Damaged steps newer than
    the one restored are set aside only once it has restored, so a refusal moves nothing.
    """
    directory = as_path(directory)
    damaged = []
    for step in reversed(committed_steps(directory)):
        try:
            meta = _read_meta(directory, step)
            check_meta(step, meta)
            state = restore_state(directory, step, abstract_state, meta)
        except DamagedCheckpointError as error:
            damaged.append(error)
            continue
        return Resumed(step, state, meta, [(e, set_aside(directory, e.step)) for e in damaged])
    if damaged:
        moved = [f"{e.problem} (moved to {set_aside(directory, e.step)})" for e in damaged]
        raise CheckpointError(f"every checkpoint in {directory} is damaged: {'; '.join(moved)}; "
                              "every byte is kept. Run again to train from step 0, or restore "
                              "the steps from a copy")
    return None


def check_same_model(saved: dict, current: dict, where: epath.Path) -> None:
    """Refuses to resume a run whose checkpoint was made for a different model."""
    diffs = [f"{k}: saved {saved.get(k)!r} vs now {current.get(k)!r}"
             for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diffs:
        raise CheckpointError(
            f"{where} holds a checkpoint of a different model ({'; '.join(diffs)}); use a new "
            "--workdir, or the config that made it")
