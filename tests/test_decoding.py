"""Decoding through the grouped cache against recomputing the whole forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cla_jax
from cla_jax.decoding import Sampling, generate, sample
from test_model import forward, make_config, make_params


def greedy_by_recomputing(config, params, prompt, steps):
    """The independent loop: run the full sequence again for every new token (right-padded to
    one length, which a causal model ignores, so it compiles once)."""
    tokens = list(prompt)
    length = config.max_seq_len
    for _ in range(steps):
        t = np.zeros((1, length), np.int32)
        t[0, :len(tokens)] = tokens
        logits, _ = forward(config, params, t, np.arange(length)[None])
        tokens.append(int(np.argmax(logits[0, len(tokens) - 1])))
    return tokens[len(prompt):]


@pytest.mark.parametrize("pattern", ["cla1", "cla2", "cla3_uneven", "nonuniform"])
def test_greedy_through_cache_equals_recompute_with_ragged_prompts(pattern):
    config = make_config(pattern, "mqa", max_seq_len=24)
    params = make_params(config, seed=1)
    prompts = [[5, 9, 2], [7, 1, 3, 3, 8, 4], [11]]
    out, cache = generate(config, params, prompts, 8, Sampling(temperature=0))
    for row, prompt in enumerate(prompts):
        assert out[row].tolist() == greedy_by_recomputing(config, params, prompt, 8)
    # One K and one V entry per layer group, none for a layer that reuses K/V.
    assert cla_jax.cache.num_entries(cache) == len(config.groups)
    assert cla_jax.kv_bytes(cache) == 3 * (6 + 8) * cla_jax.kv_bytes_per_token(config, 4)


def test_eos_ends_one_sequence_and_leaves_the_others_alone():
    config = make_config("cla2", "gqa", max_seq_len=24)
    params = make_params(config, seed=2)
    prompts = [[5, 9, 2], [7, 1, 3, 3]]
    free, _ = generate(config, params, prompts, 10, Sampling(temperature=0))
    eos = int(free[0, 3])  # the token row 0 emits at its fourth step
    first = int(np.flatnonzero(np.asarray(free[0]) == eos)[0])
    stopped, _ = generate(config, params, prompts, 10, Sampling(temperature=0), eos_id=eos)
    assert stopped[0, :first + 1].tolist() == free[0, :first + 1].tolist()
    assert (np.asarray(stopped[0, first + 1:]) == 0).all()  # only padding after EOS
    if eos not in free[1].tolist():
        assert stopped[1].tolist() == free[1].tolist()


def test_fixed_seed_gives_the_same_sample_and_another_seed_another():
    config = make_config("cla2", "mqa", max_seq_len=40)
    params = make_params(config)
    s = Sampling(temperature=1.5, top_k=20, top_p=0.95)
    a, _ = generate(config, params, [[1, 2]], 30, s, jax.random.key(3))
    b, _ = generate(config, params, [[1, 2]], 30, s, jax.random.key(3))
    c, _ = generate(config, params, [[1, 2]], 30, s, jax.random.key(4))
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()


def support(logits, sampling, draws=3000):
    keys = jax.random.split(jax.random.key(0), draws)
    batch = jnp.broadcast_to(logits, (draws, logits.shape[-1]))
    return set(np.unique(jax.jit(jax.vmap(lambda k, l: sample(l[None], k, sampling)[0]))(
        keys, batch)).tolist())


def numpy_top_p_set(logits, p):
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    kept, mass = [], 0.0
    for i in order:  # smallest set of most likely tokens whose mass reaches p
        kept.append(int(i))
        mass += probs[i]
        if mass >= p:
            break
    return set(kept)


@pytest.mark.parametrize("p", [0.3, 0.6, 0.9])
def test_top_p_keeps_the_smallest_set_reaching_p(p):
    logits = np.log(np.array([0.05, 0.4, 0.1, 0.25, 0.2], np.float32))
    assert support(jnp.asarray(logits), Sampling(1.0, 0, p)) == numpy_top_p_set(logits, p)


def test_top_k_one_is_greedy_and_top_k_limits_the_support():
    logits = jnp.asarray(np.random.RandomState(0).randn(4, 11), jnp.float32)
    greedy = sample(logits, jax.random.key(0), Sampling(temperature=0))
    for seed in range(5):
        assert (sample(logits, jax.random.key(seed), Sampling(2.0, top_k=1)) == greedy).all()
    top3 = set(np.argsort(-np.asarray(logits[0]))[:3].tolist())
    assert support(logits[0], Sampling(3.0, top_k=3)) == top3


def test_bad_prompts_are_refused_with_a_clear_message():
    config = make_config("cla2", "mqa", max_seq_len=16)
    params = make_params(config)
    with pytest.raises(ValueError, match="at least one token"):
        generate(config, params, [[1], []], 4)
    with pytest.raises(ValueError, match=r"outside the model's vocabulary \[0, 61\)"):
        generate(config, params, [[1, 61]], 4)
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len"):
        generate(config, params, [[1] * 10], 7)


@pytest.mark.parametrize("pattern,ratio", [("cla1", 1.0), ("cla2", 2.0), ("cla3_uneven", 2.5),
                                           ("nonuniform", 6 / 4)])
def test_capacity_counts_cached_tokens_from_the_cache_shapes(pattern, ratio):
    from cla_jax.capacity import capacity
    config = make_config(pattern, "gqa")
    budget, context = 10_000_000, 32
    report = capacity(config, budget, context, "bfloat16")
    # By hand: K and V x 2 KV heads x 12 dims x 2 bytes per producing layer.
    per_token = 2 * 2 * 12 * 2 * len(config.groups)
    twin_per_token = 2 * 2 * 12 * 2 * config.num_layers
    assert report["cla"]["bytes_per_token"] == per_token
    assert report["no_cla"]["bytes_per_token"] == twin_per_token
    assert report["cla"]["max_cached_tokens"] == budget // per_token
    assert report["cla"]["max_batch_at_context"] == budget // (per_token * context)
    assert report["capacity_ratio"] == pytest.approx(ratio, rel=1e-3)


@pytest.mark.parametrize("pattern", ["cla2", "nonuniform"])
def test_decode_loop_writes_the_cache_in_place(pattern):
    """Each step writes only the new token's K/V: the compiled program copies no stage cache,
    except once when the empty cache is created (the old xs -> ys scan copied every stage's
    cache twice per step, for K and for V)."""
    from cla_jax import decoding, sharding

    config = make_config(pattern, "mqa", max_seq_len=48)
    params = make_params(config)
    prompts, lengths = np.ones((3, 8), np.int32), np.full((3,), 8, np.int32)
    key = np.asarray(jax.random.key_data(jax.random.key(0)))
    hlo = decoding._generate.lower(config, 16, Sampling(temperature=0), -1, "float32",
                                   sharding.single_device_mesh(), params, prompts, lengths,
                                   key).compile().as_text()
    stage_shapes = {f"f32[{groups},3,24,1,12]" for _, groups in config.stages}
    copies = [line for line in hlo.splitlines() if " copy(" in line
              and any(shape in line.split("copy(")[0] for shape in stage_shapes)]
    # At most the one-off copies that materialise the zero-initialised K and V of each stage.
    assert len(copies) <= 2 * len(config.stages), "\n".join(copies)
