"""The grouped KV cache: one K and one V array per stage, one slice per layer group.

Layers that reuse their group's K/V have no entry at all, so the cache is
num_kv_layers / num_layers the size of a per-layer cache. Slot j of a sequence holds the
token at position j; the model writes new tokens at their positions. A local (sliding
window) producer's entry is a ring of its window instead: bounded whatever the context.

An int8 cache (`init_cache(..., dtype=jnp.int8)`) stores K and V as int8 plus one bfloat16
absmax scale per token and KV head (see `quantize`): 2 x kv_heads x (head_dim + 2) bytes per
token per layer group instead of 2 x kv_heads x head_dim x 2 at 16 bit.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from cla_jax import sharding
from cla_jax.config import ModelConfig
from cla_jax.errors import UserError

# Logical axes of a stage's K and V, which `cla_jax.sharding` maps onto the mesh.
CACHE_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")
# An int8 cache's scales: K/V's axes without head_dim, the axis each scale covers.
SCALE_AXES = CACHE_AXES[:4]
SCALE_DTYPE = jnp.bfloat16
INT8_MAX = 127


@flax.struct.dataclass
class StageCache:
    """One stage's cache. Every array leaf is [groups_in_stage, batch, slots, ...]: axis 1 is
    the sequence and axis 2 the slot, so a row (or slot range) moves between caches with one
    `jax.tree_util.tree_map` over the leaves. The scales are None (no leaves) in a float cache.
    """
    key: jax.Array    # [groups_in_stage, batch, max_length, kv_heads, head_dim]
    value: jax.Array  # same shape as key
    key_scale: jax.Array | None = None    # int8 only: [groups, batch, max_length, kv_heads]
    value_scale: jax.Array | None = None  # same shape as key_scale

    @property
    def quantized(self) -> bool:
        return self.key_scale is not None

    def arrays(self) -> tuple[jax.Array, ...]:
        """(key, value), plus (key_scale, value_scale) when int8: the model's scan carry,
        in the order `StageCache(*arrays)` takes them back."""
        return (self.key, self.value) + ((self.key_scale, self.value_scale)
                                         if self.quantized else ())


@flax.struct.dataclass
class KVCache:
    """The grouped KV cache of a batch of sequences: one `StageCache` per producer of each
    stage's step (`ModelConfig.plan`), in order, and how many positions each sequence has
    written. A global producer's entry has `max_length` slots (slot j holds position j); a
    local one's is a ring of its window (position p in slot p % window)."""
    stages: tuple[StageCache, ...]
    lengths: jax.Array  # [batch] int32: positions written so far, per sequence
    max_length: int = flax.struct.field(pytree_node=False, default=0)

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]


def init_cache(config: ModelConfig, batch_size: int, max_length: int,
               dtype=jnp.float32) -> KVCache:
    """An empty cache for `batch_size` sequences of up to `max_length` tokens; `dtype` is a
    float dtype, or int8 (K/V quantised, with per-token, per-head scales). A local layer's
    entry is a ring of min(local_window, max_seq_len) slots whatever `max_length` is."""
    if max_length > config.max_seq_len:
        raise UserError(
            f"cache max_length {max_length} exceeds the model's max_seq_len "
            f"{config.max_seq_len}; shorten the prompt or max_new_tokens, or raise "
            "model.max_seq_len")
    if batch_size <= 0 or max_length <= 0:
        raise UserError(f"cache needs batch_size and max_length > 0, got "
                        f"{batch_size} and {max_length}")
    stages = empty_stages(config, lambda groups, window: (
        groups, batch_size, max_length if window is None else min(window, config.max_seq_len),
        config.num_kv_heads, config.head_dim), dtype)
    return KVCache(stages=stages, lengths=jnp.zeros((batch_size,), jnp.int32),
                   max_length=max_length)


