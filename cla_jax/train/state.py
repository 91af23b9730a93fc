"""The training state: everything that must be checkpointed besides the data position, and
where each of its arrays lives on the mesh."""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh

from cla_jax import sharding
from cla_jax.config import ModelConfig
from cla_jax.model import abstract_params, init_params


@flax.struct.dataclass
class TrainState:
    """What training carries from step to step: the step, the params and the optimizer state."""
    step: jax.Array
    params: dict
    opt_state: optax.OptState


def _fresh_state(config: ModelConfig, optimizer: optax.GradientTransformation, rng):
    params = nn.meta.unbox(init_params(config, rng))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params))


def state_shardings(config: ModelConfig, optimizer: optax.GradientTransformation,
                    mesh: Mesh) -> TrainState:
    """Params by the rule table; Adam moments like their params; counters replicated."""
    params = sharding.param_shardings(abstract_params(config), mesh)
    abstract_opt_state = jax.eval_shape(optimizer.init, nn.meta.unbox(abstract_params(config)))
    replicated = sharding.replicated(mesh)
    opt_state = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt_state, params,
                                      transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=params, opt_state=opt_state)


def abstract_state(config: ModelConfig, optimizer: optax.GradientTransformation,
                   mesh: Mesh) -> TrainState:
    """Shapes, dtypes and shardings of the state, allocating nothing (for restores)."""
    shapes = jax.eval_shape(lambda: _fresh_state(config, optimizer, jax.random.key(0)))
    return sharding.with_shardings(shapes, state_shardings(config, optimizer, mesh))


def init_state(config: ModelConfig, optimizer: optax.GradientTransformation, seed: int,
               mesh: Mesh | None = None) -> TrainState:
    """A fresh state, created directly in its shards (no device ever holds all of it)."""
    mesh = mesh or sharding.single_device_mesh()
    return jax.jit(lambda: _fresh_state(config, optimizer, jax.random.key(seed)),
                   out_shardings=state_shardings(config, optimizer, mesh))()
