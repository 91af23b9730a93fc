"""Attention kernels behind one switch (`model.attention`).

- reference: explicit einsums, float32 softmax; the readable definition.
- xla:       the same maths as two plain batched matmuls over [B*K, G*T, H]: every query head
             of a KV group is folded into the query axis, so MQA/GQA attention is a few big
             matmuls, with the softmax normalised after the PV matmul (1.6x faster than
             `jax.nn.dot_product_attention`'s XLA path, fwd+bwd, on CPU; benchmarks/README.md).
- blockwise: flash-style attention in plain XLA, over query x key blocks with an online
             softmax and a recomputing backward: memory linear in the sequence length, and
             the packed-document mask comes as segment ids and positions, never as [B, T, S].
- cudnn:     the same API with cuDNN flash attention (GPU, bf16/fp16 only).
- pallas_gpu, splash: jax's Pallas flash kernels for GPU (Triton) and TPU (splash attention),
             packed documents as segment ids (`pallas_attention`), run shard by shard on a
             mesh; on any other backend they run in Pallas's interpreter (tests only: slow).
- auto:      `choose_kernel` picks one per backend and call site and logs each choice once.

All take q [B, T, N, H], k/v [B, S, K, H] with N a multiple of K (MHA, GQA, MQA). The dense
kernels take a boolean mask [B, T, S] (True = attend); the flash kernels (blockwise,
pallas_gpu, splash) take a `SegmentMask`.

Sliding-window (local) layers: `attend(..., window=W)`, W an int >= 1, lets query i see key j
only if also 0 <= i - j < W (positions; Gemma/Mistral-style local attention); None is global.
- reference, xla, cudnn with a dense mask: the caller's mask already has the window
  (`SegmentMask.dense(window)`); `window` is not read.
- cudnn, causal_only: cuDNN's own sliding window (`local_window_size=(W - 1, 0)`, which jax
  passes on as cuDNN's `sliding_window_length` W: keys in (i - W, i]), masked blocks skipped.
- blockwise: the window in every block's mask, and block pairs wholly outside it skipped,
  forward and backward.
- splash: splash's `LocalMask` (left W - 1, right 0: causal too), whose blocks outside the
  window are never visited (the kernel's grid shrinks to the blocks a row needs).
- pallas_gpu: jax's Triton `mha` has no window (its masks are causal and segment ids only),
  so a local layer asked to run pallas_gpu runs blockwise, logged once.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from absl import logging

from cla_jax import sharding

BLOCK = 512  # blockwise's default query and key block: matmuls big enough to run well on CPU


def reference_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS):
    """Grouped-query attention in plain jnp: softmax(q k^T / sqrt(H)) v under `mask_BTS`
    (True = attend), scores and softmax in float32."""
    b, t, n, h = q_BTNH.shape
    kv_heads = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(b, t, kv_heads, n // kv_heads, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH,
                        preferred_element_type=jnp.float32) * (h ** -0.5)
    scores = jnp.where(mask_BTS[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BSKH.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v_BSKH)
    return out.reshape(b, t, n, h)


def _fold_queries(x_BTNH, kv_heads: int):
    """[B, T, N, H] -> [B*K, G, T, H]: the G query heads sharing a KV head side by side."""
    b, t, n, h = x_BTNH.shape
    g = n // kv_heads
    return x_BTNH.reshape(b, t, kv_heads, g, h).transpose(0, 2, 3, 1, 4).reshape(
        b * kv_heads, g, t, h)


def _unfold_queries(x, b: int, kv_heads: int):
    """[B*K, G, T, H] -> [B, T, N, H]."""
    _, g, t, h = x.shape
    return x.reshape(b, kv_heads, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, kv_heads * g, h)


def _fold_keys(x_BSKH):
    """[B, S, K, H] -> [B*K, S, H]."""
    b, s, kv_heads, h = x_BSKH.shape
    return x_BSKH.transpose(0, 2, 1, 3).reshape(b * kv_heads, s, h)


def _fold_mask(mask_BTS, kv_heads: int, g: int):
    """[B, T, S] -> [B*K, G*T, S], matching the folded queries' rows."""
    b, t, s = mask_BTS.shape
    return jnp.broadcast_to(mask_BTS[:, None, None], (b, kv_heads, g, t, s)).reshape(
        b * kv_heads, g * t, s)


