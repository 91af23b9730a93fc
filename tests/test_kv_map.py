"""The KV-sharing family (issue 29): per-layer attention types (global, or local with a
window) and any earlier producer as a layer's K/V source, against a plain numpy model that
reads the map as written here, in training, prefill, chunked prefill and decode (through the
local layers' rings), float and int8; the map's shorthands, its errors, its stages."""
import functools
import importlib
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_model import make_params, np_rms, np_rope

import cla_jax
from cla_jax.config import ConfigError, ModelConfig, kv_bytes_per_token

ROOT = pathlib.Path(__file__).resolve().parents[1]
L, G = "l", None  # a local layer (window W below) and a global one, as the tests write them
W = 4
# name -> (config changes, each layer's K/V source as the design states it, its type)
DESIGNS = {
    "mqa": (dict(num_kv_heads=1), [0, 1, 2, 3, 4, 5], [G] * 6),
    "cla2": (dict(kv_sharing=2), [0, 0, 2, 2, 4, 4], [G] * 6),
    "last_half_shares": (dict(kv_sources="last:3"), [0, 1, 2, 2, 2, 2], [G] * 6),
    "local_global_5_1": (dict(layer_types="5:1", local_window=W), [0, 1, 2, 3, 4, 5],
                         [L] * 5 + [G]),
    "5_1_cla2": (dict(layer_types="5:1", local_window=W, kv_sharing=2), [0, 0, 2, 2, 4, 5],
                 [L] * 5 + [G]),
    # Producers handed to later stages (scan-invariant inputs), local and global.
    "noncontiguous": (dict(layer_types="llgllg", local_window=W, kv_sources="0,0,2,0,0,2"),
                      [0, 0, 2, 0, 0, 2], [L, L, G, L, L, G]),
    "gemma3n_like": (dict(num_layers=9, layer_types="2:1", local_window=W,
                          kv_sources="last:4"), [0, 1, 2, 3, 4, 2, 4, 4, 2],
                     [L, L, G, L, L, G, L, L, G]),
}


def design(name, **changes):
    kw, _, _ = DESIGNS[name]
    base = dict(vocab_size=61, d_model=32, num_layers=6, num_heads=4, num_kv_heads=2,
                head_dim=8, mlp_dim=40, max_seq_len=48, init_std=0.1, attention="reference")
    return ModelConfig(**{**base, **kw, **changes})


# ---------------------------------------------------------------- independent reference
def layer_params(params, config):
    """One dict per layer, depth order: stage s, step g, layer i of the step (the layout)."""
    layers = []
    for s, stage in enumerate(config.plan):
        for g in range(stage.steps):
            for i in range(len(stage.layers)):
                layers.append(jax.tree_util.tree_map(
                    lambda x: np.asarray(x[g], np.float64), params[f"stage_{s}"][f"layer_{i}"]))
    return layers


def np_attention(q_TNH, k_TKH, v_TKH, positions_T, segments_T, window):
    t, n, h = q_TNH.shape
    out = np.zeros_like(q_TNH)
    for head in range(n):
        kv = head // (n // k_TKH.shape[1])
        for i in range(t):
            seen = [j for j in range(t) if segments_T[j] == segments_T[i]
                    and positions_T[j] <= positions_T[i]
                    and (window is None or positions_T[i] - positions_T[j] < window)]
            s = np.array([q_TNH[i, head] @ k_TKH[j, kv] / np.sqrt(h) for j in seen])
            w = np.exp(s - s.max())
            out[i, head] = (w / w.sum()) @ v_TKH[seen, kv]
    return out


