"""Numerics of the train step and the KV cache against independent references: gradient
accumulation, bf16 compute over fp32 master weights, and a bf16 KV cache."""
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from test_model import forward, make_config, make_params

import cla_jax
from cla_jax.train.state import TrainState
from cla_jax.train.step import make_train_step

# bf16 keeps 8 significant bits: each rounding to bf16 has relative error <= 2^-8 (unit
# roundoff u ~ 3.9e-3). The tolerances below are stated in multiples of it.
BF16_U = 2.0 ** -8


def packed_batch(config, batch=8, length=16, seed=0):
    """A batch of packed documents whose rows carry very different numbers of target tokens,
    so that a mean of micro-batch means differs from the token-weighted mean."""
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, config.vocab_size, (batch, length + 1))
    positions = np.tile(np.arange(length), (batch, 1))
    segments = np.ones((batch, length), np.int32)
    segments[:, 9:] = 2  # a second document from position 9 on
    positions[:, 9:] -= 9
    weights = np.zeros((batch, length), np.float32)
    for row in range(batch):  # 16, 2, 9, 5, 16, 2, 9, 5 target tokens
        weights[row, :(16, 2, 9, 5)[row % 4]] = 1
    return dict(inputs=tokens[:, :-1].astype(np.int32), targets=tokens[:, 1:].astype(np.int32),
                positions=positions.astype(np.int32), segment_ids=segments, weights=weights)


def reference_loss(config, params, batch):
    """Token-weighted mean NLL over the whole batch at once, in plain jnp (no micro batches)."""
    logits, _ = forward(config, params, batch["inputs"], batch["positions"],
                        batch["segment_ids"])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    return jnp.sum(nll * batch["weights"]) / jnp.sum(batch["weights"])


# Plain SGD, so that old - new params = learning rate x gradient; the learning rate is state,
# so one compiled step serves every rate.
SGD = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)


@functools.lru_cache
def sgd_train_step(config, grad_accum_steps):
    return make_train_step(config, SGD, grad_accum_steps)


def sgd_step(config, params, batch, grad_accum_steps=1, learning_rate=1.0):
    """One train step of `make_train_step`: (new params, metrics), on host."""
    params = jax.tree_util.tree_map(jnp.array, params)  # a copy: the step donates its state
    opt_state = SGD.init(params)
    opt_state.hyperparams["learning_rate"] = jnp.float32(learning_rate)
    state = TrainState(step=jnp.int32(0), params=params, opt_state=opt_state)
    new_state, metrics = sgd_train_step(config, grad_accum_steps)(state, batch)
    return jax.device_get(new_state.params), jax.device_get(metrics)


def test_gradient_accumulation_equals_one_big_batch():
    config = make_config("cla2", "gqa", attention="xla")
    params = jax.device_get(make_params(config))
    batch = packed_batch(config)
    want_loss, want_grads = jax.value_and_grad(
        lambda p: reference_loss(config, p, batch))(params)
    one, one_metrics = sgd_step(config, params, batch, grad_accum_steps=1)
    four, four_metrics = sgd_step(config, params, batch, grad_accum_steps=4)

    # The same float32 sums in another order, so rounding only: float32 eps is 1.2e-7, and the
    # gradients sum 4 micro batches x 64 tokens (measured: equal losses, gradient entries
    # within 8e-7 of the largest). A mean of micro-batch means is off by ~1e-1 of it.
    assert four_metrics["tokens"] == one_metrics["tokens"] == batch["weights"].sum() == 64
    np.testing.assert_allclose(one_metrics["loss"], want_loss, rtol=2e-6)
    np.testing.assert_allclose(four_metrics["loss"], want_loss, rtol=2e-6)
    scale = max(np.abs(g).max() for g in jax.tree_util.tree_leaves(want_grads))
    for new in (one, four):
        jax.tree_util.tree_map(
            lambda old, new, g: np.testing.assert_allclose(old - new, g, rtol=1e-4,
                                                           atol=1e-5 * scale),
            params, new, want_grads)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale), one, four)