def folded_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS):
    """Grouped-query attention with each KV head's G query heads folded into rows
    ([B*K, G*T, H]), so the scores are one batched matmul; the same result as
    `reference_attention`."""
    b, t, n, h = q_BTNH.shape
    kv_heads = k_BSKH.shape[2]
    g = n // kv_heads
    # [B, T, K, G, H] -> [B*K, G*T, H]: the G query heads sharing a KV head become more rows.
    q = _fold_queries(q_BTNH, kv_heads).reshape(b * kv_heads, g * t, h)
    k, v = _fold_keys(k_BSKH), _fold_keys(v_BSKH)
    scores = jnp.einsum("bqh,bsh->bqs", q, k, preferred_element_type=jnp.float32) * (h ** -0.5)
    scores = jnp.where(_fold_mask(mask_BTS, kv_heads, g), scores, jnp.finfo(jnp.float32).min)
    # Softmax normalised after the PV matmul, as flash attention does: the backward pass keeps
    # one [B*K, G*T, S] buffer (the exponentials) instead of two (benchmarks/train_memory.py),
    # and the division touches T x H values, not T x S. The max only keeps exp in range; the
    # result does not depend on it, so it takes no gradient.
    e = jnp.exp(scores - jax.lax.stop_gradient(scores).max(axis=-1, keepdims=True))
    out = jnp.einsum("bqs,bsh->bqh", e.astype(v.dtype), v, preferred_element_type=jnp.float32)
    out = (out / e.sum(axis=-1, keepdims=True)).astype(v.dtype)
    return _unfold_queries(out.reshape(b * kv_heads, g, t, h), b, kv_heads)


# ---------------------------------------------------------------- blockwise (flash-style) XLA
class SegmentMask(NamedTuple):
    """The causal packed-document mask of self-attention as the per-token data it is made of,
    not as the [B, T, T] array: token i sees token j iff both carry the same segment id and
    positions[j] <= positions[i]. The model passes each token's index in its row as its
    position, so this is exactly its dense mask (`dense()`); padding (segment 0) is one more
    segment, as there."""

    positions_BT: jax.Array
    segment_ids_BT: jax.Array

    def dense(self, window: int | None = None) -> jax.Array:
        """The [B, T, T] mask; with a `window`, also positions[i] - positions[j] < window."""
        seg, pos = self.segment_ids_BT, self.positions_BT
        mask = (seg[:, :, None] == seg[:, None, :]) & (pos[:, None, :] <= pos[:, :, None])
        if window is None:
            return mask
        return mask & (pos[:, :, None] - pos[:, None, :] < check_window(window))


def check_window(window: int | None) -> int | None:
    """`window` if it is None or an int >= 1 (a static sliding-window size), else ValueError."""
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                               or window < 1):
        raise ValueError(f"window={window!r}: a sliding window is an int >= 1 (or None: global)")
    return window


def _split_blocks(x, axis: int, block: int, pad_value=0):
    """x padded along `axis` to a multiple of `block` and cut there; the block index becomes a
    new leading axis."""
    n = -(-x.shape[axis] // block)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, n * block - x.shape[axis])
    x = jnp.pad(x, pad, constant_values=pad_value)
    return jnp.moveaxis(x.reshape(x.shape[:axis] + (n, block) + x.shape[axis + 1:]), axis, 0)


def _join_blocks(x, axis: int, length: int):
    """Inverse of `_split_blocks(x, axis, ...)`, the padding dropped."""
    x = jnp.moveaxis(x, 0, axis)
    x = x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])
    return jax.lax.slice_in_dim(x, 0, length, axis=axis)


