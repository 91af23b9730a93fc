"""Test setup: 8 virtual CPU devices, so sharding tests run on any machine.

XLA reads the flag once, when jax first initialises a backend, so it is set here, before any
test module imports jax.
"""
import os

# The suite compiles far more than it runs (hundreds of small programs, each run a few
# times), and LLVM's optimisation of the generated CPU code is most of a compile: level 0
# halves the suite's CPU time (e.g. an uptraining test 58 -> 36 s, the serving tests 110 ->
# 64 CPU-s). XLA's own HLO passes (fusion, buffer assignment, sharding) still run, so every
# memory and layout check sees the same program; results are still compared against
# references within the tests' tolerances.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The TPU and GPU compilers (libtpu, the CUDA plugin) for tests/test_aot.py: a folder of
# their own that `make test` installs, put on sys.path before jax starts.
from cla_jax.aot import stack  # noqa: E402 (imports no jax)

stack.prepare_process()

# Tests that train several runs of one config compile the same steps again and again: a
# persistent compilation cache for this session turns the repeats into cache hits.
import tempfile  # noqa: E402

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="cla-jax-xla-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")


import numpy as np  # noqa: E402
import pytest  # noqa: E402

WORDS = "the king and queen of a land far away spoke to every lord and lady there".split()


@pytest.fixture(scope="module")
def corpus_glob(tmp_path_factory):
    """A small text corpus (8 documents) as a `data.source`, for training tests."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.RandomState(0)
    for i in range(8):
        lines = [" ".join(rng.choice(WORDS, 9)) + "." for _ in range(40)]
        (root / f"doc{i}.txt").write_text(f"SPEAKER {i}:\n" + "\n".join(lines))
    return f"files:{root}/*.txt"


# The longest test files first: pytest-xdist's loadfile hands whole files to the worker that
# frees up, in collection order, so a long file collected last (alphabetically) would leave the
# other worker idle at the end. Longest first keeps both busy (longest-processing-time order).
# Rough CPU seconds per file on 2 cores, 2026-12-02; any file not listed runs after these.
LONGEST_FILES_FIRST = ("test_aot.py", "test_kv_map.py", "test_train.py", "test_serving.py", "test_sharding.py", "test_model.py",
                       "test_checkpoint_integrity.py", "test_gcs.py", "test_pareto.py",
                       "test_multiprocess.py", "test_adapt.py", "test_serve.py",
                       "test_serve_soak.py", "test_serve_limits.py", "test_readme.py",
                       "test_serve_chat.py",
                       "test_decoding.py", "test_lm_eval_parity.py", "test_lm_eval.py",
                       "test_eval_sources.py", "test_gguf_import.py", "test_hf_import.py",
                       "test_precision.py", "test_device_check.py", "test_pallas_attention.py",
                       "test_int8_cache.py", "test_loss.py", "test_attention.py",
                       "test_collectives.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order kept
