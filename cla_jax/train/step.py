"""The jitted training step over packed batches, with explicit shardings. (The evaluation
step, which the training loop also runs, is `evaluation.make_eval_step`; both score with
`model.loss.token_nll`.)

A batch is a dict of global [B, L] arrays (see `sharding.global_batch`): inputs, targets,
positions, segment_ids, weights. Params and optimizer state stay in their shards; metrics come
back replicated, so every process can read them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from cla_jax import sharding
from cla_jax.config import ModelConfig
from cla_jax.model.loss import chunked_nll_sum, forward, token_nll, unembedding
from cla_jax.train.state import TrainState, state_shardings


def weighted_nll_sum(config: ModelConfig, params, batch) -> jax.Array:
    """sum(weights * token_nll), float32: the training loss before its division by the
    weight. Chunked, its gradient comes without recomputing the logits (`chunked_nll_sum`)."""
    if config.loss_chunk_size:
        hidden_BLD = forward(config, params, batch, return_hidden=True)
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
