"""Attention kernels behind one switch (`model.attention`).

- reference: explicit einsums, float32 softmax; the readable definition.
- xla:       `jax.nn.dot_product_attention(implementation="xla")`.
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
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS[:, None],
                                        implementation="xla")