def reference_logits(params, config, name, tokens_T, segments_T=None, kv_round=None):
    """The decoder layer by layer with the map of DESIGNS[name]: a producer projects K/V
    (through its own K/V norm when others reuse them), a consumer attends with its
    source's; a local layer sees the last W positions. kv_round: applied to every K/V as
    written (int8's quantise-dequantise)."""
    _, sources, types = DESIGNS[name]
    positions_T = np.arange(len(tokens_T))
    segments_T = np.zeros(len(tokens_T)) if segments_T is None else segments_T
    eps, base = config.norm_eps, config.rope_base
    x = np.asarray(params["embed"]["embedding"], np.float64)[tokens_T]
    kv = {}
    for layer, p in enumerate(layer_params(params, config)):
        h = np_rms(x, p["attn_norm"]["scale"], eps)
        if sources[layer] == layer:
            shared = sources.count(layer) > 1
            kv_in = np_rms(x, p["kv_norm"]["scale"], eps) if shared else h
            k = np_rope(np.einsum("td,dkh->tkh", kv_in, p["key"]["kernel"]), positions_T, base)
            v = np.einsum("td,dkh->tkh", kv_in, p["value"]["kernel"])
            kv[layer] = (k, v) if kv_round is None else (kv_round(k), kv_round(v))
        else:
            assert not {"key", "value", "kv_norm"} & set(p), f"layer {layer} owns K/V"
        k, v = kv[sources[layer]]
        window = W if types[layer] == L else None
        q = np_rope(np.einsum("td,dnh->tnh", h, p["query"]["kernel"]), positions_T, base)
        attn = np_attention(q, k, v, positions_T, segments_T, window)
        x = x + np.einsum("tnh,nhd->td", attn, p["out"]["kernel"])
        h = np_rms(x, p["mlp_norm"]["scale"], eps)
        gate, up = h @ p["mlp"]["gate"]["kernel"], h @ p["mlp"]["up"]["kernel"]
        x = x + (gate / (1 + np.exp(-gate)) * up) @ p["mlp"]["down"]["kernel"]
    x = np_rms(x, np.asarray(params["final_norm"]["scale"], np.float64), eps)
    return x @ np.asarray(params["unembed"]["kernel"], np.float64)


def np_int8_round(x):
    """Per token and head: absmax / 127 rounded up to a bfloat16 (float32's top 16 bits) as
    the scale, values rounded to int8 steps of it (cache.py's int8, written out in numpy)."""
    absmax = np.max(np.abs(x), axis=-1, keepdims=True).astype(np.float32) / np.float32(127)
    bits = (absmax.view(np.uint32).astype(np.uint64) + 0xFFFF) & 0xFFFF0000
    scale = bits.astype(np.uint32).view(np.float32).astype(np.float64)
    return np.clip(np.round(x / np.where(scale > 0, scale, 1)), -127, 127) * scale


@functools.partial(jax.jit, static_argnums=0)
def forward(config, params, tokens, positions, segment_ids=None, cache=None):
    return cla_jax.Transformer(config).apply({"params": params}, tokens, positions,
                                             segment_ids, cache)


# ---------------------------------------------------------------- the map
@pytest.mark.parametrize("name", sorted(DESIGNS))
def test_each_shorthand_expands_to_the_designs_map(name):
    config = design(name)
    _, sources, types = DESIGNS[name]
    assert config.kv_source_of == tuple(sources)
    assert config.layer_windows == tuple(W if t == L else None for t in types)
    assert config.num_kv_layers == sum(s == i for i, s in enumerate(sources))


@pytest.mark.parametrize("changes,message", [
    (dict(kv_sources="0,2,2,3,4,5"), "layer 1 takes K/V from layer 2, which is not an earlier"),
    (dict(kv_sources="0,0,1,3,4,5"), "layer 2 takes K/V from layer 1, which itself reuses"),
    (dict(layer_types="lglglg", local_window=3, kv_sources="0,0,2,3,4,5"),
     "layer 1 (global) takes K/V from layer 0 (local, window 3)"),
    (dict(layer_types="5:1"), "set model.local_window"),
    (dict(local_window=8), "no layer is local"),
    (dict(layer_types="llx"), "one letter per layer"),
    (dict(kv_sources="last:6"), "N in [1, 5]"),
    (dict(layer_types="glllll", local_window=3, kv_sources="last:5"),
     "layer 1 (local, window 3) has no earlier local producer"),
    (dict(kv_sources="0,0,2,2,4,4", kv_sharing=2), "set kv_sharing=1"),
    (dict(kv_sources="0,0,2"), "lists 3 sources but model.num_layers is 6"),
])
def test_invalid_maps_are_refused_in_one_line_naming_the_layer(changes, message):
    base = dict(vocab_size=61, d_model=32, num_layers=6, num_heads=4, num_kv_heads=2,
                head_dim=8, mlp_dim=40)
    with pytest.raises(ConfigError, match=re.escape(message)):
        ModelConfig(**{**base, **changes})


