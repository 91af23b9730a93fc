"""The training state: everything that must be checkpointed besides the data position."""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from cla_jax.config import ModelConfig
from cla_jax.model import init_params


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState


def init_state(config: ModelConfig, optimizer: optax.GradientTransformation,
               rng: jax.Array) -> TrainState:
    params = nn.meta.unbox(init_params(config, rng))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params))
