"""The per-row sampler against numpy: temperature, top-k, top-p (at exact mass boundaries),
their composition, and rows with different settings in one call."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cla_jax.sampling import filter_logits, sample_rows

DRAWS = 20_000


def np_softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


@jax.jit
def _draw(logits_V, keys, temperature, top_k, top_p):
    n = keys.shape[0]
    full = lambda v, dtype: jnp.full((n,), v, dtype)  # noqa: E731
    return sample_rows(jnp.broadcast_to(logits_V, (n, logits_V.shape[0])), keys,
                       full(temperature, jnp.float32), full(top_k, jnp.int32),
                       full(top_p, jnp.float32))[0]


def frequencies(logits, temperature=1.0, top_k=0, top_p=1.0, seed=0):
    keys = jax.random.split(jax.random.key(seed), DRAWS)
    tokens = np.asarray(_draw(jnp.asarray(logits, jnp.float32), keys, temperature, top_k,
                              top_p))
    return np.bincount(tokens, minlength=len(logits)) / DRAWS


def assert_matches(freq, probs):
    """Every token's frequency within 5 standard errors of its probability (a token of
    probability 0 must never be drawn)."""
    se = np.sqrt(probs * (1 - probs) / DRAWS)
    assert np.all(np.abs(freq - probs) <= 5 * se + 1e-12), (freq, probs)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_is_applied(temperature):
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0])
    want = np_softmax(logits / temperature)
    assert_matches(frequencies(logits, temperature), want)
    # The two temperatures are far apart: the check above tells them apart.
    other = np_softmax(logits / (2.5 - temperature))
    assert np.abs(want - other).max() > 10 * np.sqrt(0.25 / DRAWS)


def test_top_k_and_top_p_compose():
    probs = np.array([0.05, 0.30, 0.10, 0.25, 0.20, 0.10])
    logits = np.log(probs)
    # top-k 3 keeps {1, 3, 4} (0.30, 0.25, 0.20); top-p 0.6 over their renormalised mass
    # (0.40, 0.33, 0.27) keeps the smallest prefix reaching 0.6: {1, 3}.
    kept = np.zeros_like(probs)
    kept[[1, 3]] = probs[[1, 3]]
    assert_matches(frequencies(logits, 1.0, top_k=3, top_p=0.6), kept / kept.sum())


@pytest.mark.parametrize("top_p,support", [
    (0.5, [0]),              # the top token's mass is exactly 0.5: it alone reaches it
    (0.75, [0, 1]),          # 0.5 + 0.25 is exactly 0.75
    (0.75 + 5e-7, [0, 1]),   # within the stated tolerance (1e-6) of the boundary
    (0.76, [0, 1, 2]),
    (0.875, [0, 1, 2]),      # 0.5 + 0.25 + 0.125
    (1.0, [0, 1, 2, 3, 4]),  # off
])
def test_top_p_at_exact_mass_boundaries(top_p, support):
    probs = np.array([0.5, 0.25, 0.125, 0.0625, 0.0625])
    kept = np.zeros_like(probs)
    kept[support] = probs[support]
    assert_matches(frequencies(np.log(probs), 1.0, top_p=top_p), kept / kept.sum())


def test_each_row_keeps_its_own_settings():
    rng = np.random.RandomState(0)
    logits = jnp.asarray(rng.randn(5, 50) * 2, jnp.float32)
    temperature = jnp.array([0.0, 5.0, 1.0, 1.0, 0.7], jnp.float32)
    top_k = jnp.array([0, 1, 0, 4, 0], jnp.int32)
    top_p = jnp.array([1.0, 1.0, 0.2, 1.0, 1.0], jnp.float32)
    out = np.asarray(filter_logits(logits, temperature, top_k, top_p))
    x = np.asarray(logits)
    order = np.argsort(-x, axis=-1)
    assert np.array_equal(out[0], x[0])                       # greedy: unscaled
    assert np.isfinite(out[1]).sum() == 1 and np.isfinite(out[1, order[1, 0]])
    nucleus = np.cumsum(np_softmax(x[2])[order[2]])
    assert np.isfinite(out[2]).sum() == np.searchsorted(nucleus, 0.2) + 1
    assert set(np.flatnonzero(np.isfinite(out[3]))) == set(order[3, :4])
    np.testing.assert_allclose(out[4], x[4] / 0.7, rtol=1e-6)  # no filter at all
    # An unfiltered row comes out the same whether or not another row filters.
    alone = filter_logits(logits[4:], temperature[4:], top_k[4:], top_p[4:])
    assert np.array_equal(np.asarray(alone)[0], out[4])

    keys = jax.random.split(jax.random.key(1), 5)
    tokens, logprobs = sample_rows(logits, keys, temperature, top_k, top_p)
    tokens = np.asarray(tokens)
    assert tokens[0] == order[0, 0] and tokens[1] == order[1, 0]
    assert np.isfinite(out[np.arange(5), tokens]).all()
    # The log-probability is the model's own, before temperature and filters.
    log_softmax = x - x.max(-1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
    np.testing.assert_allclose(logprobs, log_softmax[np.arange(5), tokens], rtol=1e-5)
    # A row's token depends only on its logits, settings and key.
    for row in range(5):
        one = sample_rows(logits[row:row + 1], keys[row:row + 1], temperature[row:row + 1],
                          top_k[row:row + 1], top_p[row:row + 1])[0]
        assert int(one[0]) == tokens[row]