class _Blocks(NamedTuple):
    """Everything cut into blocks: queries [nq, B*K, G*bq, H] (folded as `folded_attention`
    folds them), keys and values [nk, B*K, bk, H], positions and segment ids [n, B, block].
    Padded queries and keys get segment ids (-2, -1) that match nothing."""
    q: jax.Array
    k: jax.Array
    v: jax.Array
    q_pos: jax.Array
    q_seg: jax.Array
    kv_pos: jax.Array
    kv_seg: jax.Array


def _query_blocks(x_BTNH, kv_heads: int, block: int):
    """[B, T, N, H] -> [nq, B*K, G*bq, H]."""
    x = _split_blocks(_fold_queries(x_BTNH, kv_heads), 2, block)
    return x.reshape(x.shape[:2] + (-1, x.shape[-1]))


def _to_blocks(q_BTNH, k_BSKH, v_BSKH, mask: SegmentMask, kv_mask: SegmentMask, block_q,
               block_kv) -> _Blocks:
    kv_heads = k_BSKH.shape[2]
    int32 = functools.partial(jnp.asarray, dtype=jnp.int32)
    return _Blocks(
        _query_blocks(q_BTNH, kv_heads, block_q),
        _split_blocks(_fold_keys(k_BSKH), 1, block_kv),
        _split_blocks(_fold_keys(v_BSKH), 1, block_kv),
        _split_blocks(int32(mask.positions_BT), 1, block_q, 0),
        _split_blocks(int32(mask.segment_ids_BT), 1, block_q, -2),
        _split_blocks(int32(kv_mask.positions_BT), 1, block_kv, jnp.iinfo(jnp.int32).max),
        _split_blocks(int32(kv_mask.segment_ids_BT), 1, block_kv, -1))


def _block_mask(q_pos, q_seg, kv_pos, kv_seg, kv_heads: int, g: int, window: int | None):
    """The [B*K, G*bq, bk] mask of one query block [B, bq] against one key block [B, bk], and
    whether any entry of it is True, judged from block-wide bounds (cheap, conservative): not
    if every key comes after every query, the segment ranges are apart, or (with a window)
    every key is at least `window` positions behind every query. With index positions that is
    every key block after the query block, and every one wholly behind its window."""
    mask_BQS = (q_seg[:, :, None] == kv_seg[:, None, :]) & (kv_pos[:, None, :] <= q_pos[:, :, None])
    later = kv_pos.min(axis=1) > q_pos.max(axis=1)
    apart = (kv_seg.min(axis=1) > q_seg.max(axis=1)) | (kv_seg.max(axis=1) < q_seg.min(axis=1))
    hidden = later | apart
    if window is not None:
        mask_BQS &= q_pos[:, :, None] - kv_pos[:, None, :] < window
        # Bounds over real tokens only: padded queries (position 0) and keys (int32 max) would
        # stretch them. A block of padding alone gets the fill values, so counts as hidden.
        big, small = jnp.iinfo(jnp.int32).max, jnp.iinfo(jnp.int32).min
        newest_key = jnp.where(kv_seg >= 0, kv_pos, small).max(axis=1)
        oldest_query = jnp.where(q_seg >= 0, q_pos, big).min(axis=1)
        hidden |= newest_key <= oldest_query - window
    return _fold_mask(mask_BQS, kv_heads, g), jnp.any(~hidden)


def _scores(q, k):
    return jnp.einsum("bqh,bsh->bqs", q, k, preferred_element_type=jnp.float32) * (
        q.shape[-1] ** -0.5)


def _loop(n: int, body, init):
    """body(i, carry) for i in range(n), as a while loop. Not lax.scan (nor fori_loop, which
    becomes one): differentiating a scan over layers, jax splits these block loops' work that
    depends on layer-invariant inputs (the masks) from the rest and keeps its per-iteration
    results for every block pair, [T, S]-sized memory (measured: 0.7 GiB at T = 4096 in a
    2-layer scan). A while loop keeps nothing between iterations."""
    return jax.lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, body(c[0], c[1])),
                              (jnp.int32(0), init))[1]