def test_stages_do_not_grow_with_depth_and_shared_kv_is_not_recomputed():
    """The same pattern at 48 and 96 layers scans the same stages (more steps), and the
    lowered program has the same number of dot products: consumers of an earlier stage's
    producer take its K/V as a scan-invariant input."""
    def lowered(num_layers):
        config = ModelConfig(vocab_size=61, d_model=32, num_layers=num_layers, num_heads=4,
                             num_kv_heads=1, head_dim=8, mlp_dim=40, layer_types="5:1",
                             local_window=4, kv_sharing=2, kv_sources=f"last:{num_layers // 2}")
        params = cla_jax.abstract_params(config)
        tokens = jnp.zeros((1, 16), jnp.int32)
        text = jax.jit(lambda p: forward(config, p, tokens, tokens)).lower(params).as_text()
        return config, text
    small, small_text = lowered(48)
    deep, deep_text = lowered(96)
    assert [len(s.layers) for s in small.plan] == [len(s.layers) for s in deep.plan]
    assert [s.steps for s in small.plan] == [3, 2, 1, 1, 4]  # the last: 4 x (5 local + 1)
    assert [s.steps for s in deep.plan] == [7, 2, 1, 1, 8]
    assert {layer.source for layer in deep.plan[-1].layers} == {"outer"}
    assert small_text.count("dot_general") == deep_text.count("dot_general")
    assert abs(len(deep_text) - len(small_text)) < 0.02 * len(small_text)


