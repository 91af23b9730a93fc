"""The int8 KV cache: quantisation error bound, layout, exact byte counts, decoding with it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_decoding import decode_temp_bytes
from test_model import forward, make_config, make_params
from test_precision import decode_teacher_forced

import cla_jax
from cla_jax.cache import dequantize, quantize
from cla_jax.capacity import capacity, without_cla
from cla_jax.decoding import Sampling, generate

BF16_EPS = 2.0 ** -7  # bfloat16's spacing at 1: a scale rounded up grows by less than this


def numpy_absmax_scale(x_KH):
    """The ideal per-(token, head) scale over head_dim, in float64."""
    return np.abs(np.asarray(x_KH, np.float64)).max(axis=-1) / 127


def check_int8_bound(x_KH, q_KH, scale_K):
    """The stated bound: absmax/127 <= scale < absmax/127 (1 + 2^-7), and every element within
    scale/2 of its dequantised value (float32 division adds ~1e-7 relative)."""
    x = np.asarray(x_KH, np.float64)
    scale = np.asarray(scale_K.astype(jnp.float32), np.float64)
    ideal = numpy_absmax_scale(x)
    assert np.all(scale >= ideal * (1 - 1e-7)), "a scale was rounded down: values would clip"
    assert np.all(scale <= ideal * (1 + BF16_EPS)), "a scale is larger than rounding up needs"
    error = np.abs(x - np.asarray(q_KH, np.float64) * scale[..., None])
    assert np.all(error <= scale[..., None] / 2 * (1 + 1e-6) + 1e-30), error.max()
    return error


def test_quantize_is_within_half_a_step_of_the_stored_scale():
    rng = np.random.RandomState(0)
    # Heads of very different ranges (1e-3 ... 1e3), one all-zero (token, head).
    x = rng.standard_normal((3, 7, 4, 64)) * 10.0 ** rng.randint(-3, 4, (3, 7, 4, 1))
    x[1, 2, 3] = 0
    x = x.astype(np.float32)
    q, scale = quantize(x)
    assert q.shape == x.shape and q.dtype == jnp.int8
    assert scale.shape == x.shape[:-1] and scale.dtype == jnp.bfloat16
    error = check_int8_bound(x, q, scale)
    # The head's largest element maps to +-127 (no range wasted), the zero head to zeros.
    peak = np.abs(np.asarray(q, np.int32)).max(-1)
    peak[1, 2, 3] = 127
    assert peak.min() >= 126
    assert np.all(np.asarray(q[1, 2, 3]) == 0) and error[1, 2, 3].max() == 0
    # Round to nearest, not truncation: errors spread over +-scale/2 with mean near zero.
    scale_f32 = np.asarray(scale.astype(jnp.float32))[..., None]
    scaled = error / np.where(scale_f32 > 0, scale_f32, 1)
    assert scaled.max() > 0.45 and abs(float(np.mean((x - np.asarray(q) * scale_f32)
                                                   / np.where(scale_f32 > 0, scale_f32, 1)))) < 0.01
    np.testing.assert_allclose(np.asarray(dequantize(q, scale, jnp.float32)), x,
                               rtol=0, atol=float(np.asarray(scale.astype(jnp.float32)).max()))


def test_int8_cache_layout_keeps_batch_and_slot_axes_on_every_leaf():
    config = make_config("nonuniform", "gqa")  # three stages
    for dtype in (jnp.int8, "int8"):
        cache = cla_jax.init_cache(config, 3, 20, dtype)
        for stage, (_, groups) in zip(cache.stages, config.stages):
            assert stage.quantized
            kv = (groups, 3, 20, config.num_kv_heads, config.head_dim)
            assert stage.key.shape == stage.value.shape == kv and stage.key.dtype == jnp.int8
            assert stage.key_scale.shape == stage.value_scale.shape == kv[:4]
            assert stage.key_scale.dtype == jnp.bfloat16
            for leaf in jax.tree_util.tree_leaves(stage):
                assert leaf.shape[:3] == (groups, 3, 20)  # [groups, batch, slots, ...]
    float_stage = cla_jax.init_cache(config, 3, 20).stages[0]
    assert not float_stage.quantized and len(jax.tree_util.tree_leaves(float_stage)) == 2
    with pytest.raises(cla_jax.errors.UserError, match="int8"):
        cla_jax.init_cache(config, 3, 20, jnp.int32)


@pytest.mark.parametrize("pattern,kv", [("cla1", "mha"), ("cla2", "mqa"), ("nonuniform", "gqa")])
def test_kv_bytes_and_capacity_count_int8_and_scales_exactly(pattern, kv):
    config = make_config(pattern, kv)
    k, h = config.num_kv_heads, config.head_dim

    def per_token(cfg):  # K and V: kv_heads x (head_dim int8 bytes + one bfloat16 scale)
        return len(cfg.groups) * 2 * k * (h * 1 + 2)

    cache = cla_jax.init_cache(config, 3, 20, jnp.int8)
    assert cla_jax.kv_bytes(cache) == 3 * 20 * per_token(config)
    shapes = jax.eval_shape(lambda: cla_jax.init_cache(config, 3, 20, jnp.int8))
    assert cla_jax.kv_bytes(shapes) == 3 * 20 * per_token(config)

    budget, context = 10**6, 16
    report = capacity(config, budget, context, "int8")
    twin = without_cla(config)
    for name, cfg in (("cla", config), ("no_cla", twin)):
        assert report[name]["bytes_per_token"] == per_token(cfg)
        assert report[name]["max_cached_tokens"] == budget // per_token(cfg)
        assert report[name]["max_batch_at_context"] == budget // (per_token(cfg) * context)
    # Against the 16-bit cache: (head_dim + 2) / (2 head_dim) of its bytes.
    bf16 = capacity(config, budget, context, "bfloat16")["cla"]["bytes_per_token"]
    assert bf16 * (h + 2) == report["cla"]["bytes_per_token"] * 2 * h


def test_prefill_writes_the_quantised_kv_of_the_float_cache():
    """The first group's K/V (computed from the embeddings alone, so the same in both runs) in
    an int8 cache after prefill, dequantised, against the float32 cache's: within the bound."""
    config = make_config("cla2", "gqa", attention="xla", max_seq_len=24)
    params = make_params(config, seed=2)
    tokens = np.random.RandomState(1).randint(0, config.vocab_size, (2, 9))
    positions = np.tile(np.arange(9), (2, 1))
    _, exact = forward(config, params, tokens, positions, None, cla_jax.init_cache(config, 2, 16))
    _, cache = forward(config, params, tokens, positions, None,
                       cla_jax.init_cache(config, 2, 16, jnp.int8))
    stage, ref = cache.stages[0], exact.stages[0]
    for q, s, x in ((stage.key, stage.key_scale, ref.key), (stage.value, stage.value_scale,
                                                          ref.value)):
        check_int8_bound(x[0, :, :9], q[0, :, :9], s[0, :, :9])
        assert np.all(np.asarray(q[:, :, 9:]) == 0)  # unwritten slots stay empty
    np.testing.assert_array_equal(cache.lengths, [9, 9])


