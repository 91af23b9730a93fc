"""The scanned CLA model against a plain per-layer numpy reference, and cache decoding."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import cla_jax
from cla_jax.config import ModelConfig

PATTERNS = {  # name -> (num_layers, kv_sharing, group_sizes)
    "cla1": (3, 1, None),
    "cla2": (4, 2, None),
    "cla3_uneven": (5, 3, None),          # groups (3, 2)
    "nonuniform": (6, 1, (1, 2, 2, 1)),   # KeepEnds-like: three stages
}
HEADS = {"mha": 4, "gqa": 2, "mqa": 1}


def make_config(pattern="cla2", kv="gqa", **changes):
    layers, sharing, groups = PATTERNS[pattern]
    base = dict(vocab_size=61, d_model=32, num_layers=layers, num_heads=4,
                num_kv_heads=HEADS[kv], head_dim=12,  # 4 x 12 != 32: d_head is independent
                mlp_dim=40, kv_sharing=sharing, group_sizes=groups, max_seq_len=64,
                init_std=0.1, attention="reference")
    return ModelConfig(**{**base, **changes})


def make_params(config, seed=0):
    params = nn.meta.unbox(cla_jax.init_params(config, jax.random.key(seed)))
    # Norm scales start at 1; perturb them so a swapped or skipped norm shows in the output.
    rng = np.random.RandomState(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.3 * rng.standard_normal(x.shape).astype(np.float32)
        if "scale" in jax.tree_util.keystr(path) else x, params)


# ---------------------------------------------------------------- independent reference
def per_layer_params(params, config):
    """The scanned tree unstacked into one dict per layer, in depth order (numpy float64)."""
    layers = []
    for s, (size, count) in enumerate(config.stages):
        stage = params[f"stage_{s}"]
        for g in range(count):
            for i in range(size):
                leaves = jax.tree_util.tree_map(lambda x: np.asarray(x[g], np.float64),
                                                stage[f"layer_{i}"])
                layers.append((i, size, leaves))
    return layers


def np_rms(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


def np_rope(x_TNH, pos_T, base):
    out = np.empty_like(x_TNH)
    half = x_TNH.shape[-1] // 2
    for t, p in enumerate(pos_T):
        for j in range(half):
            theta = p * base ** (-j / half)
            a, b = x_TNH[t, :, j], x_TNH[t, :, j + half]
            out[t, :, j] = a * np.cos(theta) - b * np.sin(theta)
            out[t, :, j + half] = b * np.cos(theta) + a * np.sin(theta)
    return out


def np_attention(q_TNH, k_TKH, v_TKH, segments_T):
    t, n, h = q_TNH.shape
    per_kv = n // k_TKH.shape[1]
    out = np.zeros_like(q_TNH)
    for head in range(n):
        kv = head // per_kv
        for i in range(t):
            allowed = [j for j in range(i + 1) if segments_T[j] == segments_T[i]]
            s = np.array([q_TNH[i, head] @ k_TKH[j, kv] / np.sqrt(h) for j in allowed])
            w = np.exp(s - s.max())
            w /= w.sum()
            out[i, head] = sum(wj * v_TKH[j, kv] for wj, j in zip(w, allowed))
    return out


def reference_logits(params, config, tokens_T, positions_T, segments_T=None):
    """A Llama-style decoder written layer by layer: CLA = reuse the producer's K/V."""
    segments_T = np.zeros(len(tokens_T)) if segments_T is None else segments_T
    eps, base = config.norm_eps, config.rope_base
    x = np.asarray(params["embed"]["embedding"], np.float64)[tokens_T]
    for i, size, p in per_layer_params(params, config):
        h = np_rms(x, p["attn_norm"]["scale"], eps)
        if i == 0:
            kv_in = np_rms(x, p["kv_norm"]["scale"], eps) if size > 1 else h
            k = np_rope(np.einsum("td,dkh->tkh", kv_in, p["key"]["kernel"]), positions_T, base)
            v = np.einsum("td,dkh->tkh", kv_in, p["value"]["kernel"])
        else:
            assert "key" not in p and "value" not in p and "kv_norm" not in p
        q = np_rope(np.einsum("td,dnh->tnh", h, p["query"]["kernel"]), positions_T, base)
        x = x + np.einsum("tnh,nhd->td", np_attention(q, k, v, segments_T), p["out"]["kernel"])
        h = np_rms(x, p["mlp_norm"]["scale"], eps)
        gate, up = h @ p["mlp"]["gate"]["kernel"], h @ p["mlp"]["up"]["kernel"]
        x = x + (gate / (1 + np.exp(-gate)) * up) @ p["mlp"]["down"]["kernel"]
    x = np_rms(x, np.asarray(params["final_norm"]["scale"], np.float64), eps)
    return x @ np.asarray(params["unembed"]["kernel"], np.float64)


