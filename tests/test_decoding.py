"""Decoding through the grouped cache against recomputing the whole forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from test_model import forward, make_config, make_params

import cla_jax
from cla_jax.decoding import Sampling, generate, sample
from cla_jax.model import transformer


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


# "xla" is the production kernel: what `auto` picks, except for half precision on a GPU.
@pytest.mark.parametrize("pattern,attention", [
    ("cla1", "reference"), ("cla2", "reference"), ("cla3_uneven", "reference"),
    ("nonuniform", "reference"), ("nonuniform", "xla")])
def test_greedy_through_cache_equals_recompute_with_ragged_prompts(pattern, attention):
    config = make_config(pattern, "mqa", max_seq_len=24, attention=attention)
    params = make_params(config, seed=1)
    prompts = [[5, 9, 2], [7, 1, 3, 3, 8, 4], [11]]
    out, cache = generate(config, params, prompts, 8, Sampling(temperature=0))
    for row, prompt in enumerate(prompts):
        assert out[row].tolist() == greedy_by_recomputing(config, params, prompt, 8)
    # One K and one V entry per layer group, none for a layer that reuses K/V.
    assert cla_jax.cache.num_entries(cache) == len(config.groups)
    assert cla_jax.kv_bytes(cache) == 3 * (6 + 8) * cla_jax.kv_bytes_per_token(config, 4)


@pytest.mark.parametrize("pattern", ["nonuniform"])  # three stages
def test_prefill_then_decode_with_the_production_kernel_matches_a_full_forward(pattern):
    """The xla kernel through the cache (ragged prompts, one token per step) against one full
    forward pass of the reference kernel."""
    config = make_config(pattern, "gqa", attention="xla")
    params = make_params(config, seed=3)
    tokens = np.random.RandomState(2).randint(0, config.vocab_size, (2, 10))
    positions = np.tile(np.arange(10), (2, 1))
    want, _ = forward(config.replace(attention="reference"), params, tokens, positions)

    lengths = np.array([3, 6])
    prompt = np.where(positions < lengths[:, None], tokens, 0)[:, :6]
    segment_ids = (positions[:, :6] < lengths[:, None]).astype(np.int32)  # 0 = padding
    logits, cache = forward(config, params, prompt, positions[:, :6], segment_ids,
                            cla_jax.init_cache(config, 2, 16))
    for b in range(2):
        np.testing.assert_allclose(logits[b, :lengths[b]], want[b, :lengths[b]], rtol=1e-5,
                                   atol=1e-5)
    for _ in range(10 - lengths.min()):
        pos = np.minimum(np.asarray(cache.lengths), 9)  # row 1 finishes early
        logits, cache = forward(config, params, tokens[np.arange(2), pos][:, None],
                                pos[:, None], None, cache)
        np.testing.assert_allclose(logits[:, 0], want[np.arange(2), pos], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(cache.lengths, [10, 10])


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
    return set(np.unique(jax.jit(jax.vmap(lambda k, row: sample(row[None], k, sampling)[0]))(
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


class XsYsStep(transformer.LayerStep):
    """Negative control, the old layout: a step's cache slices go into the stage's scan as
    xs and come out as ys, new buffers, so every decode step copies each stage's cache."""

    def __call__(self, carry, kv_slices, masks, positions_BT, outer_kv):
        x_BTD, step = carry
        one_step = tuple(tuple(a[None] for a in entry) for entry in kv_slices)
        (x_BTD, kv, _), _ = transformer.LayerStep.__call__(
            self, (x_BTD, one_step, jnp.int32(0)), masks, positions_BT, outer_kv)
        return (x_BTD, step + 1), tuple(tuple(a[0] for a in entry) for entry in kv)


def xs_ys_stage(config, stage, causal_only, kv_window, name):
    """A drop-in for `transformer.scanned_stage` (same params) built on `XsYsStep` (stages
    without exported K/V)."""
    scan = nn.scan(XsYsStep, variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=stage.steps,
                   metadata_params={nn.PARTITION_NAME: "layers"},
                   )(config, stage.layers, stage.exports, (), causal_only, kv_window, name=name)

    def call(carry, masks, positions_BT, outer_kv):
        x_BTD, stage_kv, step = carry
        (x_BTD, _), stage_kv = scan((x_BTD, step), stage_kv, masks, positions_BT, outer_kv)
        return (x_BTD, stage_kv, step), ()
    return call


def decode_temp_bytes(config, params, batch, max_new_tokens, cache_dtype="float32"):
    """Bytes of temporaries XLA's buffer assignment gives the whole compiled `generate`
    program (prefill and decode loop); its inputs and outputs (the final cache) not counted."""
    from cla_jax import decoding, sharding
    prompts, lengths = np.ones((batch, 1), np.int32), np.ones((batch,), np.int32)
    key = np.asarray(jax.random.key_data(jax.random.key(0)))
    compiled = decoding._generate.lower(config, max_new_tokens, Sampling(temperature=0), (),
                                        cache_dtype, sharding.single_device_mesh(),
                                        params, prompts, lengths, key).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("pattern,layout", [("cla2", "carry"), ("nonuniform", "carry"),
                                            ("cla2", "xs_ys")])
def test_decode_loop_writes_the_cache_in_place(pattern, layout, monkeypatch):
    """Each step writes only the new token's K/V into the stage caches, which the loop
    carries: buffer assignment then needs no temporary as large as a stage cache. Attention
    reads one group's K and V at a time (XLA may lay them out afresh for the matmuls), so the
    temporaries stay under 1.5 x one group's K + V; a copy of any stage cache (>= 1 group)
    adds at least that much again (measured: 1.2 x in place, >= 5 x for the xs -> ys scan)."""
    groups = {"cla2": dict(num_layers=8), "nonuniform": dict(num_layers=10,
                                                             group_sizes=(1, 2, 2, 2, 2, 1))}
    # Large K/V next to tiny weights and activations, so that the cache dominates.
    config = make_config(pattern, "mqa", max_seq_len=300, head_dim=64, attention="xla",
                         **groups[pattern])
    params, batch, length = make_params(config), 8, 257
    if layout == "xs_ys":
        monkeypatch.setattr(transformer, "scanned_stage", xs_ys_stage)
        batch = 6  # another shape, so jit traces the patched model instead of reusing one
    one_group_kv = 2 * batch * length * config.num_kv_heads * config.head_dim * 4
    temp = decode_temp_bytes(config, params, batch, length - 1)
    if layout == "carry":
        assert temp < 1.5 * one_group_kv, (temp, one_group_kv)
    else:
        assert temp > 2 * one_group_kv, (temp, one_group_kv)
