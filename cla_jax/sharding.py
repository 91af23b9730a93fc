"""Where arrays live on a device mesh: mesh axes (data, fsdp, tensor), one rule table from
the model's logical axis names to those axes, and the shardings derived from it.

    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1})      # -1: all remaining devices
    params_sharding = param_shardings(abstract_params(config), mesh)
    batch = global_batch(local_numpy_batch, mesh)               # this process's rows only

Inside a jitted function traced under `activate(mesh)`, `constrain(x, logical_axes)` pins an
activation's layout; outside one (or on one device) it does nothing. The compiler (GSPMD)
inserts every collective: there are none written by hand.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cla_jax.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
DCN_AXES = tuple(f"dcn_{axis}" for axis in MESH_AXES)

# Logical axis -> mesh axes, in order. A mesh axis already taken by an earlier dimension of
# the same array is skipped: activations put fsdp on the batch, so their embed stays whole,
# while parameters (which have no batch) shard embed over fsdp. Size-1 mesh axes are left out.
RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    # Rows split over data parallelism only, leaving fsdp to another dimension (the embedding
    # gradient's d_model: see layers.embedding_lookup).
    "data_batch": ("data",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "length": (), "head_dim": (), "layers": (), "norm": (),
}
# Which config field sets each split dimension, for error messages.
FIELD = {"embed": "model.d_model", "heads": "model.num_heads", "kv_heads": "model.num_kv_heads",
         "mlp": "model.mlp_dim", "vocab": "model.vocab_size"}
BATCH_AXES = RULES["batch"]

_LOGGED_NOTES: set[str] = set()
_ACTIVE_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("mesh", default=None)
# The platform of the devices the function being traced is compiled for: a program compiled
# ahead of time for TPU or GPU devices on a CPU host must choose their kernels, not the host's.
_ACTIVE_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "platform", default=None)


def parse_mesh(text: str) -> dict[str, int]:
    """'data=2,tensor=4' -> {'data': 2, 'fsdp': 1, 'tensor': 4} (command-line --mesh)."""
    spec = {axis: 1 for axis in MESH_AXES}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        if name not in MESH_AXES + DCN_AXES or not value.lstrip("-").isdigit():
            raise ConfigError(f"bad mesh entry {item!r} in {text!r}; write axis=size with axes "
                              f"{', '.join(MESH_AXES + DCN_AXES)}, e.g. --mesh=data=2,tensor=4")
        spec[name] = int(value)
    return spec


def mesh_shape(spec: Mapping[str, int], num_devices: int,
               num_granules: int = 1) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(per-granule shape, DCN shape) over (data, fsdp, tensor), with -1 filled in.

    A granule is a TPU slice (or a process, where devices have no slice): the DCN shape splits
    the mesh across granules, the other across each granule's devices.
    """
    unknown = sorted(set(spec) - set(MESH_AXES) - set(DCN_AXES))
    if unknown:
        raise ConfigError(f"unknown mesh axes {unknown}; the axes are "
                          f"{', '.join(MESH_AXES + DCN_AXES)}")
    ici = [int(spec.get(axis, 1)) for axis in MESH_AXES]
    dcn = [int(spec.get(axis, 1)) for axis in DCN_AXES]
    described = ", ".join(f"{k}={spec[k]}" for k in MESH_AXES + DCN_AXES
                          if k in spec and (k in MESH_AXES or spec[k] != 1))
    if any(d < 1 for d in dcn) or any(i == 0 or i < -1 for i in ici) or ici.count(-1) > 1:
        raise ConfigError(f"bad mesh ({described}): sizes are positive, with at most one -1 "
                          "(= all remaining devices) among data, fsdp and tensor")
    if math.prod(dcn) != num_granules:
        raise ConfigError(f"mesh DCN axes ({described}) multiply to {math.prod(dcn)} but there "
                          f"are {num_granules} slices/processes; make dcn_* multiply to "
                          f"{num_granules}")
    per_granule = num_devices // num_granules
    if -1 in ici:
        known = math.prod(i for i in ici if i != -1)
        if per_granule % known:
            raise ConfigError(f"mesh ({described}) cannot fill -1: {per_granule} devices per "
                              f"slice are not divisible by {known}")
        ici[ici.index(-1)] = per_granule // known
    if math.prod(ici) * num_granules != num_devices:
        raise ConfigError(
            f"mesh ({described}) needs {math.prod(ici) * num_granules} devices but "
            f"{num_devices} are available; make data x fsdp x tensor x dcn_* equal "
            f"{num_devices}, or set one axis to -1")
    return tuple(ici), tuple(dcn)


