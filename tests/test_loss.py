"""Chunked cross-entropy (cla_jax/model/loss.py) against the whole log-softmax: values and
gradients of the loss alone, through the model (tied and untied), in bf16 and on a mesh, and
the compiled train step holds no [B, T, vocab] float32 logits."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_model import make_config, make_params

from cla_jax import sharding
from cla_jax.config import ConfigError
from cla_jax.model import Transformer
from cla_jax.model.loss import chunked_nll, chunked_nll_sum, token_nll
from cla_jax.train.state import TrainState
from cla_jax.train.step import make_train_step

# float32 against float64: logits of size ~3 over 11-61 classes round at ~1e-7 relative; the
# gradients sum at most a few dozen tokens. 2e-5 of the largest entry leaves room for that and
# none for a wrong term (a missing softmax or target term moves entries by O(1) of the max).
F32_TOL = 2e-5
BF16_U = 2.0 ** -8  # bf16 unit roundoff


def assert_close(actual, expected, tol, what=""):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(np.abs(expected).max(), 1e-30)
    assert np.abs(actual - expected).max() <= tol * scale, (what, np.abs(actual - expected).max(),
                                                            scale)


def np_cross_entropy(h_BTD, w_DV, targets_BT, g_BT):
    """float64: per-token NLL from the whole log-softmax, and the gradients of sum(g * NLL)."""
    h, w = np.asarray(h_BTD, np.float64), np.asarray(w_DV, np.float64)
    logits = h @ w
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    onehot = np.eye(w.shape[1])[targets_BT]
    nll = -(logp * onehot).sum(-1)
    d_logits = (np.exp(logp) - onehot) * np.asarray(g_BT, np.float64)[..., None]
    return nll, d_logits @ w.T, np.einsum("btd,btv->dv", h, d_logits)


def random_inputs(b=2, t=7, d=6, v=11, seed=0):
    rng = np.random.RandomState(seed)
    return (rng.randn(b, t, d).astype(np.float32), (0.7 * rng.randn(d, v)).astype(np.float32),
            rng.randint(0, v, (b, t)).astype(np.int32), rng.rand(b, t).astype(np.float32))


@pytest.mark.parametrize("chunk", [3, 7, 64])  # 3 does not divide T = 7; 64 > T
def test_chunked_loss_and_gradients_equal_the_whole_log_softmax(chunk):
    h, w, targets, g = random_inputs()
    nll, d_h, d_w = np_cross_entropy(h, w, targets, g)

    def per_token(h, w, g):  # cotangent g through the per-token NLL
        return jnp.sum(chunked_nll(h, w, targets, chunk) * g)

    def summed(h, w, g):  # weights 2g and a cotangent of 1/2 on the sum
        return 0.5 * chunked_nll_sum(h, w, targets, 2 * g, chunk)

    assert_close(jax.jit(chunked_nll, static_argnums=3)(h, w, targets, chunk), nll, F32_TOL)
    for loss in (per_token, summed):
        value, (got_h, got_w, got_g) = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(h, w, g)
        np.testing.assert_allclose(value, (nll * g).sum(), rtol=F32_TOL)
        assert_close(got_h, d_h, F32_TOL, f"{loss.__name__} d hidden")
        assert_close(got_w, d_w, F32_TOL, f"{loss.__name__} d unembed")
        assert_close(got_g, nll, F32_TOL, f"{loss.__name__} d weights")


def test_bf16_chunked_loss_equals_the_unchunked_bf16_computation():
    h, w, targets, g = random_inputs(t=9, d=16, v=40, seed=1)
    h = jnp.asarray(h, jnp.bfloat16)  # bf16 compute; w stays the float32 master weight

    def unchunked(h, w):  # as the model computes it: bf16 matmul, logits in float32
        logits = (h.reshape(-1, h.shape[-1]) @ w.astype(jnp.bfloat16)).reshape(
            *h.shape[:2], -1).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits)
        return -jnp.sum(jnp.take_along_axis(logp, targets[..., None], -1)[..., 0] * g)

    want, (want_h, want_w) = jax.value_and_grad(unchunked, (0, 1))(h, w)
    got, (got_h, got_w) = jax.jit(jax.value_and_grad(
        lambda h, w: chunked_nll_sum(h, w, targets, g, 4), (0, 1)))(h, w)
    assert got_h.dtype == jnp.bfloat16 and got_w.dtype == jnp.float32
    # Same bf16 roundings (logits, their cotangent, d hidden); only float32 sums differ in
    # order, which can move a bf16 rounding by one unit. d unembed is accumulated in float32
    # here, where the reference rounds it to bf16 (half a unit).
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert_close(got_h, want_h, 2 * BF16_U, "d hidden")
    assert_close(got_w, want_w, 2 * BF16_U, "d unembed")
    # And both are within bf16 error of the float64 truth on the same bf16 inputs.
    nll, _, _ = np_cross_entropy(np.float32(h), np.float32(jnp.asarray(w, jnp.bfloat16)),
                                 targets, g)
    np.testing.assert_allclose(got, (nll * g).sum(), rtol=4 * BF16_U)


def batch_of(config, b=4, t=11, seed=0):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, config.vocab_size, (b, t + 1)).astype(np.int32)
    segments = np.where(np.arange(t) < 6, 1, 2)[None].repeat(b, 0).astype(np.int32)
    positions = np.concatenate([np.arange(6), np.arange(t - 6)])[None].repeat(b, 0)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": positions.astype(
        np.int32), "segment_ids": segments, "weights": (rng.rand(b, t) > 0.2).astype(np.float32)}


def reference_loss(config, params, batch):
    """sum(weights * NLL) from the model's whole logits, log_softmax and jax autodiff."""
    logits, _ = Transformer(config).apply({"params": params}, batch["inputs"],
                                          batch["positions"], batch["segment_ids"])
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    return jnp.sum(nll * batch["weights"])