def _blockwise_forward(q_BTNH, k_BSKH, v_BSKH, mask, kv_mask, block_q, block_kv, window):
    """Output [B, T, N, H] and each query row's logsumexp [nq, B*K, G*bq] (+inf: sees nothing)."""
    b, t, n, h = q_BTNH.shape
    kv_heads = k_BSKH.shape[2]
    g = n // kv_heads
    blocks = _to_blocks(q_BTNH, k_BSKH, v_BSKH, mask, kv_mask, block_q, block_kv)
    rows_shape = blocks.q.shape[1:3]

    def query_block(i, outputs):
        out_all, lse_all = outputs
        q_i, qpos_i, qseg_i = blocks.q[i], blocks.q_pos[i], blocks.q_seg[i]

        def key_block(j, carry):
            k_j, v_j = blocks.k[j], blocks.v[j]
            mask_ij, visible = _block_mask(qpos_i, qseg_i, blocks.kv_pos[j], blocks.kv_seg[j],
                                           kv_heads, g, window)

            def online_softmax_step(carry):
                m, denom, acc = carry
                s = jnp.where(mask_ij, _scores(q_i, k_j), -jnp.inf)
                m_new = jnp.maximum(m, s.max(axis=-1))
                m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # the row has seen nothing
                p = jnp.where(mask_ij, jnp.exp(s - m_safe[..., None]), 0.0)
                correction = jnp.exp(m - m_safe)
                acc = acc * correction[..., None] + jnp.einsum(
                    "bqs,bsh->bqh", p.astype(v_j.dtype), v_j, preferred_element_type=jnp.float32)
                return m_new, denom * correction + p.sum(axis=-1), acc

            return jax.lax.cond(visible, online_softmax_step, lambda c: c, carry)

        init = (jnp.full(rows_shape, -jnp.inf, jnp.float32), jnp.zeros(rows_shape, jnp.float32),
                jnp.zeros(rows_shape + (h,), jnp.float32))
        m, denom, acc = _loop(blocks.k.shape[0], key_block, init)
        seen = denom != 0  # not `> 0`: a NaN input must give NaN, not an empty row's zeros
        denom = jnp.where(seen, denom, 1.0)
        out = jnp.where(seen[..., None], acc / denom[..., None], 0.0).astype(q_BTNH.dtype)
        return out_all.at[i].set(out), lse_all.at[i].set(
            jnp.where(seen, m + jnp.log(denom), jnp.inf))

    out, lse = _loop(blocks.q.shape[0], query_block, (
        jnp.zeros(blocks.q.shape, q_BTNH.dtype), jnp.zeros(blocks.q.shape[:3], jnp.float32)))
    out = _join_blocks(out.reshape(out.shape[:2] + (g, -1, h)), 2, t)  # [B*K, G, T, H]
    return _unfold_queries(out, b, kv_heads), lse


