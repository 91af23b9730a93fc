"""Jitted training and evaluation steps over packed batches, with explicit shardings.

A batch is a dict of global [B, L] arrays (see `sharding.global_batch`): inputs, targets,
positions, segment_ids, weights. Params and optimizer state stay in their shards; metrics come
back replicated, so every process can read them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from cla_jax import sharding
from cla_jax.config import ModelConfig
from cla_jax.model import Transformer, abstract_params
from cla_jax.train.loss import chunked_nll, chunked_nll_sum, unembedding
from cla_jax.train.state import TrainState, state_shardings


def _forward(config: ModelConfig, params, batch, return_hidden: bool) -> jax.Array:
    return Transformer(config).apply({"params": params}, batch["inputs"], batch["positions"],
                                     batch["segment_ids"], return_hidden=return_hidden)[0]


def token_nll(config: ModelConfig, params, batch) -> jax.Array:
    """Negative log-likelihood of every target token, float32 [B, L]: over chunks of
    `config.loss_chunk_size` positions (`train.loss`), or from whole logits when it is 0."""
    if config.loss_chunk_size:
        hidden_BLD = _forward(config, params, batch, return_hidden=True)
        return chunked_nll(hidden_BLD, unembedding(config, params), batch["targets"],
                           config.loss_chunk_size)
    logits = _forward(config, params, batch, return_hidden=False)
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    return logz - target_logit


def weighted_nll_sum(config: ModelConfig, params, batch) -> jax.Array:
    """sum(weights * token_nll), float32: the training loss before its division by the
    weight. Chunked, its gradient comes without recomputing the logits (`chunked_nll_sum`)."""
    if config.loss_chunk_size:
        hidden_BLD = _forward(config, params, batch, return_hidden=True)
        return chunked_nll_sum(hidden_BLD, unembedding(config, params), batch["targets"],
                               batch["weights"], config.loss_chunk_size)
    return jnp.sum(token_nll(config, params, batch) * batch["weights"])


def make_train_step(config: ModelConfig, optimizer: optax.GradientTransformation,
                    grad_accum_steps: int = 1, mesh: Mesh | None = None):
    """(state, batch) -> (state, metrics); the batch is split into `grad_accum_steps` micro
    batches whose gradients are summed in float32 before one optimizer update. The state is
    donated: its buffers are reused for the new one."""
    mesh = mesh or sharding.single_device_mesh()

    def loss_fn(params, batch):
        return weighted_nll_sum(config, params, batch), jnp.sum(batch["weights"])

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch):
        # Micro batch k = rows k, k + n, k + 2n...: every device keeps an equal share of each.
        micro = jax.tree_util.tree_map(
            lambda x: x.reshape(-1, grad_accum_steps, *x.shape[1:]).swapaxes(0, 1), batch)

        def accumulate(carry, micro_batch):
            micro_batch = {k: sharding.constrain(v, ("batch", "length"))
                           for k, v in micro_batch.items()}
            (nll_sum, weight), grads = grad_fn(state.params, micro_batch)
            acc_grads, acc_nll, acc_weight = carry
            return (jax.tree_util.tree_map(jnp.add, acc_grads, grads),
                    acc_nll + nll_sum, acc_weight + weight), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
        (grads, nll_sum, weight), _ = jax.lax.scan(
            accumulate, (zeros, jnp.float32(0), jnp.float32(0)), micro)
        weight = jnp.maximum(weight, 1.0)
        grads = jax.tree_util.tree_map(lambda g: g / weight, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": nll_sum / weight, "grad_norm": optax.global_norm(grads),
                   "tokens": weight}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def traced(state, batch):
        with sharding.activate(mesh):
            return train_step(state, batch)

    state_sharding = state_shardings(config, optimizer, mesh)
    return jax.jit(traced, donate_argnums=0,
                   in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
                   out_shardings=(state_sharding, sharding.replicated(mesh)))


def two_sum(a, b):
    """(s, e) with s = fl(a + b) and s + e = a + b exactly (Knuth's TwoSum, any magnitudes)."""
    s = a + b
    b_virtual = s - a
    return s, (a - (s - b_virtual)) + (b - b_virtual)


def compensated_sum(x_BL) -> jax.Array:
    """The sum of a float32 [B, L] as float32 [2] (high, low): a pairwise tree of TwoSums, along
    L first (within a device's rows) then over B, carrying each rounding error. high + low is
    the sum to about float64 precision; a plain float32 sum of B*L values loses up to
    log2(B*L) bits."""
    hi, lo = x_BL, jnp.zeros_like(x_BL)
    for axis in (1, 0):
        while hi.shape[axis] > 1:
            if hi.shape[axis] % 2:
                pad = [(0, 1) if a == axis else (0, 0) for a in range(hi.ndim)]
                hi, lo = jnp.pad(hi, pad), jnp.pad(lo, pad)
            hi_even, hi_odd = (jax.lax.slice_in_dim(hi, i, None, 2, axis) for i in (0, 1))
            lo_even, lo_odd = (jax.lax.slice_in_dim(lo, i, None, 2, axis) for i in (0, 1))
            hi, err = two_sum(hi_even, hi_odd)
            lo = lo_even + lo_odd + err
    return jnp.stack([hi.reshape(()), lo.reshape(())])


def make_eval_step(config: ModelConfig, token_bytes, mesh: Mesh | None = None):
    """(params, batch) -> this batch's sums: "nll" float32 [2] (high + low, see
    `compensated_sum`), "tokens" and "bytes" int32 (target tokens and their UTF-8 bytes).

    Weights are 0 (padding, context) or 1 (a scored target); padding is weighed out by
    `where`, so even a non-finite logit there cannot leak in. Sum batches with
    `evaluation.Totals`, which keeps them exact on device.
    """
    mesh = mesh or sharding.single_device_mesh()
    token_bytes = np.asarray(token_bytes, np.int32)  # numpy: a constant in every process

    def eval_step(params, batch):
        with sharding.activate(mesh):
            nll = token_nll(config, params, batch)
        scored = batch["weights"] > 0
        target_bytes = jnp.asarray(token_bytes)[batch["targets"]]
        return {"nll": compensated_sum(jnp.where(scored, nll, 0.0)),
                "tokens": jnp.sum(scored, dtype=jnp.int32),
                "bytes": jnp.sum(jnp.where(scored, target_bytes, 0), dtype=jnp.int32)}

    params_sharding = sharding.param_shardings(abstract_params(config), mesh)
    return jax.jit(eval_step, in_shardings=(params_sharding, sharding.batch_sharding(mesh)),
                   out_shardings=sharding.replicated(mesh))