def empty_stages(config: ModelConfig, shape_of, dtype) -> tuple[StageCache, ...]:
    """One zero `StageCache` per producer of each stage's step, K and V of shape
    `shape_of(steps_in_stage, window)` (window: the producer's local window, or None; the
    last axis head_dim; int8 adds scales of the shape without it)."""
    dtype = jnp.dtype(dtype)
    if not (jnp.issubdtype(dtype, jnp.floating) or dtype == jnp.int8):
        raise UserError(f"cache dtype {dtype} is not supported; use a float dtype "
                        "(float32, bfloat16, float16) or int8")
    stages = []
    for stage in config.plan:
        for i in stage.producers:
            shape = shape_of(stage.steps, stage.layers[i].window)
            scales = ()
            if dtype == jnp.int8:
                scales = tuple(jnp.zeros(shape[:-1], SCALE_DTYPE) for _ in range(2))
            stages.append(StageCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                                     *scales))
    return tuple(stages)


def _round_up_to_bfloat16(x: jax.Array) -> jax.Array:
    """The smallest bfloat16 >= x, for finite x >= 0: bfloat16 is float32's top 16 bits, so
    carrying into them whenever a low bit is set rounds up."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    bits = (bits + jnp.uint32(0xFFFF)) & jnp.uint32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(bits, jnp.float32).astype(SCALE_DTYPE)


def quantize(x_KH: jax.Array) -> tuple[jax.Array, jax.Array]:
    """int8 values [..., K, H] and bfloat16 scales [..., K]: one absmax scale per token and
    KV head, over head_dim.

    Why these axes: per token, because a token is quantised once, when it is written, and no
    older entry is ever re-quantised as the cache grows; per head, because heads have
    different ranges; over head_dim, the axis attention contracts, so one scale multiplies a
    whole q.k dot product (and one value row).

    The scale is absmax / 127 rounded *up* to bfloat16, and x is divided by that stored scale,
    so nothing clips: |x - q x scale| <= scale / 2 per element (plus float32 rounding of the
    division, ~1e-7 relative), with absmax / 127 <= scale < absmax / 127 x (1 + 2^-7).
    """
    x_KH = x_KH.astype(jnp.float32)
    scale = _round_up_to_bfloat16(jnp.max(jnp.abs(x_KH), axis=-1) / INT8_MAX)
    scale_f32 = scale.astype(jnp.float32)[..., None]
    q = jnp.where(scale_f32 > 0, jnp.round(x_KH / jnp.where(scale_f32 > 0, scale_f32, 1)), 0)
    return jnp.clip(q, -INT8_MAX, INT8_MAX).astype(jnp.int8), scale


def dequantize(q_KH: jax.Array, scale_K: jax.Array, dtype) -> jax.Array:
    """q x scale in `dtype` (exact in float32: an 8-bit integer times an 8-bit mantissa)."""
    return q_KH.astype(dtype) * scale_K.astype(dtype)[..., None]


def cache_axes(leaf) -> tuple[str, ...]:
    """The logical axes of any cache leaf, by rank: K/V, scales, or lengths."""
    return {5: CACHE_AXES, 4: SCALE_AXES, 1: ("batch",)}[leaf.ndim]


def constrain_cache(cache):
    """Pins every leaf of a KVCache (or StageCache, or tuple of cache arrays) to its layout
    on the active mesh (nothing outside `sharding.activate`)."""
    return jax.tree_util.tree_map(lambda a: sharding.constrain(a, cache_axes(a)), cache)


def kv_bytes(cache: KVCache) -> int:
    """Bytes of the K/V arrays and their scales, measured from their shapes and dtypes.

    Works on concrete arrays and on `jax.eval_shape` results; `lengths` is bookkeeping,
    not KV storage, and is not counted.
    """
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
               for a in jax.tree_util.tree_leaves(cache.stages))


def num_entries(cache: KVCache) -> int:
    """Number of (K, V) layer entries stored: one per layer group."""
    return sum(stage.key.shape[0] for stage in cache.stages)