def _blockwise_backward(block_q, block_kv, window, residuals, d_out_BTNH):
    """FlashAttention-2's backward: one pass over the key blocks (each carrying its dK, dV),
    each over the query blocks (adding to dQ), every block's probabilities recomputed from the
    saved logsumexp. Nothing [T, S]-sized is kept."""
    q_BTNH, k_BSKH, v_BSKH, mask, kv_mask, out_BTNH, lse = residuals
    b, t, n, h = q_BTNH.shape
    s_len, kv_heads = k_BSKH.shape[1], k_BSKH.shape[2]
    g = n // kv_heads
    blocks = _to_blocks(q_BTNH, k_BSKH, v_BSKH, mask, kv_mask, block_q, block_kv)
    d_out = _query_blocks(d_out_BTNH, kv_heads, blocks.q.shape[2] // g)
    out = _query_blocks(out_BTNH, kv_heads, blocks.q.shape[2] // g)
    # rowsum(dO * O): the softmax Jacobian's diagonal term, one number per query row.
    delta = jnp.einsum("nbqh,nbqh->nbq", d_out.astype(jnp.float32), out.astype(jnp.float32))

    def key_block(j, grads):
        dq_all, dk_all, dv_all = grads
        k_j, v_j = blocks.k[j], blocks.v[j]

        def query_block(i, carry):
            dq_all, dk, dv = carry
            q_i, do_i, lse_i, delta_i = blocks.q[i], d_out[i], lse[i], delta[i]
            mask_ij, visible = _block_mask(blocks.q_pos[i], blocks.q_seg[i], blocks.kv_pos[j],
                                           blocks.kv_seg[j], kv_heads, g, window)

            def block_grads(carry):
                dq_all, dk, dv = carry
                p = jnp.where(mask_ij, jnp.exp(_scores(q_i, k_j) - lse_i[..., None]), 0.0)
                dv = dv + jnp.einsum("bqs,bqh->bsh", p.astype(do_i.dtype), do_i,
                                     preferred_element_type=jnp.float32)
                dp = jnp.einsum("bqh,bsh->bqs", do_i, v_j, preferred_element_type=jnp.float32)
                ds = (p * (dp - delta_i[..., None]) * h ** -0.5).astype(q_i.dtype)
                dk = dk + jnp.einsum("bqs,bqh->bsh", ds, q_i, preferred_element_type=jnp.float32)
                dq_all = dq_all.at[i].add(jnp.einsum("bqs,bsh->bqh", ds, k_j,
                                                     preferred_element_type=jnp.float32))
                return dq_all, dk, dv

            return jax.lax.cond(visible, block_grads, lambda c: c, carry)

        zeros = jnp.zeros(k_j.shape, jnp.float32)
        dq_all, dk, dv = _loop(blocks.q.shape[0], query_block, (dq_all, zeros, zeros))
        return dq_all, dk_all.at[j].set(dk), dv_all.at[j].set(dv)

    dq, dk, dv = _loop(blocks.k.shape[0], key_block, (
        jnp.zeros(blocks.q.shape, jnp.float32), jnp.zeros(blocks.k.shape, jnp.float32),
        jnp.zeros(blocks.k.shape, jnp.float32)))
    dq = _join_blocks(dq.reshape(dq.shape[:2] + (g, -1, h)), 2, t)
    dq = _unfold_queries(dq, b, kv_heads).astype(q_BTNH.dtype)

    def unfold_keys(x, dtype):  # [nk, B*K, bk, H] -> [B, S, K, H]
        x = _join_blocks(x, 1, s_len).reshape(b, kv_heads, s_len, h)
        return x.transpose(0, 2, 1, 3).astype(dtype)

    # No gradient for the masks.
    return dq, unfold_keys(dk, k_BSKH.dtype), unfold_keys(dv, v_BSKH.dtype), None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _blockwise(q_BTNH, k_BSKH, v_BSKH, mask, kv_mask, block_q, block_kv, window):
    return _blockwise_forward(q_BTNH, k_BSKH, v_BSKH, mask, kv_mask, block_q, block_kv,
                              window)[0]


def _blockwise_fwd(q_BTNH, k_BSKH, v_BSKH, mask, kv_mask, block_q, block_kv, window):
    out, lse = _blockwise_forward(q_BTNH, k_BSKH, v_BSKH, mask, kv_mask, block_q, block_kv,
                                  window)
    return out, (q_BTNH, k_BSKH, v_BSKH, mask, kv_mask, out, lse)


_blockwise.defvjp(_blockwise_fwd, _blockwise_backward)


def blockwise_attention(q_BTNH, k_BSKH, v_BSKH, mask: SegmentMask,
                        kv_mask: SegmentMask | None = None, *, block_q: int | None = None,
                        block_kv: int | None = None, window: int | None = None):
    """Flash-style attention in plain XLA: chunked over query and key blocks with an online
    softmax, so no [T, S] array exists, forward or backward (the backward recomputes each
    block from the saved per-row logsumexp; it keeps q, k, v, the output and T floats a row).

    mask: the queries' positions and segment ids [B, T]; kv_mask: the keys' [B, S] (default:
    the same, self-attention). Query i sees key j iff their segment ids are equal and key j's
    position is <= query i's; with a `window` (a static int >= 1), also less than `window`
    behind it. Block pairs where no query can see any key are skipped. A query
    that sees no key gets zeros (the dense kernels give it the mean of V). Segment ids must be
    >= 0; T and S need not be multiples of the blocks (padded). Scores, softmax and
    accumulators are float32; the output has the input dtype. Blocks default to `BLOCK`, or
    the whole sequence where it is shorter.
    """
    kv_mask = mask if kv_mask is None else kv_mask
    t, s = q_BTNH.shape[1], k_BSKH.shape[1]
    return _blockwise(q_BTNH, k_BSKH, v_BSKH, mask, kv_mask, min(block_q or BLOCK, t),
                      min(block_kv or BLOCK, s), check_window(window))


# ---------------------------------------------------------------- Pallas kernels
PALLAS_BACKENDS = {"pallas_gpu": "gpu", "splash": "tpu"}  # kernel -> the backend it compiles for
FLASH_KERNELS = ("blockwise", *PALLAS_BACKENDS)  # the kernels that take a `SegmentMask`
Q_AXES = ("batch", "length", "heads", "head_dim")
KV_AXES = ("batch", "length", "kv_heads", "head_dim")


def pallas_fits_mesh(num_heads: int, num_kv_heads: int) -> bool:
    """Whether each device's shard of the heads is a whole attention problem: query head n
    finds its KV head n // G among the local ones when the KV heads split as the query heads
    do, or when there is one KV head (MQA: replicated)."""
    return num_kv_heads == 1 or (sharding.split_over("kv_heads", num_kv_heads)
                                 == sharding.split_over("heads", num_heads))


def pallas_attention(kind: str, q_BTNH, k_BSKH, v_BSKH, mask: SegmentMask,
                     window: int | None = None):
    """`kind`'s Pallas kernel on the causal packed mask (its segment ids; positions are the
    row indices, as the model's are), shard by shard on the active mesh. A `window` only on
    splash (the Triton kernel has none: `attend` runs such a layer blockwise)."""
    from cla_jax.model import pallas_attention as kernels  # Pallas loads only where used

    if kind == "pallas_gpu":
        if window is not None:
            raise ValueError("pallas_gpu (jax's Triton mha) has no sliding window: run "
                             "blockwise, as attend does")
        fn = kernels.gpu_flash_attention
    else:
        fn = functools.partial(kernels.tpu_splash_attention, window=window)
    interpret = sharding.platform() != PALLAS_BACKENDS[kind]
    return sharding.per_shard(functools.partial(fn, interpret=interpret),
                              (q_BTNH, k_BSKH, v_BSKH, mask.segment_ids_BT),
                              (Q_AXES, KV_AXES, KV_AXES, ("batch", "length")))


# ---------------------------------------------------------------- choosing a kernel
_logged_choices: set = set()


def _log_choice(kernel: str, reason: str) -> None:
    if (kernel, reason) not in _logged_choices:
        _logged_choices.add((kernel, reason))
        logging.info("model.attention runs %s attention: %s", kernel, reason)


def choose_kernel(requested: str, *, dtype, seq_len: int, causal_only: bool,
                  with_cache: bool, num_heads: int = 1, num_kv_heads: int = 1) -> str:
    """The kernel a call site runs: `requested`, or for "auto" the best one here, logged once
    per distinct (kernel, reason). The flash kernels (blockwise, pallas_gpu, splash) serve
    self-attention without a cache only (a cache is attended through a dense mask over its
    slots): there they give way to xla, as Pallas kernels do to blockwise on a mesh that splits
    the query heads but not the KV heads (`pallas_fits_mesh`)."""
    if requested != "auto":
        if requested in FLASH_KERNELS and with_cache:
            return "xla"
        if requested in PALLAS_BACKENDS and not pallas_fits_mesh(num_heads, num_kv_heads):
            _log_choice("blockwise", f"{requested} needs the KV heads split as the query heads")
            return "blockwise"
        if requested in PALLAS_BACKENDS and sharding.platform() != PALLAS_BACKENDS[requested]:
            _log_choice(requested, f"in Pallas's interpreter on {sharding.platform()} (slow)")
        return requested
    backend = sharding.platform()
    half = dtype in (jnp.bfloat16, jnp.float16)
    if with_cache:
        kernel, reason = "xla", "a KV cache: a dense mask over its slots"
    elif backend == "gpu" and causal_only and half:
        kernel, reason = "cudnn", "GPU, half precision, a plain causal mask"
    elif backend in ("gpu", "tpu") and pallas_fits_mesh(num_heads, num_kv_heads):
        kernel = "pallas_gpu" if backend == "gpu" else "splash"
        reason = f"{backend}, packed documents: Pallas flash attention with segment ids"
    elif backend in ("gpu", "tpu"):
        kernel, reason = "blockwise", (f"{backend}, a mesh that splits the query heads but not "
                                       "the KV heads, which the Pallas kernels need")
    elif seq_len > BLOCK:
        kernel, reason = "blockwise", (f"{backend}, sequences longer than one {BLOCK}-token "
                                       "block: memory linear in their length")
    else:
        kernel, reason = "xla", f"{backend}, sequences within one {BLOCK}-token block"
    _log_choice(kernel, reason)
    return kernel


def causal_window(window: int | None) -> tuple[int, int] | None:
    """`jax.nn.dot_product_attention`'s `local_window_size` for our `window`: jax's (left,
    right) lets query i see keys i - left <= j <= i + right, so 0 <= i - j < W is (W - 1, 0)
    (cuDNN gets `sliding_window_length` left + 1 = W: keys in (i - W, i])."""
    return None if check_window(window) is None else (window - 1, 0)


def cudnn_attention(q_BTNH, k_BSKH, v_BSKH, mask, *, causal_only: bool,
                    window: int | None = None, implementation: str = "cudnn"):
    """`jax.nn.dot_product_attention` by cuDNN: causal (and windowed) by cuDNN's own masks
    when `causal_only`, else under the dense `mask` [B, T, S] (which carries any window).
    `implementation="xla"` runs jax's XLA path with the same arguments (tests on CPU)."""
    if causal_only:
        return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, is_causal=True,
                                            local_window_size=causal_window(window),
                                            implementation=implementation)
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask[:, None],
                                        implementation=implementation)


