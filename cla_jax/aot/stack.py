"""The compile stacks: libtpu for TPU targets, the CUDA PJRT plugin and cuDNN for GPU targets,
pinned to the installed jax, kept apart from the environment every other command runs in.

Installed into the environment itself, both plugins make every `import jax` on a machine
without the hardware print a CUDA traceback and libtpu warnings. So by default they live in
a folder of their own (`<venv>/compile-stack`, or $CLA_COMPILE_STACK), which only
`cla-compile` (and the tests that compile for targets) put on sys.path, before jax starts:

    python -m cla_jax.aot.stack install            # pins derived from the installed jax
    python -m cla_jax.aot.stack check              # what is there, what is missing

A stack installed into the environment the usual way (`pip install "jax[tpu,cuda12-local]"`)
is found too. The pins come from jax's own metadata: `jax[tpu]` names its libtpu, and the
CUDA plugin and its PJRT runtime carry jax's version.
"""
from __future__ import annotations

import importlib.metadata
import os
import pathlib
import re
import subprocess
import sys

ENV_DIR = "CLA_COMPILE_STACK"
# Set to 1 to compile with a stack whose version differs from jax's pin (e.g. MaxText's
# environment: jax 0.12.0.1 with libtpu 0.0.52); missing packages are still an error.
ENV_ALLOW_MISMATCH = "CLA_ALLOW_STACK_MISMATCH"
CUDNN = "nvidia-cudnn-cu12>=9.8,<10"  # what jax-cuda12-plugin[with-cuda] asks for


class StackError(RuntimeError):
    """The compile stack for a platform is missing or does not match the installed jax."""


def stack_dir() -> pathlib.Path:
    """Where the compile stack (libtpu, the CUDA plugin) is installed: $CLA_COMPILE_STACK or
    <venv>/compile-stack."""
    return pathlib.Path(os.environ.get(ENV_DIR) or pathlib.Path(sys.prefix) / "compile-stack")


def prepare_process() -> None:
    """Before jax is imported: run jax on the host CPU, let compile-only TPU and GPU devices
    be created, and put the stack's folder first on sys.path. Several processes may each
    load libtpu (its lock file otherwise admits one per machine), and libtpu does not ask a
    cloud metadata server which TPU this host is (it is none)."""
    if "jax" in sys.modules and not os.environ.get("JAX_PLATFORMS"):
        raise StackError("cla_jax.aot.stack.prepare_process() must run before jax is imported")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    folder = stack_dir()
    if folder.is_dir() and str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
        importlib.invalidate_caches()


def pins() -> dict[str, str]:
    """Package -> requirement, for the installed jax."""
    version = importlib.metadata.version("jax")
    libtpu = next((re.sub(r"\s*;.*", "", r) for r in importlib.metadata.requires("jax") or ()
                   if r.startswith("libtpu") and 'extra == "tpu"' in r), None)
    found = {"jax-cuda12-plugin": f"jax-cuda12-plugin=={version}",
             "jax-cuda12-pjrt": f"jax-cuda12-pjrt=={version}",
             "nvidia-cudnn-cu12": CUDNN}
    if libtpu:
        found["libtpu"] = libtpu.replace(" ", "")
    return found


def install_command(target: pathlib.Path | None = None) -> list[str]:
    """The pip command that installs the pinned compile stack into `target`."""
    target = target or stack_dir()
    return [sys.executable, "-m", "pip", "install", "--quiet", "--upgrade", "--target",
            str(target), *pins().values()]


def _installed_version(package: str) -> str | None:
    """The version of `package` in the stack folder or the environment."""
    for dist in importlib.metadata.distributions(path=[str(stack_dir()), *sys.path]):
        if (dist.metadata["Name"] or "").lower().replace("_", "-") == package:
            return dist.version
    return None


def _matches(requirement: str, version: str) -> bool:
    wanted = re.split(r"==", requirement)[-1]
    if wanted.endswith(".*"):
        return version.startswith(wanted[:-1])
    return version == wanted


def check(platform: str) -> None:
    """Raises StackError, naming the pin to install, unless `platform`'s compile stack is
    present and matches the installed jax ("tpu" or "gpu")."""
    wanted = pins()
    packages = (["libtpu"] if platform == "tpu" else
                ["jax-cuda12-plugin", "jax-cuda12-pjrt", "nvidia-cudnn-cu12"])
    if platform == "tpu" and "libtpu" not in wanted:
        raise StackError(f"jax {importlib.metadata.version('jax')} names no libtpu for its "
                         "'tpu' extra: compiling for TPU needs a jax release that does")
    problems = []
    for package in packages:
        version = _installed_version(package)
        if version is None:
            problems.append(f"{package} is not installed")
        elif package != "nvidia-cudnn-cu12" and not _matches(wanted[package], version) and \
                os.environ.get(ENV_ALLOW_MISMATCH) != "1":
            problems.append(f"{package} {version} does not match jax "
                            f"{importlib.metadata.version('jax')} (it needs {wanted[package]})")
    if problems:
        command = " ".join(install_command()[2:])
        raise StackError(f"cannot compile for {platform.upper()}: {'; '.join(problems)}. "
                         f"Install the pinned stack with `python -m cla_jax.aot.stack install` "
                         f"(= python -m {command}), or `make compile-stack` in a checkout; "
                         f"{ENV_ALLOW_MISMATCH}=1 compiles with a mismatched version anyway")


def main(argv: list[str] | None = None) -> int:
    """`python -m cla_jax.aot.stack install [DIR]`: installs the compile stack."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["install"]:
        target = pathlib.Path(argv[1]) if len(argv) > 1 else stack_dir()
        print(f"installing the compile stack into {target}: {', '.join(pins().values())}")
        return subprocess.call(install_command(target))
    if argv[:1] == ["check"]:
        status = 0
        for platform in ("tpu", "gpu"):
            try:
                check(platform)
                print(f"{platform}: ok ({stack_dir()})")
            except StackError as error:
                print(f"{platform}: {error}")
                status = 1
        return status
    print("usage: python -m cla_jax.aot.stack install [DIR] | check", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