def make_mesh(spec: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: all) with axes (data, fsdp, tensor).

    With dcn_* > 1 the mesh spans slices (or processes) through
    `mesh_utils.create_hybrid_device_mesh`: put data parallelism there, it needs the least
    bandwidth.
    """
    spec = dict(spec or {"fsdp": -1})
    devices = list(devices or jax.devices())
    # Granules of the slow network: TPU slices where there are several, else processes.
    slices = {getattr(d, "slice_index", 0) for d in devices}
    granule = "slice_index" if len(slices) > 1 else "process_index"
    num_granules = len({getattr(d, granule) for d in devices})
    wants_dcn = any(int(spec.get(axis, 1)) != 1 for axis in DCN_AXES)
    ici, dcn = mesh_shape(spec, len(devices), num_granules if wants_dcn else 1)
    if wants_dcn:
        grid = mesh_utils.create_hybrid_device_mesh(
            ici, dcn, devices, process_is_granule=granule == "process_index")
    else:
        try:
            grid = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
        except (ValueError, NotImplementedError, AssertionError):  # unusual TPU shapes
            grid = np.asarray(devices).reshape(ici)
    return Mesh(grid, MESH_AXES)


def single_device_mesh(device: jax.Device | None = None) -> Mesh:
    """A mesh of one device (default: the first), every axis of size 1."""
    return make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, [device or jax.devices()[0]])


def describe(mesh: Mesh) -> str:
    """The mesh in a line: its axes and sizes, devices and processes."""
    return " x ".join(f"{name}={size}" for name, size in mesh.shape.items()) + \
        f" ({mesh.size} devices, {len({d.process_index for d in mesh.devices.flat})} processes)"


def _spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh):
    """(PartitionSpec, [(logical axis, size, mesh axis) that did not divide and was skipped])."""
    used, entries, skipped = set(), [], []
    for name, size in zip(logical_axes, shape):
        if name is not None and name not in RULES:
            raise KeyError(f"logical axis {name!r} has no sharding rule in cla_jax.sharding")
        chosen = []
        for axis in RULES.get(name, ()) if name else ():
            if mesh.shape[axis] == 1 or axis in used:
                continue
            if size % (math.prod(mesh.shape[a] for a in chosen) * mesh.shape[axis]):
                skipped.append((name, size, axis))
                continue
            chosen.append(axis)
        used.update(chosen)
        entries.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
    return P(*entries), skipped


def logical_sharding(logical_axes: Sequence[str | None], shape: Sequence[int],
                     mesh: Mesh) -> NamedSharding:
    """The sharding of an array with these logical axes; dimensions a mesh axis does not divide
    stay whole on that axis (e.g. a decode batch of 1 on data=8)."""
    return NamedSharding(mesh, _spec(logical_axes, shape, mesh)[0])


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding that puts a whole copy on every device of `mesh`."""
    return NamedSharding(mesh, P())


def param_shardings(boxed_params, mesh: Mesh):
    """NamedShardings for a tree of `nn.LogicallyPartitioned` params (e.g. `abstract_params`).

    A weight dimension that its mesh axis does not divide is a ConfigError, except the KV-head
    axis: MQA's single head (or too few GQA heads) is replicated over `tensor`, with a note.
    """
    notes = set()

    def one(path, boxed: nn.LogicallyPartitioned):
        spec, skipped = _spec(boxed.names, boxed.value.shape, mesh)
        for name, size, axis in skipped:
            if name != "kv_heads":
                where = "/".join(str(getattr(k, "key", k)) for k in path)
                raise ConfigError(
                    f"mesh axis {axis}={mesh.shape[axis]} does not divide the '{name}' "
                    f"dimension ({size}) of {where}: choose a mesh whose {axis} size divides "
                    f"{FIELD.get(name, name)} ({size}), or make that a multiple of "
                    f"{mesh.shape[axis]}" + (" (a larger vocab_size only pads the embedding)"
                                             if name == "vocab" else ""))
            notes.add(f"{FIELD[name]}={size} is not divisible by mesh {axis}="
                      f"{mesh.shape[axis]}: K/V projections and the cache are replicated over "
                      f"'{axis}' (expected for MQA)")
        return NamedSharding(mesh, spec)

    shardings = jax.tree_util.tree_map_with_path(
        one, boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    for note in sorted(notes - _LOGGED_NOTES):
        logging.warning("sharding note: %s", note)
        _LOGGED_NOTES.add(note)
    return shardings


def with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs carrying shardings: what orbax restores onto and jit lowers with."""
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)


# --- data --------------------------------------------------------------------------------

def num_batch_shards(mesh: Mesh) -> int:
    """How many ways the mesh splits a batch's rows: the product of its batch axes (data x
    fsdp)."""
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def data_share(mesh: Mesh) -> tuple[int, int]:
    """(index, count): this process loads rows [index * G / count, (index + 1) * G / count) of
    each global batch of G rows. Processes whose devices hold the same rows (a tensor axis
    across hosts) get the same index; an unsharded batch gives (0, 1)."""
    fsdp = mesh.shape["fsdp"]
    mine = sorted({d * fsdp + f for (d, f, _), device in np.ndenumerate(mesh.devices)
                   if device.process_index == jax.process_index()})
    if not mine:
        raise ConfigError(f"the mesh holds no device of process {jax.process_index()}")
    count = num_batch_shards(mesh) // len(mine)
    if mine != list(range(mine[0], mine[0] + len(mine))) or mine[0] % len(mine):
        raise ConfigError(f"process {jax.process_index()} holds batch shards {mine} of the mesh "
                          f"({describe(mesh)}), not one contiguous block; order the mesh so each "
                          "host's devices are adjacent on the data/fsdp axes")
    return mine[0] // len(mine), count


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over (data, fsdp), the rest whole: for every [B, ...] input of a step."""
    axes = tuple(axis for axis in BATCH_AXES if mesh.shape[axis] > 1)
    return NamedSharding(mesh, P(axes if axes else None))


