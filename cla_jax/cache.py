"""The grouped KV cache: one K and one V array per stage, one slice per layer group.

Layers that reuse their group's K/V have no entry at all, so the cache is
num_kv_layers / num_layers the size of a per-layer cache. Slot j of a sequence holds the
token at position j; the model writes new tokens at their positions.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from cla_jax.config import ModelConfig
from cla_jax.errors import UserError

# Logical axes of a stage's K and V, which `cla_jax.sharding` maps onto the mesh.
CACHE_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")


@flax.struct.dataclass
class StageCache:
    key: jax.Array    # [groups_in_stage, batch, max_length, kv_heads, head_dim]
    value: jax.Array  # same shape as key


@flax.struct.dataclass
class KVCache:
    stages: tuple[StageCache, ...]
    lengths: jax.Array  # [batch] int32: positions written so far, per sequence

    @property
    def max_length(self) -> int:
        return self.stages[0].key.shape[2]

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]


def init_cache(config: ModelConfig, batch_size: int, max_length: int,
               dtype=jnp.float32) -> KVCache:
    """An empty cache for `batch_size` sequences of up to `max_length` tokens."""
    if max_length > config.max_seq_len:
        raise UserError(
            f"cache max_length {max_length} exceeds the model's max_seq_len "
            f"{config.max_seq_len}; shorten the prompt or max_new_tokens, or raise "
            "model.max_seq_len")
    if batch_size <= 0 or max_length <= 0:
        raise UserError(f"cache needs batch_size and max_length > 0, got "
                        f"{batch_size} and {max_length}")
    stages = []
    for _, num_groups in config.stages:
        shape = (num_groups, batch_size, max_length, config.num_kv_heads, config.head_dim)
        stages.append(StageCache(key=jnp.zeros(shape, dtype), value=jnp.zeros(shape, dtype)))
    return KVCache(stages=tuple(stages), lengths=jnp.zeros((batch_size,), jnp.int32))


def kv_bytes(cache: KVCache) -> int:
    """Bytes of the K/V arrays, measured from their shapes and dtypes.

    Works on concrete arrays and on `jax.eval_shape` results; `lengths` is bookkeeping,
    not KV storage, and is not counted.
    """
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
               for stage in cache.stages for a in (stage.key, stage.value))


def num_entries(cache: KVCache) -> int:
    """Number of (K, V) layer entries stored: one per layer group."""
    return sum(stage.key.shape[0] for stage in cache.stages)