# ---------------------------------------------------------------- the model
@pytest.mark.parametrize("kernel", ["reference", "xla", "blockwise"])
@pytest.mark.parametrize("name", sorted(DESIGNS))
def test_training_forward_equals_the_numpy_map(name, kernel):
    """Two packed documents per row, 14 tokens: the local windows (4) and the documents cut
    attention; the blockwise kernel runs 4-token blocks here, so it skips blocks."""
    config = design(name, attention=kernel)
    params = make_params(config, seed=4)
    tokens = np.random.RandomState(1).randint(0, config.vocab_size, (2, 14))
    segments = np.array([[1] * 9 + [2] * 5, [1] * 14])
    positions = np.tile(np.arange(14), (2, 1))
    if kernel == "blockwise":
        from cla_jax.model import attention
        old, attention.BLOCK = attention.BLOCK, 4
    try:
        logits, _ = cla_jax.Transformer(config).apply({"params": params}, tokens, positions,
                                                      segments)
    finally:
        if kernel == "blockwise":
            attention.BLOCK = old
    for b in range(2):
        expected = reference_logits(params, config, name, tokens[b], segments[b])
        np.testing.assert_allclose(logits[b], expected, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("cache_dtype", ["float32", "int8"])
@pytest.mark.parametrize("name", sorted(DESIGNS))
def test_chunked_prefill_and_decode_through_the_rings_equal_the_numpy_map(name, cache_dtype):
    """Ragged prompts (padding written nowhere), a second chunk longer than the window
    (the ring wraps inside one step), then decode past three windows: every logit equals
    the reference over the whole sequence; int8 against the reference with its K/V rounded
    as stored."""
    config = design(name, attention="xla")
    params = make_params(config, seed=5)
    total = 20
    tokens = np.random.RandomState(2).randint(0, config.vocab_size, (2, total))
    kv_round = np_int8_round if cache_dtype == "int8" else None
    expected = [reference_logits(params, config, name, tokens[b], kv_round=kv_round)
                for b in range(2)]
    tol = dict(rtol=2e-3, atol=2e-3) if cache_dtype == "int8" else dict(rtol=1e-5, atol=1e-5)
    cache = cla_jax.init_cache(config, 2, 32, jnp.dtype(cache_dtype))
    windows = [config.layer_windows[p] for p in config.producers]
    held = sorted(s.key.shape[2] for s in cache.stages for _ in range(s.key.shape[0]))
    assert held == sorted(32 if w is None else W for w in windows)  # producers only

    def check(logits, positions, valid):
        for b in range(2):
            for t, (p, ok) in enumerate(zip(positions[b], valid[b])):
                if ok:
                    np.testing.assert_allclose(logits[b, t], expected[b][p], **tol)

    # Chunk 1: prompts of 3 and 5 tokens, padded to 5; chunk 2: the next 9 of each.
    lengths = np.array([3, 5])
    positions = np.tile(np.arange(5), (2, 1))
    segments = (positions < lengths[:, None]).astype(np.int32)
    chunk = np.where(segments > 0, tokens[:, :5], 0)
    logits, cache = forward(config, params, chunk, positions, segments, cache)
    check(logits, positions, segments > 0)
    positions = lengths[:, None] + np.arange(9)
    logits, cache = forward(config, params, np.take_along_axis(tokens, positions, 1),
                            positions, np.ones_like(positions), cache)
    check(logits, positions, np.ones_like(positions, bool))
    while int(np.min(cache.lengths)) < total:
        # A row at the end sits out (padding: segment 0), as the engines' finished rows do.
        new = np.asarray(cache.lengths)[:, None] < total
        pos = np.minimum(np.asarray(cache.lengths), total - 1)[:, None]
        logits, cache = forward(config, params, np.take_along_axis(tokens, pos, 1), pos,
                                new.astype(np.int32), cache)
        check(logits, pos, new)


@pytest.mark.parametrize("name", ["5_1_cla2", "gemma3n_like", "noncontiguous"])
def test_generate_and_both_serving_engines_give_the_greedy_reference_tokens(name):
    """Greedy tokens through decoding.generate, the slot engine and the paged engine (a
    pool too small for both requests at once) equal the numpy model's argmax, step by step
    from the whole sequence."""
    from cla_jax.decoding import Sampling, generate
    from cla_jax.serving import Batcher, Engine, Request
    from cla_jax.serving.paged_engine import PagedEngine
    from cla_jax.serving.scheduler import PagedBatcher

    config = design(name, attention="xla")
    params = make_params(config, seed=6)
    rng = np.random.RandomState(7)
    prompts = [rng.randint(0, config.vocab_size, n).tolist() for n in (7, 2)]
    new = 9
    expected = []
    for prompt in prompts:
        seq = list(prompt)
        for _ in range(new):
            seq.append(int(np.argmax(reference_logits(params, config, name, np.array(seq))[-1])))
        expected.append(seq[len(prompt):])
    tokens, _ = generate(config, params, prompts, new, Sampling(temperature=0))
    assert np.asarray(tokens).tolist() == expected
    requests = [Request(prompt=p, max_tokens=new, temperature=0.0) for p in prompts]
    for batcher in (Batcher(Engine(config, params, num_slots=2, max_length=32),
                            steps_per_call=2),
                    PagedBatcher(PagedEngine(config, params, num_blocks=7, block_size=4,
                                             max_seqs=2, chunk_tokens=8, min_window=16),
                                 steps_per_call=2, reserve_blocks=0)):
        handles = [batcher.submit(r) for r in requests]
        batcher.run_until_idle()
        assert [h.result(timeout=0).tokens for h in handles] == expected


# ---------------------------------------------------------------- bytes
@pytest.mark.parametrize("name", sorted(DESIGNS))
def test_kv_bytes_and_capacity_follow_the_formula(name):
    """Per token of a C-token context: 2 x kv_heads x head_dim x bytes for every global
    producer, and x W / C for every local one (its ring); the capacity planner agrees."""
    from cla_jax.capacity import capacity
    config = design(name)
    _, sources, types = DESIGNS[name]
    producers = [i for i, s in enumerate(sources) if s == i]
    context = 40
    per_layer = 2 * config.num_kv_heads * config.head_dim * 2  # bfloat16
    formula = per_layer * sum(1 if types[p] is G else W / context for p in producers)
    assert kv_bytes_per_token(config, 2, context) == pytest.approx(formula)
    cache = cla_jax.init_cache(config, 3, context, jnp.bfloat16)
    assert cla_jax.kv_bytes(cache) == pytest.approx(3 * context * formula)
    report = capacity(config, 2**20, context)
    assert report["cla"]["max_batch_at_context"] == int(2**20 // (context * formula))


# ---------------------------------------------------------------- one config, end to end
FAMILY_CONFIGS = sorted(p.stem for p in (ROOT / "configs" / "family").glob("*.py")
                        if p.stem not in ("__init__", "common"))


@pytest.mark.parametrize("design_file", FAMILY_CONFIGS)
def test_each_family_config_trains_evaluates_decodes_and_serves(tmp_path, corpus_glob,
                                                                design_file):
    """configs/family/<design>.py, shrunk (its KV map kept, window 8): trains sharded over
    the 8 test devices, saves, evaluates, restores; greedy decoding on a (2, 2, 2) mesh
    equals one device, and the slot and paged engines give the same tokens."""
    from cla_jax import checkpoint, sharding
    from cla_jax.decoding import Sampling, generate
    from cla_jax.evaluation import evaluate_checkpoint
    from cla_jax.serving import Batcher, Engine, Request
    from cla_jax.serving.paged_engine import PagedEngine
    from cla_jax.serving.scheduler import PagedBatcher
    from cla_jax.train.loop import train_and_evaluate

    config = importlib.import_module(f"configs.family.{design_file}").get_config()
    config.model.update(vocab_size=260, d_model=32, num_heads=4, head_dim=8, mlp_dim=48,
                        max_seq_len=64, local_window=8 if config.model.local_window else 0)
    config.data.update(source=corpus_glob, name="tiny", tokenizer="byte",
                       validation_fraction=0.25)
    config.train.update(steps=3, batch_size=8, seq_len=32, log_every=1, eval_every=3,
                        eval_batches=1, checkpoint_every=3)
    train_and_evaluate(config, tmp_path / "run", tmp_path / "cache")
    result = evaluate_checkpoint(tmp_path / "run", tmp_path / "cache")
    assert result["step"] == 3 and 1 < result["perplexity"] < 260 * 2

    run = checkpoint.restore_model(tmp_path / "run", None, sharding.single_device_mesh())
    assert run.model.kv_source_of == ModelConfig.from_dict(config.model).kv_source_of
    prompts = [[72, 101, 108, 108, 111, 32, 116, 104, 101, 114, 101], [65, 66]]
    tokens, _ = generate(run.model, run.params, prompts, 12, Sampling(temperature=0))
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = jax.device_put(run.params, sharding.param_shardings(
        cla_jax.abstract_params(run.model), mesh))
    on_mesh, _ = generate(run.model, sharded, prompts, 12, Sampling(temperature=0), mesh=mesh)
    np.testing.assert_array_equal(on_mesh, tokens)
    requests = [Request(prompt=p, max_tokens=12, temperature=0.0) for p in prompts]
    for batcher in (Batcher(Engine(run.model, run.params, num_slots=2, max_length=32)),
                    PagedBatcher(PagedEngine(run.model, run.params, num_blocks=9, block_size=4,
                                             max_seqs=2, chunk_tokens=8, min_window=16))):
        handles = [batcher.submit(r) for r in requests]
        batcher.run_until_idle()
        assert [h.result(timeout=0).tokens for h in handles] == np.asarray(tokens).tolist()


def test_adapt_converts_between_maps_keeping_each_producers_kv():
    """A no-sharing all-global model adapted to a map with local layers and producers handed
    to later stages: every weight but K/V copied layer by layer; each new producer keeps the
    K/V it attended with ("keep") or takes the mean over the layers that will use it
    ("mean"); the new shared producers' K/V norm starts as their attention norm."""
    from cla_jax.adapt import convert_params, layer_params
    target = design("noncontiguous")
    source = target.replace(layer_types="", local_window=0, kv_sources="")
    params = make_params(source, seed=8)
    old = layer_params(params, source)
    for recipe in ("keep", "mean"):
        new = layer_params(convert_params(params, source, target, recipe), target)
        for layer, src in enumerate(DESIGNS["noncontiguous"][1]):
            np.testing.assert_array_equal(new[layer]["query"]["kernel"],
                                          old[layer]["query"]["kernel"])
            if src != layer:
                assert "key" not in new[layer]
                continue
            users = [u for u, s in enumerate(DESIGNS["noncontiguous"][1]) if s == layer]
            want = (old[layer]["key"]["kernel"] if recipe == "keep" else
                    np.mean([old[u]["key"]["kernel"] for u in users], axis=0))
            np.testing.assert_allclose(new[layer]["key"]["kernel"], want, rtol=1e-6)
            np.testing.assert_array_equal(new[layer]["kv_norm"]["scale"],
                                          old[layer]["attn_norm"]["scale"])
    adapted = convert_params(params, source, target, "keep")
    logits, _ = forward(target, adapted, np.zeros((1, 6), np.int32), np.arange(6)[None])
    assert np.isfinite(np.asarray(logits)).all()
