"""What the three scripts share: flags, and how a run ends when something goes wrong.

Exit codes, so that a scheduler can tell a failure worth retrying (1) from one that needs a
change of input (2) or of settings (3):

    0  done
    1  internal failure (a bug, an XLA or collective error): the full traceback. It is Python's
       own code for an uncaught exception, so a failure before cli.start reads the same.
    2  bad input the user can fix (config, flag, path, prompt, checkpoint): one `error: ...`
       line and no traceback (CLA_JAX_TRACEBACK=1 shows it)
    3  a device ran out of memory: the traceback, then one line naming the settings to lower
"""
from __future__ import annotations

import os
import pathlib
import sys
import traceback

from absl import app, flags, logging

from cla_jax.errors import UserError

EXIT_INTERNAL_ERROR = 1
EXIT_USER_ERROR = 2
EXIT_OUT_OF_MEMORY = 3

# Bad input: our own errors, absl's flag and usage errors, and a path the user gave that is
# missing, not a directory, a directory, or not readable. Everything else is a failure of ours.
USER_ERRORS = (UserError, flags.Error, app.UsageError, FileNotFoundError, NotADirectoryError,
               IsADirectoryError, PermissionError)
# What loading a --config file or applying --config.x=y overrides raises, besides flags.Error.
CONFIG_PARSE_ERRORS = (AttributeError, ValueError, TypeError, KeyError, SyntaxError, OSError)

OUT_OF_MEMORY_HINT = (
    "out of device memory: to train, lower train.batch_size (raise train.grad_accum_steps to "
    "keep the tokens per step), set model.remat=dots_no_batch or full, or spread the state over "
    "more devices with a larger --mesh fsdp=N; for eval.py lower --batch_size; for generate.py "
    "give fewer prompts, a smaller --max_new_tokens or --cache_dtype=bfloat16")

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
    text = str(error).replace("\\n", " ").replace("\\'", "'").strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]  # KeyError and some absl errors quote their message
    text = " ".join(text.split()) or repr(error)  # one line, whatever the source wrote
    print(f"error: {text}", file=sys.stderr)
    raise SystemExit(EXIT_USER_ERROR)


def _config_package_roots(argv) -> list[str]:
    """For each .py file given as a flag value inside a Python package (configs/paper/x.py
    imports `configs.paper.common`), the directory above that package: with it on sys.path
    the config loads from any working directory, as an installed console script needs."""
    roots = []
    for value in argv[1:]:
        path = pathlib.Path(value.split("=", 1)[-1]).expanduser()
        if path.suffix != ".py" or not path.is_file():
            continue
        root = path.resolve().parent
        while (root / "__init__.py").is_file():
            root = root.parent
        if root != path.resolve().parent and str(root) not in sys.path:
            roots.append(str(root))
    return roots


def _expand_home(argv) -> list[str]:
    """`--flag=~/path` with the `~` expanded: bash expands a `~` that starts a word, but not
    one after `=`, so `--config=~/cla-jax/configs/x.py` would reach us as a literal `~`."""
    expanded = []
    for arg in argv:
        name, sep, value = arg.partition("=")
        if arg.startswith("-") and sep and (value == "~" or value.startswith("~/")):
            arg = f"{name}={os.path.expanduser(value)}"
        expanded.append(arg)
    return expanded


def _parse_flags(argv):
    argv = _expand_home(argv)
    sys.path[1:1] = _config_package_roots(argv)
    try:
        rest = flags.FLAGS(argv)
    except (flags.Error, *CONFIG_PARSE_ERRORS) as error:
        _fail(error)  # e.g. --config.train.stepz=3, a config file that does not parse
    for name in flags.FLAGS:
        flag = flags.FLAGS[name]
        # ml_collections keeps a config file it could not load (e.g. --config=missing.py) as an
        # _ErrorConfig that raises a plain OSError on first use: report it here, as bad input.
        if type(flag.value).__name__ == "_ErrorConfig":
            cause = object.__getattribute__(flag.value, "_error")
            what = ("no such file" if "No such file" in str(cause) else cause)
            _fail(UserError(f"--{name}={flag.config_filename}: cannot load it ({what})"))
    if len(rest) > 1:
        _fail(UserError(f"unexpected arguments {rest[1:]}; flags are --name=value"))
    return rest


def is_out_of_memory(error: BaseException | None) -> bool:
    """XLA reports an allocation that does not fit as RESOURCE_EXHAUSTED (GPU: "Out of memory
    while trying to allocate"; TPU: "Ran out of memory in memory space hbm"), maybe as the
    cause of the error that reached us."""
    while error is not None:
        text = str(error)
        if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
            return True
        error = error.__cause__
    return False


def define_mesh_flag() -> None:
    """Defines --mesh, the device mesh a command runs on."""
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


def load_model(workdir, step, random_init: bool, config, seed: int = 0):
    """(step, run config, ModelConfig, mesh, params) for inference: a workdir's checkpoint
    (verified, onto --mesh or its own), or with random_init fresh params of `config`."""
    import jax  # noqa: PLC0415
    from flax import linen as nn  # noqa: PLC0415

    from cla_jax import checkpoint, sharding  # noqa: PLC0415
    from cla_jax.config import ModelConfig  # noqa: PLC0415
    from cla_jax.model import abstract_params, init_params  # noqa: PLC0415
    if random_init:
        if config is None:
            raise UserError("--random_init needs --config=configs/<file>.py")
        model, mesh = ModelConfig.from_dict(config.model), mesh_for(config)
        params = jax.jit(lambda: nn.meta.unbox(init_params(model, jax.random.key(seed))),
                         out_shardings=sharding.param_shardings(abstract_params(model), mesh))()
        return "random init", config, model, mesh, params
    if workdir is None:
        raise UserError("give --workdir (a training run) or --random_init --config=...")
    return checkpoint.restore_model(workdir, step, mesh_spec())


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
        raise UserError(
            f"jax.distributed could not start ({error}): outside a TPU pod, SLURM, Open MPI or "
            "Kubernetes job, give --coordinator_address=host:port --num_processes=N "
            "--process_id=i to every process") from error
    logging.info("process %d of %d, %d local devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count())


def start(main):
    """Runs an absl main and ends it with the exit codes at the top of this module."""
    def guarded(argv):
        if not flags.FLAGS["verbosity"].present:
            # jax.distributed, orbax and tfds log progress at INFO: noise a user cannot act on.
            logging.set_verbosity(logging.WARNING)
        try:
            initialize_distributed()
            return main(argv)
        except USER_ERRORS as error:
            _fail(error)
        except Exception as error:
            if not is_out_of_memory(error):
                raise  # Python prints the traceback and exits with EXIT_INTERNAL_ERROR
            logging.flush()
            traceback.print_exc()
            print(OUT_OF_MEMORY_HINT, file=sys.stderr)
            raise SystemExit(EXIT_OUT_OF_MEMORY) from None
    app.run(guarded, flags_parser=_parse_flags)