SGD = optax.sgd(1.0)  # new params = params - gradient


def sgd_step(config, params, batch):
    """(gradient, loss, compiled HLO text) of one real `make_train_step` step."""
    state = TrainState(step=jnp.int32(0), params=jax.tree_util.tree_map(jnp.array, params),
                       opt_state=SGD.init(params))
    compiled = make_train_step(config, SGD).lower(state, batch).compile()
    new_state, metrics = compiled(state, batch)
    weight = batch["weights"].sum()
    grads = jax.tree_util.tree_map(lambda old, new: (old - new) * weight, params,
                                   jax.device_get(new_state.params))
    return grads, metrics["loss"] * weight, compiled.as_text()


def whole_logits(batch, config):
    """Matches a float32 [B, T, V] or [B * T, V] buffer in HLO text."""
    b, t, v = *batch["inputs"].shape, config.vocab_size
    return re.compile(rf"f32\[({b},{t}|{b * t}),{v}\]")


def model_and_reference(tied):
    config = make_config("cla1", "mqa", attention="xla", tie_embeddings=tied, loss_chunk_size=4)
    params = jax.device_get(make_params(config))
    batch = batch_of(config)  # T = 11: chunks of 4, 4 and 3 + padding
    reference = jax.jit(jax.value_and_grad(reference_loss, 1), static_argnums=0).lower(
        config, params, batch).compile()
    # The negative control of the HLO checks: the whole logits, forward and backward.
    assert whole_logits(batch, config).search(reference.as_text())
    return config, params, batch, reference(params, batch)


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def assert_grads_close(grads, want_grads):
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(want_grads)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert_close(g, _at(want_grads, path), 1e-4, jax.tree_util.keystr(path))


def test_train_step_gradients_equal_the_whole_log_softmax_and_hold_no_logits():
    config, params, batch, (want, want_grads) = model_and_reference(tied=False)
    grads, loss, hlo = sgd_step(config, params, batch)
    np.testing.assert_allclose(loss, want, rtol=F32_TOL)
    assert_grads_close(grads, want_grads)
    assert not whole_logits(batch, config).search(hlo)


def test_tied_per_token_nll_gradients_equal_the_whole_log_softmax_and_hold_no_logits():
    """Tied: the unembedding is the embedding transposed, and its gradient sums both uses.
    The per-token NLL's own backward (it recomputes each chunk's logits) is what runs."""
    config, params, batch, (want, want_grads) = model_and_reference(tied=True)
    assert "unembed" not in params

    def loss(p):
        return jnp.sum(token_nll(config, p, batch) * batch["weights"])
    compiled = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
    got, grads = compiled(params)
    np.testing.assert_allclose(got, want, rtol=F32_TOL)
    assert_grads_close(grads, want_grads)
    assert not whole_logits(batch, config).search(compiled.as_text())


def test_chunked_loss_on_a_mesh_equals_one_device_and_gathers_only_the_weight():
    h, w, targets, g = random_inputs(b=8, t=6, d=16, v=32, seed=2)
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))

    def on(mesh):
        def loss_and_grads(h, w):
            with sharding.activate(mesh):
                return jax.value_and_grad(lambda h, w: chunked_nll_sum(h, w, targets, g, 4),
                                          (0, 1))(h, w)
        shardings = (sharding.logical_sharding(("batch", "length", "embed"), h.shape, mesh),
                     sharding.logical_sharding(("embed", "vocab"), w.shape, mesh))
        args = [jax.device_put(x, s) for x, s in zip((h, w), shardings)]
        compiled = jax.jit(loss_and_grads, in_shardings=shardings).lower(*args).compile()
        return compiled(*args), compiled.as_text()

    (loss1, grads1), _ = on(sharding.single_device_mesh())
    (loss8, grads8), hlo = on(mesh)
    np.testing.assert_allclose(loss8, loss1, rtol=1e-6)
    for got, want in zip(grads8, grads1):
        assert_close(got, want, 1e-6)
    # The batch stays split: the one thing gathered is the unembedding's FSDP shards, whole
    # [D, V / tensor] (no hidden states), and the hidden states' gradients stay split too.
    gathered = re.findall(r"= \S+\[([\d,]*)\]\S* all-gather(?:-start)?\(", hlo)
    assert gathered and set(gathered) == {f"{w.shape[0]},{w.shape[1] // 2}"}, gathered
    assert grads8[0].sharding.shard_shape(h.shape)[0] == h.shape[0] // 4
    # d unembed comes back in the weight's own layout.
    assert grads8[1].sharding.is_equivalent_to(
        sharding.logical_sharding(("embed", "vocab"), w.shape, mesh), 2)


def test_loss_chunk_size_must_be_a_non_negative_integer():
    for bad in (-1, 2.5, True):
        with pytest.raises(ConfigError, match="loss_chunk_size"):
            make_config(loss_chunk_size=bad)
    assert make_config(loss_chunk_size=0).loss_chunk_size == 0
