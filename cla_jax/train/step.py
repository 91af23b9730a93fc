"""Jitted training and evaluation steps over packed batches.

A batch is a dict of [B, L] arrays: inputs, targets, positions, segment_ids, weights.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from cla_jax.config import ModelConfig
from cla_jax.model import Transformer
from cla_jax.train.state import TrainState


def token_nll(config: ModelConfig, params, batch) -> jax.Array:
    """Negative log-likelihood of every target token, float32 [B, L]."""
    logits, _ = Transformer(config).apply({"params": params}, batch["inputs"],
                                          batch["positions"], batch["segment_ids"])
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    return logz - target_logit


def make_train_step(config: ModelConfig, optimizer: optax.GradientTransformation,
                    grad_accum_steps: int = 1):
    """(state, batch) -> (state, metrics); the batch is split into `grad_accum_steps` micro
    batches whose gradients are summed in float32 before one optimizer update."""

    def loss_fn(params, batch):
        nll = token_nll(config, params, batch)
        return jnp.sum(nll * batch["weights"]), jnp.sum(batch["weights"])

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch):
        micro = jax.tree_util.tree_map(
            lambda x: x.reshape(grad_accum_steps, -1, *x.shape[1:]), batch)

        def accumulate(carry, micro_batch):
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

    return jax.jit(train_step, donate_argnums=0)


def make_eval_step(config: ModelConfig, token_bytes):
    """(params, batch) -> sums of NLL, target tokens and target bytes (padding weighs 0)."""
    token_bytes = jnp.asarray(token_bytes, jnp.float32)

    def eval_step(params, batch):
        nll = token_nll(config, params, batch)
        w = batch["weights"]
        return {"nll": jnp.sum(nll * w), "tokens": jnp.sum(w),
                "bytes": jnp.sum(token_bytes[batch["targets"]] * w)}

    return jax.jit(eval_step)
