"""Bad sampler settings are refused as UserErrors, and the edges of the valid ranges still
sample (top_p 1.0 and top_k = vocab_size are both no filter at all)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_model import make_config, make_params

from cla_jax.decoding import Sampling, generate, sample
from cla_jax.errors import UserError


@pytest.mark.parametrize("settings, message", [
    (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
    (dict(temperature=math.inf), "temperature must be a finite number >= 0"),
    (dict(temperature=math.nan), "temperature must be a finite number >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.7), r"top_p must be in \(0, 1\]"),
    (dict(top_p=-0.5), r"top_p must be in \(0, 1\]"),
    (dict(top_p=math.nan), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-1), "top_k must be >= 0"),
])
def test_bad_sampler_settings_are_refused(settings, message):
    with pytest.raises(UserError, match=message):
        Sampling(**settings)


def test_top_k_above_the_vocabulary_is_refused_before_compiling():
    config = make_config("cla2", "mqa", max_seq_len=16)
    params = make_params(config)
    with pytest.raises(UserError, match=f"top_k \\({config.vocab_size + 1}\\) exceeds"):
        generate(config, params, [[1, 2]], 4, Sampling(top_k=config.vocab_size + 1))


def test_top_p_one_and_top_k_equal_to_the_vocabulary_sample_as_no_filter():
    config = make_config("cla2", "mqa", max_seq_len=24)
    params = make_params(config)
    key = jax.random.key(7)
    unfiltered, _ = generate(config, params, [[1, 2], [3]], 12, Sampling(1.3), key)
    edges, _ = generate(config, params, [[1, 2], [3]], 12,
                        Sampling(1.3, top_k=config.vocab_size, top_p=1.0), key)
    assert edges.tolist() == unfiltered.tolist()
    logits = jnp.asarray(np.random.RandomState(0).randn(3, 11), jnp.float32)
    for seed in range(3):
        rng = jax.random.key(seed)
        assert (sample(logits, rng, Sampling(1.0, top_k=11, top_p=1.0))
                == sample(logits, rng, Sampling(1.0))).all()
