"""How the command lines end (cla_jax.cli): bad input is one `error:` line and exit 2, anything
else keeps its traceback (exit 1), and a device out of memory gets exit 3 and a hint; through
the real scripts, bad settings are refused before anything is written."""
import os
import subprocess
import sys
import textwrap

import pytest

from cla_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="", JAX_PLATFORMS="cpu")
ENV.pop("CLA_JAX_TRACEBACK", None)

# A script whose main fails as --fail_with says; jax is imported only for the XLA errors.
FAILING_MAIN = textwrap.dedent("""
    from absl import flags
    from ml_collections import config_flags

    from cla_jax import cli
    from cla_jax.errors import UserError

    flags.DEFINE_string("fail_with", None, "What main raises.")
    config_flags.DEFINE_config_file("config", None, "A config file.")

    def main(argv):
        kind = flags.FLAGS.fail_with
        if kind == "show_paths":
            print(flags.FLAGS.workdir, flags.FLAGS.config.train.steps)
            return
        if kind == "user_error":
            raise UserError("train.steps must be > 0;\\n set --config.train.steps")
        if kind == "missing_path":
            open("/nonexistent/prompts.txt")
        if kind == "bug":
            raise KeyError("stages")  # once reported as a user error, without its traceback
        import jax
        if kind == "xla":
            raise jax.errors.JaxRuntimeError("INTERNAL: collective operation timed out")
        if kind == "oom":
            raise jax.errors.JaxRuntimeError(
                "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 12.00GiB.")

    cli.start(main)
""")


def run(args, **kwargs):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300, **kwargs)


def assert_one_error_line(result, *words):
    assert result.returncode == cli.EXIT_USER_ERROR, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0]


@pytest.fixture(scope="module")
def failing_main(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "failing_main.py"
    path.write_text(FAILING_MAIN)
    return str(path)


@pytest.mark.parametrize("kind, words", [
    ("user_error", ["train.steps must be > 0; set --config.train.steps"]),
    ("missing_path", ["/nonexistent/prompts.txt"]),
])
def test_a_user_error_is_one_line_and_exit_2(failing_main, kind, words):
    assert_one_error_line(run([failing_main, f"--fail_with={kind}"]), *words)


def test_a_tilde_after_the_equals_sign_is_the_home_directory(failing_main, tmp_path):
    """bash leaves `~` alone after `=`: the command lines expand it themselves."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny.py").write_text(
        "import ml_collections\n\ndef get_config():\n"
        "    return ml_collections.ConfigDict({'train': {'steps': 7}})\n")
    result = subprocess.run(
        [sys.executable, failing_main, "--fail_with=show_paths", "--config=~/configs/tiny.py",
         "--workdir=~/runs/x"], cwd=ROOT, env={**ENV, "HOME": str(tmp_path)},
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [str(tmp_path / "runs" / "x"), "7"]


def test_a_config_file_that_does_not_load_is_one_line_and_exit_2(failing_main):
    result = run([failing_main, "--config=no_such_config.py"])
    assert_one_error_line(result, "--config=no_such_config.py", "no such file")


@pytest.mark.parametrize("kind, message", [
    ("bug", "KeyError: 'stages'"),
    ("xla", "INTERNAL: collective operation timed out"),
])
def test_an_internal_failure_keeps_its_traceback_and_exit_1(failing_main, kind, message):
    result = run([failing_main, f"--fail_with={kind}"])
    assert result.returncode == cli.EXIT_INTERNAL_ERROR, result.stderr[-3000:]
    assert "Traceback (most recent call last)" in result.stderr and message in result.stderr
    assert "error: " not in result.stderr and cli.OUT_OF_MEMORY_HINT not in result.stderr


def test_out_of_memory_keeps_its_traceback_and_names_the_settings_to_lower(failing_main):
    result = run([failing_main, "--fail_with=oom"])
    assert result.returncode == cli.EXIT_OUT_OF_MEMORY, result.stderr[-3000:]
    assert "Traceback (most recent call last)" in result.stderr
    assert "RESOURCE_EXHAUSTED" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == cli.OUT_OF_MEMORY_HINT


def test_exit_codes_are_distinct_and_out_of_memory_is_recognised():
    assert len({0, cli.EXIT_INTERNAL_ERROR, cli.EXIT_USER_ERROR, cli.EXIT_OUT_OF_MEMORY}) == 4
    assert cli.is_out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: XLA:TPU compile permanent "
                                             "error. Ran out of memory in memory space hbm."))
    assert cli.is_out_of_memory(RuntimeError("Out of memory while trying to allocate 8 bytes"))
    assert not cli.is_out_of_memory(RuntimeError("INTERNAL: collective operation timed out"))
    wrapped = RuntimeError("saving the checkpoint failed")
    wrapped.__cause__ = RuntimeError("RESOURCE_EXHAUSTED: Out of memory")
    assert cli.is_out_of_memory(wrapped)
    for name in ("train.batch_size", "train.grad_accum_steps", "model.remat", "--mesh fsdp",
                 "--batch_size", "--cache_dtype"):
        assert name in cli.OUT_OF_MEMORY_HINT


def test_a_bad_learning_rate_is_refused_before_the_workdir_or_cache_is_written(
        tmp_path, corpus_glob):
    workdir, cache = tmp_path / "run", tmp_path / "cache"
    result = run(["train.py", "--config=configs/default.py", "--config.train.learning_rate=-1",
                  f"--config.data.source={corpus_glob}", "--config.data.tokenizer=byte",
                  f"--workdir={workdir}", f"--cache_dir={cache}"])
    assert_one_error_line(result, "train.learning_rate")
    assert not workdir.exists() and not cache.exists()


@pytest.mark.parametrize("setting, words", [
    ("--top_p=1.7", ["top_p", "1.7"]),
    ("--top_p=0", ["top_p"]),
    ("--temperature=-1", ["temperature", "-1"]),
    ("--top_k=4097", ["top_k", "4097", "vocab_size (4096)"]),  # configs/default.py's vocab
])
def test_generate_refuses_bad_sampler_settings(tmp_path, setting, words):
    result = run(["generate.py", "--random_init", "--config=configs/default.py",
                  "--config.data.tokenizer=byte", f"--cache_dir={tmp_path}", "--prompt=x",
                  "--max_new_tokens=2", setting])
    assert_one_error_line(result, *words)