def relative_error(got_tree, want_tree) -> float:
    """||got - want|| / ||want|| over all leaves together."""
    pairs = list(zip(jax.tree_util.tree_leaves(got_tree), jax.tree_util.tree_leaves(want_tree)))
    error = sum(np.sum((np.float64(a) - b) ** 2) for a, b in pairs)
    return float(np.sqrt(error / sum(np.sum(np.float64(b) ** 2) for _, b in pairs)))


def test_bfloat16_train_step_matches_float32_within_bf16_rounding():
    config = make_config("cla2", "gqa", attention="xla")
    params = jax.device_get(make_params(config))
    batch = packed_batch(config)
    grads = {}
    for dtype in ("float32", "bfloat16"):
        new, metrics = sgd_step(config.replace(dtype=dtype), params, batch)
        grads[dtype] = (jax.tree_util.tree_map(np.subtract, params, new), metrics["loss"])
    (g32, loss32), (g16, loss16) = grads["float32"], grads["bfloat16"]
    # The loss is a mean over 64 token NLLs whose rounding errors largely cancel (measured:
    # 0.04 u); it is reduced and returned in float32 (in bf16, rounding it alone costs u/2).
    assert loss16.dtype == np.float32
    assert abs(loss16 - loss32) <= 0.25 * BF16_U * loss32
    # Every matmul input is rounded to bf16 (u each) on the way forward and back through 4
    # layers; the errors add up to a few u (measured: 2.4 u overall, <= 3.4 u per tensor).
    assert relative_error(g16, g32) <= 8 * BF16_U
    per_tensor = jax.tree_util.tree_map(relative_error, g16, g32)
    assert max(jax.tree_util.tree_leaves(per_tensor)) <= 8 * BF16_U, per_tensor
    assert relative_error(g16, g32) > 0.1 * BF16_U  # the step did compute in bf16

    # Master weights stay float32: updates of 1e-3 x gradient (<= 1.6e-4, most ~1e-6) are
    # below bf16's resolution at these weights (its ulp at 0.1 is 4.9e-4), so a bf16 copy
    # would lose them; float32 applies them to within about an ulp (1.2e-7 at 1; measured 6e-8).
    new, _ = sgd_step(config.replace(dtype="bfloat16"), params, batch, learning_rate=1e-3)
    for old, updated, g in zip(*(jax.tree_util.tree_leaves(t) for t in (params, new, g16))):
        assert updated.dtype == np.float32
        np.testing.assert_allclose(old - updated, 1e-3 * g, rtol=0, atol=3e-7)


def decode_teacher_forced(config, params, tokens, prompt_len, cache_dtype):
    """Logits for every position: the prompt prefilled into a fresh cache, then one given
    token per step through it (the same context as a full forward pass)."""
    batch, length = tokens.shape
    positions = np.tile(np.arange(length), (batch, 1))
    cache = cla_jax.init_cache(config, batch, length, cache_dtype)
    logits, cache = forward(config, params, tokens[:, :prompt_len], positions[:, :prompt_len],
                            None, cache)
    steps = [logits]
    for t in range(prompt_len, length):
        logits, cache = forward(config, params, tokens[:, t:t + 1], positions[:, t:t + 1],
                                None, cache)
        steps.append(logits)
    return np.concatenate([np.asarray(s) for s in steps], axis=1), cache


def test_bfloat16_kv_cache_decodes_like_float32():
    from cla_jax.decoding import Sampling, generate
    config = make_config("cla2", "mqa", attention="xla", max_seq_len=40)
    params = make_params(config, seed=1)
    tokens = np.random.RandomState(0).randint(0, config.vocab_size, (4, 32))
    want, _ = forward(config, params, tokens, np.tile(np.arange(32), (4, 1)))  # fp32, no cache
    want = np.asarray(want)
    got, cache = decode_teacher_forced(config, params, tokens, 4, jnp.bfloat16)
    assert cache.stages[0].key.dtype == jnp.bfloat16
    assert cla_jax.kv_bytes(cache) == 4 * 32 * cla_jax.kv_bytes_per_token(config, 2)

    # Only K and V are rounded (u/2 each, once); every other tensor stays float32. Through 4
    # layers that moves the logits by about u of their scale (measured: 0.9 u).
    error = np.abs(got - want)
    assert error.max() <= 3 * BF16_U * np.abs(want).max()
    assert error.max() > 0  # the cache did round
    # Same context, so greedy choices agree except at near-ties: a flip needs the float32
    # top-two margin to be within twice the error (measured: 127 of 128 agree).
    top2 = np.sort(want, axis=-1)[..., -2:]
    flipped = got.argmax(-1) != want.argmax(-1)
    assert flipped.mean() <= 0.05
    assert (top2[..., 1] - top2[..., 0])[flipped].max(initial=0) <= 2 * error.max()

    # Free-running greedy decoding through each cache dtype (measured: all 4 x 28 agree).
    prompts = tokens[:, :4].tolist()
    fp32, _ = generate(config, params, prompts, 28, Sampling(temperature=0),
                       cache_dtype="float32")
    bf16, _ = generate(config, params, prompts, 28, Sampling(temperature=0),
                       cache_dtype="bfloat16")
    assert np.mean(np.asarray(fp32) == np.asarray(bf16)) >= 0.9


