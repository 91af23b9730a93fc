"""The python and bash code blocks of the README and of the guides (docs/**/*.md) run as written.

Each block is run unless its file marks it, on the line after its closing fence:

    <!-- readme-test: not run: REASON -->   reported as a skip with that reason (pytest -ra)
    <!-- readme-test: server -->            started in the background for the blocks below
    <!-- readme-test: with the server -->   run while that server is up

A block runs in a sandbox: a folder of links to this checkout's files (so `python train.py`,
`configs/...` and `tests/fixtures/...` resolve as in a clone) whose `workdir/demo` is one tiny
run, built once for the module in place of `make demo`'s 4-minute training, and whose HOME
is empty (`~/.cache/cla-jax` is the sandbox's own). `python` and the `cla-*` commands are this
interpreter's. The one edit to a block's text: the server's port 8000 becomes a free port, so
that a busy 8000 on the machine cannot fail the test.
"""
from __future__ import annotations

import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import jax
import pytest
from etils import epath
from flax import linen as nn
from test_train import tiny_config

from cla_jax import ModelConfig
from cla_jax.adapt import write_first_step
from cla_jax.model import init_params

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# The README and every page of the documentation site: blocks moved from one to the other keep
# being run, with the same marks.
SOURCES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"^```(python|bash)\n(.*?)^```\n(?:<!-- readme-test: (.*?) -->\n)?",
                   re.S | re.M)
NOT_RUN = "not run: "
SERVER, WITH_SERVER = "server", "with the server"
# A user's own runs, and the built site, stay out.
KEEP_OUT = {".git", ".venv", "workdir", "runs", ".pytest_cache", "site"}
BLOCK_TIMEOUT_S = 180


def readme_blocks() -> list[tuple[str, int, str, str, str]]:
    """(file, line, language, code, mark) of every python/bash block, in order, file by file
    (file relative to the repository root)."""
    blocks = []
    for source in SOURCES:
        text, name = source.read_text(), source.relative_to(ROOT).as_posix()
        blocks += [(name, text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2),
                    m.group(3) or "") for m in BLOCK.finditer(text)]
    return blocks


BLOCKS = readme_blocks()


def block_id(block) -> str:
    source, line, language, code, _ = block
    return f"{source}:L{line}-{language}-{code.splitlines()[0][:40]}"


def script_name(source: str, line: int) -> str:
    """A file name for a block's script, unique across the sources."""
    return "block_" + re.sub(r"\W", "_", source.removesuffix(".md")) + f"_{line}"


def test_every_mark_is_known_and_every_server_block_has_its_server():
    marks = [mark for *_, mark in BLOCKS]
    assert all(m in ("", SERVER, WITH_SERVER) or m.startswith(NOT_RUN) for m in marks), marks
    assert (SERVER in marks) == (WITH_SERVER in marks)
    assert len(BLOCKS) >= 15  # the regex still finds the blocks
    # The blocks that really run (a mark may only excuse what cannot run on a CPU): today the
    # two config blocks, the serving snippet, serve.py and its curl and openai clients.
    assert sum(not mark.startswith(NOT_RUN) for *_, mark in BLOCKS) >= 6
    assert {source for source, *_ in BLOCKS} >= {"README.md", "docs/guides/serving.md"}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, corpus_glob):
    """A checkout-like folder whose workdir/demo is a tiny run (step 0 of a random model: the
    blocks need a run's layout, not a trained model's quality; byte tokenizer, one device)
    that fits the README's requests (prompt + 50 new tokens), and its environment."""
    root = tmp_path_factory.mktemp("readme")
    for entry in ROOT.iterdir():
        if entry.name not in KEEP_OUT:
            (root / entry.name).symlink_to(entry)
    (root / "home").mkdir()
    config = tiny_config(corpus_glob)
    config.model.max_seq_len = 64
    config.mesh.update(data=1, fsdp=-1, tensor=1)  # a user's one CPU device
    model = ModelConfig.from_dict(config.model)
    params = jax.jit(lambda: nn.meta.unbox(init_params(model, jax.random.key(0))))()
    write_first_step(epath.Path(root / "workdir" / "demo" / "checkpoints"), config,
                     jax.device_get(params), {})
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CLA_JAX_TRACEBACK")}
    # One device, as a user has; LLVM at level 0 as in the rest of the suite (conftest.py):
    # the blocks compile far more than they compute.
    env.update(HOME=str(root / "home"), XLA_FLAGS="--xla_backend_optimization_level=0",
               JAX_PLATFORMS="cpu",
               PATH=f"{pathlib.Path(sys.executable).parent}:{env['PATH']}")
    return root, env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_block(language: str, code: str, root: pathlib.Path, env: dict, name: str):
    if language == "python":
        script = root / f"{name}.py"
        script.write_text(code)
        command = [sys.executable, str(script)]
    else:
        command = ["bash", "-e", "-o", "pipefail", "-c", code]
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True,
                            timeout=BLOCK_TIMEOUT_S)
    assert result.returncode == 0, f"{code}\nexit {result.returncode}:\n{result.stderr[-3000:]}"
    return result


@pytest.mark.parametrize("block", [b for b in BLOCKS if b[4] not in (SERVER, WITH_SERVER)],
                         ids=block_id)
def test_readme_block_runs(block, request):
    source, line, language, code, mark = block
    if mark.startswith(NOT_RUN):
        pytest.skip(f"{source}:{line} {mark}")
    root, env = request.getfixturevalue("sandbox")
    run_block(language, code, root, env, script_name(source, line))


def test_the_server_blocks_run_against_the_served_demo(sandbox):
    """The serve.py block, started in the background; then the blocks that talk to it."""
    root, env = sandbox
    (server,) = [b for b in BLOCKS if b[4] == SERVER]
    clients = [b for b in BLOCKS if b[4] == WITH_SERVER]
    port = free_port()
    command = server[3].splitlines()[0].split("#")[0].strip()
    assert command == "python serve.py --workdir=workdir/demo", command
    process = subprocess.Popen(["bash", "-c", f"exec {command} --port={port}"], cwd=root,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        deadline, seen = time.monotonic() + BLOCK_TIMEOUT_S, []
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            seen.append(line)
            if line.startswith("serving demo") or process.poll() is not None:
                break
        assert seen[-1].startswith(f"serving demo (step 0) at http://127.0.0.1:{port}/v1"), \
            "".join(seen)[-3000:]
        for source, line, language, code, _ in clients:
            assert "127.0.0.1:8000" in code
            result = run_block(language, code.replace("127.0.0.1:8000", f"127.0.0.1:{port}"),
                               root, env, script_name(source, line))
            assert result.stdout.strip(), f"{source}:{line} printed nothing"
            assert '"error"' not in result.stdout, result.stdout  # curl exits 0 on a 400
    finally:
        process.terminate()
        process.wait(timeout=60)