def check_batch(batch_size: int, mesh: Mesh, what: str = "the batch size") -> None:
    """Raises ConfigError unless `batch_size` divides evenly over the mesh's batch shards."""
    shards = num_batch_shards(mesh)
    if batch_size % shards:
        raise ConfigError(f"{what} ({batch_size}) is not divisible by the mesh's data x fsdp = "
                          f"{shards}; make it a multiple of {shards} or change the mesh")


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows (see `data_share`) -> global arrays sharded over (data, fsdp)."""
    _, count = data_share(mesh)

    def one(x):
        x = np.asarray(x)
        sharding = logical_sharding(("batch",) + (None,) * (x.ndim - 1),
                                    (x.shape[0] * count,) + x.shape[1:], mesh)
        return jax.make_array_from_process_local_data(sharding, x,
                                                      (x.shape[0] * count,) + x.shape[1:])

    return {name: one(x) for name, x in local_batch.items()}


# --- activations inside jit --------------------------------------------------------------

@contextlib.contextmanager
def activate(mesh: Mesh | None):
    """Makes `constrain` pin layouts on `mesh` while a function is traced, and `platform()`
    answer with the platform of its devices."""
    token = _ACTIVE_MESH.set(mesh if mesh is not None and mesh.size > 1 else None)
    platform_token = _ACTIVE_PLATFORM.set(None if mesh is None else mesh.devices.flat[0].platform)
    try:
        yield
    finally:
        _ACTIVE_MESH.reset(token)
        _ACTIVE_PLATFORM.reset(platform_token)


def platform() -> str:
    """"cpu", "gpu" or "tpu": the platform of the active mesh's devices (which may be
    compile-only devices of another platform than this host's), else jax's default backend.
    What a kernel choice must follow, never `jax.default_backend()` alone."""
    active = _ACTIVE_PLATFORM.get()
    return active if active is not None else jax.default_backend()


def per_shard(fn, args: Sequence[jax.Array], logical_axes: Sequence[Sequence[str | None]]):
    """fn(*args), run on each device's shards under shard_map on the active mesh (plainly
    without one), the args split by their logical axes. For a kernel XLA cannot partition (a
    Pallas call): GSPMD would gather its whole inputs onto every device. The output has the
    shape and the logical axes of the first arg. fn must be right per shard: each shard sees
    whole dimensions wherever its logical axis is not split."""
    mesh = _ACTIVE_MESH.get()
    if mesh is None:
        return fn(*args)
    specs = tuple(_spec(axes, x.shape, mesh)[0] for axes, x in zip(logical_axes, args))
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=specs[0],
                         check_vma=False)(*args)


def split_over(logical_axis: str, size: int) -> int:
    """How many ways the active mesh splits a dimension of `size` along `logical_axis` (1
    without a mesh)."""
    mesh = _ACTIVE_MESH.get()
    if mesh is None:
        return 1
    entry = _spec((logical_axis,), (size,), mesh)[0][0]
    names = () if entry is None else (entry,) if isinstance(entry, str) else entry
    return math.prod(mesh.shape[n] for n in names)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`x` constrained to the sharding of its logical axes on the active mesh (`activate`);
    `x` unchanged outside one."""
    mesh = _ACTIVE_MESH.get()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, logical_sharding(logical_axes, x.shape, mesh))