def test_the_paper_configs_defaults_train_on_cpu():
    """configs/paper's model defaults (bf16 compute, remat dots_no_batch, attention auto, the
    chunked loss), shrunk: at 520 tokens a row `auto` runs the blockwise kernel on CPU (a full
    block and a ragged one). The first step's gradients equal a float32 model's with the
    reference kernel, no remat and whole logits, within bf16 rounding; then it learns."""
    from benchmarks.common import model_from_config_file
    from cla_jax.model import attention

    root = pathlib.Path(__file__).resolve().parents[1]
    paper = model_from_config_file(str(root / "configs/paper/1b_h128_mqa_cla2.py"))
    assert (paper.dtype, paper.remat, paper.attention) == ("bfloat16", "dots_no_batch", "auto")
    t = attention.BLOCK + 8
    config = paper.replace(vocab_size=256, d_model=64, num_layers=2, num_heads=4, head_dim=16,
                           mlp_dim=128, max_seq_len=t, loss_chunk_size=128)
    assert attention.choose_kernel("auto", dtype=jnp.bfloat16, seq_len=t, causal_only=False,
                                   with_cache=False) == "blockwise"
    params = jax.device_get(make_params(config))
    rng = np.random.RandomState(0)
    tokens = rng.randint(3, config.vocab_size, (2, t + 1))
    segments = np.ones((2, t), np.int32)
    starts = np.array([[200], [500]])  # a second document from there: across the blocks
    segments[np.arange(t) >= starts] = 2
    positions = np.where(segments == 1, np.arange(t), np.arange(t) - starts)
    batch = dict(inputs=tokens[:, :-1].astype(np.int32), targets=tokens[:, 1:].astype(np.int32),
                 positions=positions.astype(np.int32), segment_ids=segments,
                 weights=np.ones((2, t), np.float32))

    new, metrics = sgd_step(config, params, batch)
    want, want_metrics = sgd_step(config.replace(dtype="float32", remat="none",
                                                 attention="reference", loss_chunk_size=0),
                                  params, batch)
    grads = jax.tree_util.tree_map(np.subtract, params, new)
    want_grads = jax.tree_util.tree_map(np.subtract, params, want)
    assert abs(metrics["loss"] - want_metrics["loss"]) <= 0.25 * BF16_U * want_metrics["loss"]
    assert relative_error(grads, want_grads) <= 8 * BF16_U

    from ml_collections import ConfigDict

    from cla_jax.train.optimizer import make_optimizer
    from cla_jax.train.state import init_state

    optimizer = make_optimizer(ConfigDict(dict(  # the paper's AdamW settings, a higher peak
        learning_rate=1e-2, steps=20, warmup_fraction=0.05, final_lr_fraction=0.1, b1=0.9,
        b2=0.95, weight_decay=0.1, grad_clip=1.0)))
    state, step = init_state(config, optimizer, seed=0), make_train_step(config, optimizer)
    losses = []
    for _ in range(20):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(state.params))
    # A uniform guess at first; then it memorises part of the batch (measured: 5.56 -> 2.86).
    assert losses[0] > 0.9 * np.log(config.vocab_size) and losses[-1] < losses[0] - 2, str(
        [round(x, 3) for x in losses])
