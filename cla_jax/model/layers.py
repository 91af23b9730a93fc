"""Llama-style building blocks: RMSNorm, rotary embeddings, SwiGLU, projections.

Every parameter carries logical axis names (embed, heads, kv_heads, head_dim, mlp, vocab,
norm) so that `cla_jax.sharding` can place it on a mesh; see DESIGN.md section 6.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cla_jax.config import ModelConfig
from cla_jax.sharding import constrain


def dtype_of(name: str):
    """A dtype from its config name ("bfloat16", "float32", ...)."""
    return jnp.dtype(name)


def gathered_axes(logical_axes: Sequence[str | None]) -> tuple[str | None, ...]:
    """A weight's logical axes with its FSDP split dropped (in `sharding.RULES` only "embed"
    maps to fsdp) and its tensor split kept: the layout a weight is computed with."""
    return tuple(None if axis == "embed" else axis for axis in logical_axes)


# Collectives in the compute dtype, gradients summed in the master dtype (DESIGN.md section 1:
# bf16 compute, fp32 master weights, fp32 gradient reduction). A master weight is cast to the
# compute dtype while still sharded and only then gathered over fsdp, so the all-gather moves
# bf16. Its gradient is computed by a matmul with a master-dtype (float32) result and pinned
# to the weight's sharded layout, so the cross-device sum that XLA inserts at that matmul (an
# all-reduce or reduce-scatter) runs in float32. jax's own transpose of the bf16 matmul would
# produce the gradient in bf16, and XLA would sum it across devices in bf16.

def cast_then_gather(weight: jax.Array, logical_axes: Sequence[str | None], dtype) -> jax.Array:
    """`weight` (laid out by `logical_axes`) in `dtype`, gathered over fsdp after the cast, so
    the all-gather moves `dtype`. Forward only: differentiated by jax, its gradient's sum is
    whatever the consumer's transpose gives (`weight_matmul` keeps it in float32)."""
    # Pinning the cast's output to the sharded layout first keeps XLA's sharding propagation
    # from moving the gather before the cast (it would then gather the float32 weight).
    weight = constrain(weight.astype(dtype), logical_axes)
    return constrain(weight, gathered_axes(logical_axes))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _with_master_gradient(y_MN, x, kernel, logical_axes, kernel_shape, kernel_dtype):
    """y itself; in the backward pass, the kernel's gradient x^T g in the kernel's dtype."""
    return y_MN


def _with_master_gradient_fwd(y_MN, x, kernel, logical_axes, kernel_shape, kernel_dtype):
    return y_MN, x


def _with_master_gradient_bwd(logical_axes, kernel_shape, kernel_dtype, x, g_MN):
    x_MK = x.reshape(g_MN.shape[0], -1)
    g_KN = jax.lax.dot_general(x_MK, g_MN, (((0,), (0,)), ((), ())),
                               preferred_element_type=kernel_dtype)
    # x's gradient comes from the matmul itself (None: nothing to add here).
    return g_MN, None, constrain(g_KN.reshape(kernel_shape), logical_axes)


_with_master_gradient.defvjp(_with_master_gradient_fwd, _with_master_gradient_bwd)