@functools.partial(jax.jit, static_argnums=0)
def forward(config, params, tokens, positions, segment_ids=None, cache=None):
    return cla_jax.Transformer(config).apply({"params": params}, tokens, positions,
                                             segment_ids, cache)


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("kv", sorted(HEADS))
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_scanned_model_equals_per_layer_reference(pattern, kv):
    config = make_config(pattern, kv)
    params = make_params(config)
    tokens = np.random.RandomState(1).randint(0, config.vocab_size, (2, 9))
    positions = np.tile(np.arange(9), (2, 1))
    logits, cache = forward(config, params, tokens, positions)
    assert cache is None and logits.dtype == jnp.float32
    for b in range(2):
        expected = reference_logits(params, config, tokens[b], positions[b])
        np.testing.assert_allclose(logits[b], expected, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_non_producing_layers_own_no_kv_parameters(pattern):
    config = make_config(pattern, "mqa")
    params = nn.meta.unbox(cla_jax.abstract_params(config))
    kv_names = {"key", "value", "kv_norm"}
    producers = 0
    for s, (size, count) in enumerate(config.stages):
        for i in range(size):
            layer = params[f"stage_{s}"][f"layer_{i}"]
            owned = kv_names & set(layer)
            if i == 0:
                producers += count
                assert owned == ({"key", "value", "kv_norm"} if size > 1 else {"key", "value"})
                assert layer["key"]["kernel"].shape == (count, 32, 1, 12)
            else:
                assert owned == set()
    assert producers == len(config.groups)


def test_params_carry_logical_axis_names():
    boxed = cla_jax.init_params(make_config("cla2", "gqa"), jax.random.key(0))
    names = {jax.tree_util.keystr(path): leaf.names for path, leaf in
             jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(
                 x, nn.LogicallyPartitioned))}
    assert names["['stage_0']['layer_0']['key']['kernel']"] == (
        "layers", "embed", "kv_heads", "head_dim")
    assert names["['stage_0']['layer_1']['query']['kernel']"] == (
        "layers", "embed", "heads", "head_dim")
    assert names["['stage_0']['layer_0']['mlp']['down']['kernel']"] == ("layers", "mlp", "embed")
    assert names["['embed']['embedding']"] == ("vocab", "embed")
    assert names["['unembed']['kernel']"] == ("embed", "vocab")
    assert names["['stage_0']['layer_0']['kv_norm']['scale']"] == ("layers", "norm")
    assert all(n is not None and len(n) >= 1 for n in names.values())


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_prefill_then_decode_matches_full_forward_with_ragged_prompts(pattern):
    config = make_config(pattern, "mqa")
    params = make_params(config, seed=3)
    length, max_length = 10, 16
    tokens = np.random.RandomState(2).randint(0, config.vocab_size, (2, length))
    positions = np.tile(np.arange(length), (2, 1))
    full, _ = forward(config, params, tokens, positions)

    prompt_lengths = np.array([3, 6])
    prompt = np.where(positions < prompt_lengths[:, None], tokens, 0)[:, :6]
    segment_ids = (positions[:, :6] < prompt_lengths[:, None]).astype(np.int32)  # 0 = padding
    cache = cla_jax.init_cache(config, 2, max_length)
    logits, cache = forward(config, params, prompt, positions[:, :6], segment_ids, cache)
    np.testing.assert_array_equal(cache.lengths, prompt_lengths)
    for b in range(2):
        np.testing.assert_allclose(logits[b, :prompt_lengths[b]], full[b, :prompt_lengths[b]],
                                   rtol=1e-5, atol=1e-5)
    for _ in range(length - prompt_lengths.min()):
        pos = np.minimum(np.asarray(cache.lengths), length - 1)  # row 1 finishes early
        logits, cache = forward(config, params, tokens[np.arange(2), pos][:, None],
                                pos[:, None], None, cache)
        for b in range(2):
            np.testing.assert_allclose(logits[b, 0], full[b, pos[b]], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(cache.lengths, [length, length])


@pytest.mark.parametrize("pattern", ["cla1", "cla2", "nonuniform"])
def test_cache_bytes_follow_the_formula_and_halve_with_cla2(pattern):
    config = make_config(pattern, "gqa")
    cache = cla_jax.init_cache(config, 3, 20, jnp.bfloat16)
    assert cla_jax.kv_bytes(cache) == 3 * 20 * cla_jax.kv_bytes_per_token(config)
    assert sum(s.key.shape[0] for s in cache.stages) == len(config.groups)
    for stage, (_, count) in zip(cache.stages, config.stages):
        assert stage.key.shape == stage.value.shape == (count, 3, 20, 2, 12)
    twin = make_config("cla2", "gqa").replace(kv_sharing=1)
    cla2 = cla_jax.init_cache(make_config("cla2", "gqa"), 3, 20)
    assert 2 * cla_jax.kv_bytes(cla2) == cla_jax.kv_bytes(cla_jax.init_cache(twin, 3, 20))


def test_cache_longer_than_model_max_length_is_refused():
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len 64"):
        cla_jax.init_cache(make_config(), 1, 65)


def test_segment_ids_keep_packed_documents_apart():
    config = make_config("cla3_uneven", "gqa")
    params = make_params(config, seed=5)
    rng = np.random.RandomState(4)
    doc_a, doc_b = rng.randint(0, 61, 5), rng.randint(0, 61, 7)
    packed = np.concatenate([doc_a, doc_b])[None]
    positions = np.concatenate([np.arange(5), np.arange(7)])[None]
    segments = np.array([[1] * 5 + [2] * 7])
    logits, _ = forward(config, params, packed, positions, segments)
    alone_a, _ = forward(config, params, doc_a[None], np.arange(5)[None])
    alone_b, _ = forward(config, params, doc_b[None], np.arange(7)[None])
    np.testing.assert_allclose(logits[0, :5], alone_a[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits[0, 5:], alone_b[0], rtol=1e-5, atol=1e-5)
    # ... and without segment ids the second document does see the first.
    unpacked, _ = forward(config, params, packed, positions)
    assert np.abs(unpacked[0, 5:] - alone_b[0]).max() > 1e-3


@pytest.mark.parametrize("kv", ["mha", "mqa"])
def test_xla_kernel_equals_reference_kernel(kv):
    config = make_config("cla2", kv)
    params = make_params(config)
    tokens = np.random.RandomState(0).randint(0, 61, (2, 8))
    positions = np.tile(np.arange(8), (2, 1))
    segments = np.array([[1] * 3 + [2] * 5, [1] * 8])
    for seg in (None, segments):
        ref, _ = forward(config, params, tokens, positions, seg)
        xla, _ = forward(config.replace(attention="xla"), params, tokens, positions, seg)
        np.testing.assert_allclose(xla, ref, rtol=1e-5, atol=1e-5)
    # The folded-head layout must also differentiate like the reference kernel.
    (ref_loss, ref_grads), (xla_loss, xla_grads) = (
        loss_and_grads(config.replace(attention=kind), params, tokens)
        for kind in ("reference", "xla"))
    np.testing.assert_allclose(xla_loss, ref_loss, rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                           xla_grads, ref_grads)


@functools.lru_cache
def nonuniform_baseline():
    config = make_config("nonuniform", "mqa")
    params = make_params(config)
    tokens = np.random.RandomState(0).randint(0, 61, (2, 9))
    return config, params, tokens, loss_and_grads(config, params, tokens)


def loss_and_grads(config, params, tokens):
    positions = np.tile(np.arange(tokens.shape[1]), (tokens.shape[0], 1))

    def loss(p):
        logits, _ = forward(config, p, tokens[:, :-1], positions[:, :-1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()
    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_policies_change_memory_not_results(policy):
    config, params, tokens, (loss, grads) = nonuniform_baseline()
    loss_r, grads_r = loss_and_grads(config.replace(remat=policy), params, tokens)
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                           grads_r, grads)


def test_bfloat16_compute_keeps_fp32_master_weights():
    config = make_config("cla2", "mqa", attention="xla")
    params = make_params(config)
    tokens = np.random.RandomState(0).randint(0, 61, (2, 9))
    positions = np.tile(np.arange(9), (2, 1))
    bf16 = config.replace(dtype="bfloat16")
    logits16, _ = forward(bf16, params, tokens, positions)
    logits32, _ = forward(config, params, tokens, positions)
    assert logits16.dtype == jnp.float32  # logits are returned in fp32 for a stable loss
    assert np.abs(logits16 - logits32).max() < 0.1 * np.abs(logits32).max()
    _, grads = loss_and_grads(bf16, params, tokens)
    assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(grads))
    init = nn.meta.unbox(cla_jax.init_params(bf16, jax.random.key(0)))
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(init))


def test_tied_embeddings_have_no_output_matrix():
    config = make_config("cla2", "mqa", tie_embeddings=True)
    params = nn.meta.unbox(cla_jax.init_params(config, jax.random.key(0)))
    assert "unembed" not in params
    assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == cla_jax.num_params(config)
    tokens = np.arange(6)[None]
    logits, _ = forward(config, params, tokens, tokens)
    assert logits.shape == (1, 6, 61)
