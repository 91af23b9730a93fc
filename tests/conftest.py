"""Test setup: 8 virtual CPU devices, so sharding tests run on any machine.

XLA reads the flag once, when jax first initialises a backend, so it is set here, before any
test module imports jax.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
