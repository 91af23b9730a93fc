"""Attention kernels behind one switch (`model.attention`).

- reference: explicit einsums, float32 softmax; the readable definition.
- xla:       the same maths as two plain batched matmuls over [B*K, G*T, H]: every query head
             of a KV group is folded into the query axis, so MQA/GQA attention is a few big
             matmuls, with the softmax normalised after the PV matmul (1.6x faster than
             `jax.nn.dot_product_attention`'s XLA path, fwd+bwd, on CPU; benchmarks/README.md).
- cudnn:     the same API with cuDNN flash attention (GPU, bf16/fp16 only).
- auto:      cudnn where it applies (GPU, half precision, plain causal mask), else xla.

All take q [B, T, N, H], k/v [B, S, K, H] with N a multiple of K (MHA, GQA, MQA) and a
boolean mask [B, T, S] (True = attend).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def reference_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS):
    b, t, n, h = q_BTNH.shape
    kv_heads = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(b, t, kv_heads, n // kv_heads, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH,
                        preferred_element_type=jnp.float32) * (h ** -0.5)
    scores = jnp.where(mask_BTS[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BSKH.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v_BSKH)
    return out.reshape(b, t, n, h)


def folded_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS):
    b, t, n, h = q_BTNH.shape
    s, kv_heads = k_BSKH.shape[1], k_BSKH.shape[2]
    g = n // kv_heads
    # [B, T, K, G, H] -> [B*K, G*T, H]: the G query heads sharing a KV head become more rows.
    q = q_BTNH.reshape(b, t, kv_heads, g, h).transpose(0, 2, 3, 1, 4).reshape(b * kv_heads,
                                                                               g * t, h)
    k, v = (x.transpose(0, 2, 1, 3).reshape(b * kv_heads, s, h) for x in (k_BSKH, v_BSKH))
    scores = jnp.einsum("bqh,bsh->bqs", q, k, preferred_element_type=jnp.float32) * (h ** -0.5)
    mask = jnp.broadcast_to(mask_BTS[:, None, None], (b, kv_heads, g, t, s))
    scores = jnp.where(mask.reshape(b * kv_heads, g * t, s), scores, jnp.finfo(jnp.float32).min)
    # Softmax normalised after the PV matmul, as flash attention does: the backward pass keeps
    # one [B*K, G*T, S] buffer (the exponentials) instead of two (benchmarks/train_memory.py),
    # and the division touches T x H values, not T x S. The max only keeps exp in range; the
    # result does not depend on it, so it takes no gradient.
    e = jnp.exp(scores - jax.lax.stop_gradient(scores).max(axis=-1, keepdims=True))
    out = jnp.einsum("bqs,bsh->bqh", e.astype(v.dtype), v, preferred_element_type=jnp.float32)
    out = (out / e.sum(axis=-1, keepdims=True)).astype(v.dtype)
    return out.reshape(b, kv_heads, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def _use_cudnn(q_BTNH, causal_only: bool) -> bool:
    return (causal_only and jax.default_backend() == "gpu"
            and q_BTNH.dtype in (jnp.bfloat16, jnp.float16))


def attend(q_BTNH, k_BSKH, v_BSKH, mask_BTS, *, kind: str, causal_only: bool = False):
    """Attention output [B, T, N, H].

    causal_only: the mask is exactly the lower triangle (training without packing and
    without a cache), which lets cuDNN skip the masked blocks instead of reading a mask.
    """
    if kind == "reference":
        return reference_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS)
    if kind == "cudnn" or (kind == "auto" and _use_cudnn(q_BTNH, causal_only)):
        if causal_only:
            return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, is_causal=True,
                                                implementation="cudnn")
        return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS[:, None],
                                            implementation="cudnn")
    return folded_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS)
