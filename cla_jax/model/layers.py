"""Llama-style building blocks: RMSNorm, rotary embeddings, SwiGLU, projections.

Every parameter carries logical axis names (embed, heads, kv_heads, head_dim, mlp, vocab,
norm) so that `cla_jax.sharding` can place it on a mesh; see DESIGN.md section 6.
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cla_jax.config import ModelConfig
from cla_jax.sharding import constrain


def dtype_of(name: str):
    return jnp.dtype(name)


def normal_init(config: ModelConfig, axes: Sequence[str]):
    """N(0, init_std) init (the paper's 0.01275) annotated with logical axes."""
    return nn.with_logical_partitioning(nn.initializers.normal(config.init_std), tuple(axes))


class RMSNorm(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        cfg = self.config
        # "norm": a vector per layer, replicated (sharding it would split the [B, T, D] terms of
        # its gradient on D, against their batch split).
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x_BTD.shape[-1],), dtype_of(cfg.param_dtype))
        # Statistics in float32 whatever the compute dtype: bf16 variance underflows.
        x = x_BTD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + cfg.norm_eps)
        return (x * scale.astype(jnp.float32)).astype(dtype_of(cfg.dtype))


def rope_frequencies(rope: ModelConfig | float, head_dim: int) -> jax.Array:
    """float32 [head_dim // 2]: the rotation speed of each pair, base^(-i / half), stretched as
    rope.rope_scaling says, by the rules of transformers' rope types of the same names.

    rope: the model config (its rope_base and rope scaling) or a bare base (plain RoPE).
    linear divides every frequency by the factor. llama3 divides the low frequencies (waves
    longer than original_max_len / low_freq_factor) by the factor, keeps the high ones (shorter
    than original_max_len / high_freq_factor) and blends the two in between.
    """
    base = rope if isinstance(rope, (int, float)) else rope.rope_base
    scaling = "default" if isinstance(rope, (int, float)) else rope.rope_scaling
    half = head_dim // 2
    inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    if scaling == "default":
        return inv_freq
    factor = rope.rope_scaling_factor
    if scaling == "linear":
        return inv_freq / factor
    old_len, low, high = (rope.rope_original_max_len, rope.rope_low_freq_factor,
                          rope.rope_high_freq_factor)
    wavelength = 2 * math.pi / inv_freq
    stretched = jnp.where(wavelength > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelength - low) / (high - low)
    blended = (1 - smooth) * stretched / factor + smooth * stretched
    medium = ~(wavelength < old_len / high) & ~(wavelength > old_len / low)
    return jnp.where(medium, blended, stretched)


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, rope: ModelConfig | float
               ) -> jax.Array:
    """Rotary embedding, half-split convention (as Llama / Hugging Face), in float32.

    rope: the model config, or a bare base for plain RoPE (see `rope_frequencies`)."""
    inv_freq = rope_frequencies(rope, x_BTNH.shape[-1])
    angles_BTH = positions_BT[..., None].astype(jnp.float32) * inv_freq
    sin, cos = jnp.sin(angles_BTH)[:, :, None, :], jnp.cos(angles_BTH)[:, :, None, :]
    x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BTNH.dtype)


class Projection(nn.Module):
    """A bias-free linear map of the last `in_dims` axes onto `features`, computed in the
    compute dtype from param_dtype master weights.

    The matmul runs on tokens flattened to one axis ([B*T, in] @ [in, out]): XLA's CPU backend
    is about 1.6x faster on the backward pass of a 2-D dot than of the same [B, T, D] one
    (benchmarks/README.md), and on accelerators the two are the same dot.
    """
    config: ModelConfig
    features: tuple[int, ...]
    in_dims: int
    kernel_axes: tuple[str, ...]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        in_shape = x.shape[x.ndim - self.in_dims:]
        fan_in, fan_out = math.prod(in_shape), math.prod(self.features)

        def init(key, shape, dtype):  # drawn as the flat [in, out] matrix, like DenseGeneral
            return nn.initializers.normal(cfg.init_std)(key, (fan_in, fan_out), dtype).reshape(
                shape)
        kernel = self.param("kernel", nn.with_logical_partitioning(init, self.kernel_axes),
                            (*in_shape, *self.features), dtype_of(cfg.param_dtype))
        dtype = dtype_of(cfg.dtype)
        y = x.reshape(-1, fan_in).astype(dtype) @ kernel.reshape(fan_in, fan_out).astype(dtype)
        return y.reshape(*x.shape[:x.ndim - self.in_dims], *self.features)


def projection(config: ModelConfig, features, axis, kernel_axes: Sequence[str], name: str):
    """A `Projection` of the trailing axes `axis` (-1 or (-2, -1)) onto `features`."""
    features = tuple(features) if isinstance(features, (tuple, list)) else (features,)
    in_dims = len(axis) if isinstance(axis, (tuple, list)) else 1
    return Projection(config, features, in_dims, tuple(kernel_axes), name=name)


class SwiGLU(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        cfg = self.config
        gate = projection(cfg, cfg.mlp_dim, -1, ("embed", "mlp"), "gate")(x_BTD)
        up = projection(cfg, cfg.mlp_dim, -1, ("embed", "mlp"), "up")(x_BTD)
        h_BTF = constrain(nn.silu(gate) * up, ("batch", "length", "mlp"))
        return projection(cfg, cfg.d_model, -1, ("mlp", "embed"), "down")(h_BTF)