def test_int8_cache_decodes_close_to_float32():
    """Prefill 4 tokens, then one given token per step, against a float32 forward (no cache).

    Each K/V element moves by at most absmax/254 (0.4% of its head's range; rms ~0.23%), once;
    through 4 layers the logits move by about 1% of their largest magnitude (measured 0.9%
    here), so 3% bounds it, and greedy choices agree wherever the float32 top-two margin
    exceeds twice the error (measured: 124 of 128 agree)."""
    config = make_config("cla2", "mqa", attention="xla", max_seq_len=40)
    params = make_params(config, seed=1)
    tokens = np.random.RandomState(0).randint(0, config.vocab_size, (4, 32))
    want, _ = forward(config, params, tokens, np.tile(np.arange(32), (4, 1)))
    want = np.asarray(want)
    got, cache = decode_teacher_forced(config, params, tokens, 4, jnp.int8)
    assert cache.stages[0].key.dtype == jnp.int8
    error = np.abs(got - want)
    assert error.max() <= 0.03 * np.abs(want).max(), error.max() / np.abs(want).max()
    assert error.max() > 1e-3 * np.abs(want).max()  # it did quantise (float32 cache: ~1e-7)
    top2 = np.sort(want, axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 2 * error.max()
    assert np.all(got.argmax(-1)[clear] == want.argmax(-1)[clear])
    assert clear.mean() > 0.5


# Every attention kind and sharing factor once (CLA2-MQA, the demo's, is decoded above).
@pytest.mark.parametrize("pattern,kv", [("cla1", "mha"), ("cla2", "gqa"), ("cla3_uneven", "mqa")])
def test_generate_with_an_int8_cache_for_every_attention_and_cla(pattern, kv):
    config = make_config(pattern, kv, max_seq_len=16, attention="xla")
    prompts = [[5, 9, 2], [7, 1, 3, 3, 8, 4]]
    out, cache = generate(config, make_params(config, seed=1), prompts, 5,
                          Sampling(temperature=0), cache_dtype="int8")
    assert np.asarray(out).shape == (2, 5) and np.asarray(out).max() < config.vocab_size
    np.testing.assert_array_equal(cache.lengths, [3 + 5, 6 + 5])
    assert sum(stage.key.shape[0] for stage in cache.stages) == len(config.groups)
    # Exactly the slots below each row's length hold a token (a nonzero scale): the prefill's
    # padding past the short prompt was overwritten by its decoded tokens, nothing beyond.
    filled_BS = np.arange(11)[None, :] < np.asarray(cache.lengths)[:, None]
    scales = [s for stage in cache.stages for s in (stage.key_scale, stage.value_scale)]
    for scale_GBSK in scales:
        written_GBSK = np.asarray(scale_GBSK.astype(jnp.float32)) > 0
        np.testing.assert_array_equal(written_GBSK, np.broadcast_to(
            filled_BS[None, :, :, None], written_GBSK.shape))


def test_int8_decode_loop_writes_the_cache_in_place():
    """As test_decoding's in-place check, with an int8 cache of 16 groups: its temporaries are
    the dequantised float32 K and V of one group (1.2 x measured, as for a float32 cache),
    while a copy of the stage's int8 cache (16 x (64 + 2) / (4 x 64) = 4.1 float32 groups)
    would add more than four times that."""
    config = make_config("cla2", "mqa", max_seq_len=300, head_dim=64, attention="xla",
                         num_layers=32)
    params, batch, length = make_params(config), 8, 257
    one_group_float32_kv = 2 * batch * length * config.num_kv_heads * config.head_dim * 4
    stage_int8 = 16 * 2 * batch * length * config.num_kv_heads * (config.head_dim + 2)
    assert stage_int8 > 4 * one_group_float32_kv
    temp = decode_temp_bytes(config, params, batch, length - 1, cache_dtype="int8")
    assert temp < 1.5 * one_group_float32_kv, (temp, one_group_float32_kv)
