"""What the three scripts share: flags, and bad input reported as one line, not a traceback."""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from cla_jax.checkpoint import CheckpointError
from cla_jax.config import ConfigError

USER_ERRORS = (ConfigError, CheckpointError, OSError, ValueError, RuntimeError, KeyError)

flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, eval results.")
flags.DEFINE_string("cache_dir", "~/.cache/cla-jax",
                    "Where downloaded wheels, built datasets and tokenizers are kept.")
flags.DEFINE_bool("distributed", False,
                  "Call jax.distributed.initialize() (one process per host): it finds the "
                  "coordinator on TPU pods, SLURM, Open MPI and Kubernetes by itself; elsewhere "
                  "give --coordinator_address, --num_processes and --process_id.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (implies "
                    "--distributed; also read from JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")


def _fail(error: BaseException):
    if os.environ.get("CLA_JAX_TRACEBACK"):
        raise error
    logging.flush()
    text = str(error).replace("\\n", " ").replace("\\'", "'").strip("'\" ")
    text = " ".join(text.split()) or repr(error)  # one line, whatever the source wrote
    print(f"error: {text}", file=sys.stderr)
    raise SystemExit(2)


def _parse_flags(argv):
    try:
        rest = flags.FLAGS(argv)
    except (flags.Error, AttributeError, ValueError, TypeError, KeyError) as error:
        _fail(error)  # e.g. --config.train.stepz=3, --config=missing.py
    if len(rest) > 1:
        _fail(ValueError(f"unexpected arguments {rest[1:]}; flags are --name=value"))
    return rest


def define_mesh_flag() -> None:
    flags.DEFINE_string("mesh", None, "Device mesh as axis=size, e.g. fsdp=-1 or "
                        "data=2,tensor=4 (-1 = remaining devices, unnamed axes are 1; default: "
                        "the run's config.mesh). Any mesh can read any checkpoint.")


def mesh_spec() -> dict | None:
    """The --mesh flag as {axis: size}; None when not given (the run's config.mesh)."""
    from cla_jax import sharding  # noqa: PLC0415 (jax loads only after flags are parsed)
    return sharding.parse_mesh(flags.FLAGS.mesh) if flags.FLAGS.mesh else None


def mesh_for(config):
    """The --mesh flag's mesh, else the run config's, over all devices."""
    from cla_jax import sharding  # noqa: PLC0415
    return sharding.make_mesh(mesh_spec() or config.get("mesh"))


def initialize_distributed() -> None:
    """jax.distributed.initialize when the flags or JAX_COORDINATOR_ADDRESS ask for it; then
    every process runs the same program over the global mesh."""
    f = flags.FLAGS
    if not (f.distributed or f.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")):
        return
    import jax  # noqa: PLC0415 (jax loads only after flags are parsed)
    try:
        jax.distributed.initialize(coordinator_address=f.coordinator_address,
                                   num_processes=f.num_processes, process_id=f.process_id)
    except ValueError as error:  # e.g. "coordinator_address should be defined."
        raise ValueError(
            f"jax.distributed could not start ({error}): outside a TPU pod, SLURM, Open MPI or "
            "Kubernetes job, give --coordinator_address=host:port --num_processes=N "
            "--process_id=i to every process") from error
    logging.info("process %d of %d, %d local devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count())


def start(main):
    """Runs an absl main; bad flags and user errors exit 2 with one `error: ...` line
    (CLA_JAX_TRACEBACK=1 shows the traceback)."""
    def guarded(argv):
        try:
            initialize_distributed()
            return main(argv)
        except USER_ERRORS as error:
            _fail(error)
    app.run(guarded, flags_parser=_parse_flags)