def attend(q_BTNH, k_BSKH, v_BSKH, mask, *, kind: str, causal_only: bool = False,
           window: int | None = None):
    """Attention output [B, T, N, H] by the kernel `kind` (a `choose_kernel` result).

    mask: a `SegmentMask` for the flash kernels, else a boolean [B, T, S] array.
    causal_only: the mask is exactly the lower triangle (training without packing and
    without a cache), which lets cuDNN skip the masked blocks instead of reading a mask.
    window: a local layer's sliding window (a static int >= 1: query i sees key j only if
    0 <= i - j < window), applied by the flash kernels and causal_only cuDNN; a dense mask
    must carry it already (`SegmentMask.dense(window)`). pallas_gpu, which has no window,
    runs blockwise then. None: global attention.
    """
    check_window(window)
    if kind == "pallas_gpu" and window is not None:
        _log_choice("blockwise", "a sliding window, which pallas_gpu (jax's Triton mha) lacks")
        kind = "blockwise"
    if kind == "blockwise":
        return blockwise_attention(q_BTNH, k_BSKH, v_BSKH, mask, window=window)
    if kind in PALLAS_BACKENDS:
        return pallas_attention(kind, q_BTNH, k_BSKH, v_BSKH, mask, window)
    if kind == "reference":
        return reference_attention(q_BTNH, k_BSKH, v_BSKH, mask)
    if kind == "cudnn":
        return cudnn_attention(q_BTNH, k_BSKH, v_BSKH, mask, causal_only=causal_only,
                               window=window)
    return folded_attention(q_BTNH, k_BSKH, v_BSKH, mask)