def weight_matmul(x: jax.Array, kernel: jax.Array, logical_axes: Sequence[str | None],
                  dtype, in_dims: int = 1) -> jax.Array:
    """x [..., K] (its last `in_dims` axes flattened to K) @ `kernel` (a master param of K x N
    elements laid out by `logical_axes`) in the compute `dtype`, as [M, N] with M the product
    of x's leading axes: the kernel is cast, then gathered over fsdp; its gradient is computed
    and summed across devices in the kernel's own dtype. The values are those of
    `x.reshape(M, K).astype(dtype) @ kernel.reshape(K, N).astype(dtype)`.

    The matmul itself stays a plain one (remat policies such as "dots" see and save it), and
    gives x its gradient; the kernel's gradient comes from `_with_master_gradient`, which keeps
    x for the backward pass as it came (cast, not reshaped): projections of one input (q, k, v;
    gate, up) and the value its producer keeps anyway (the attention output, SwiGLU's product)
    are then one saved array, not one per consumer (benchmarks/README.md, train memory)."""
    x = x.astype(dtype)
    fan_in = math.prod(x.shape[x.ndim - in_dims:])
    w_KN = cast_then_gather(kernel, logical_axes, dtype).reshape(fan_in, -1)
    y_MN = x.reshape(-1, fan_in) @ jax.lax.stop_gradient(w_KN)
    return _with_master_gradient(y_MN, x, kernel, tuple(logical_axes), kernel.shape,
                                 kernel.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _lookup(table_VD, tokens_BT, logical_axes, dtype, table_shape, table_dtype):
    return jnp.take(cast_then_gather(table_VD, logical_axes, dtype), tokens_BT, axis=0)


def _lookup_fwd(table_VD, tokens_BT, logical_axes, dtype, table_shape, table_dtype):
    return _lookup(table_VD, tokens_BT, logical_axes, dtype, table_shape, table_dtype), tokens_BT


def _lookup_bwd(logical_axes, dtype, table_shape, table_dtype, tokens_BT, g_BTD):
    # Every row's cotangent goes to the devices holding its slice of d_model: rows split over
    # data only, d_model over fsdp as in the table (an all-to-all within each data group);
    # each device then adds its group's rows into its own slice of the table, and the data
    # groups' partial tables are summed. Left to GSPMD, a mesh with data and fsdp both > 1
    # gathered every row onto every device ("involuntary full rematerialization").
    g_BTD = constrain(g_BTD, ("data_batch", "length", logical_axes[-1]))
    tokens_BT = constrain(tokens_BT, ("data_batch", "length"))
    # The rows of a repeated token are summed in the master dtype too: a bf16 scatter-add of a
    # frequent token's hundreds of rows would round at every add.
    g_VD = jnp.zeros(table_shape, table_dtype).at[tokens_BT].add(g_BTD.astype(table_dtype),
                                                               mode="drop")
    return constrain(g_VD, logical_axes), None


_lookup.defvjp(_lookup_fwd, _lookup_bwd)


def embedding_lookup(table_VD: jax.Array, tokens_BT: jax.Array,
                     logical_axes: Sequence[str | None], dtype) -> jax.Array:
    """Rows `tokens_BT` of an embedding table (a master param laid out by `logical_axes`) in
    the compute `dtype`: the table is cast, then gathered over fsdp; its gradient (a
    scatter-add of the rows' cotangents, then a cross-device sum) is in the table's dtype."""
    return _lookup(table_VD, tokens_BT, tuple(logical_axes), jnp.dtype(dtype), table_VD.shape,
                   table_VD.dtype)


def normal_init(config: ModelConfig, axes: Sequence[str]):
    """N(0, init_std) init (the paper's 0.01275) annotated with logical axes."""
    return nn.with_logical_partitioning(nn.initializers.normal(config.init_std), tuple(axes))


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned scale; its statistics in float32."""
    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        cfg = self.config
        # "norm": a vector per layer, replicated (sharding it would split the [B, T, D] terms of
        # its gradient on D, against their batch split).
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x_BTD.shape[-1],), dtype_of(cfg.param_dtype))
        return _rms_norm(x_BTD, scale, cfg.norm_eps, dtype_of(cfg.dtype))


@functools.partial(jax.checkpoint, static_argnums=(2, 3))
def _rms_norm(x_BTD, scale_D, eps: float, dtype):
    """Statistics in float32 whatever the compute dtype (bf16 variance underflows). Under
    jax.checkpoint, the backward pass keeps only x (which the residual stream keeps anyway)
    and recomputes the normalised x and its rsqrt."""
    x = x_BTD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return (x * scale_D.astype(jnp.float32)).astype(dtype)


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
        y = weight_matmul(x, kernel, self.kernel_axes, dtype_of(cfg.dtype), self.in_dims)
        return y.reshape(*x.shape[:x.ndim - self.in_dims], *self.features)


def projection(config: ModelConfig, features, axis, kernel_axes: Sequence[str], name: str):
    """A `Projection` of the trailing axes `axis` (-1 or (-2, -1)) onto `features`."""
    features = tuple(features) if isinstance(features, (tuple, list)) else (features,)
    in_dims = len(axis) if isinstance(axis, (tuple, list)) else 1
    return Projection(config, features, in_dims, tuple(kernel_axes), name=name)


@jax.checkpoint
def _swiglu(gate, up):
    """silu(gate) * up, keeping only gate and up for the backward pass (the sigmoid is
    recomputed there): two [B, T, mlp] arrays saved instead of four or five."""
    return nn.silu(gate) * up


class SwiGLU(nn.Module):
    """The feed-forward block: down(silu(gate(x)) * up(x))."""
    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        cfg = self.config
        gate = projection(cfg, cfg.mlp_dim, -1, ("embed", "mlp"), "gate")(x_BTD)
        up = projection(cfg, cfg.mlp_dim, -1, ("embed", "mlp"), "up")(x_BTD)
        h_BTF = constrain(_swiglu(gate, up), ("batch", "length", "mlp"))
        return projection(cfg, cfg.d_model, -1, ("mlp", "embed"), "down")(h_BTF)
