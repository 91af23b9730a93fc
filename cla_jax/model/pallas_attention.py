"""Pallas flash-attention kernels for training on accelerators: causal self-attention over
packed documents, the mask given as segment ids, never as [B, T, S] scores.

- gpu_flash_attention:  jax's Triton kernel (`pallas.ops.gpu.attention.mha`): an online-softmax
                        forward and one fused dK/dV/dQ backward kernel (its own custom_vjp).
- tpu_splash_attention: jax's splash attention (`pallas.ops.tpu.splash_attention`): a static
                        causal mask whose all-masked blocks are never visited, and segment ids;
                        with `window=W`, splash's `LocalMask` (left W - 1, right 0) instead, so
                        a sliding-window layer visits only the blocks its window touches.

A sliding window on GPU: jax's Triton `mha` masks by causality and segment ids only (no
window, nor a mask argument), so `gpu_flash_attention` has none; `attention.attend` runs a
local layer asked to run pallas_gpu by the blockwise kernel instead.

Both take q [B, T, N, H], k/v [B, T, K, H] with N a multiple of K (MHA, GQA, MQA) and segment
ids [B, T] (ints >= 0; padding is segment 0, one more segment). Self-attention only (S == T),
no cache: query i sees key j iff j <= i and both carry the same segment id, i.e.
`SegmentMask(positions=row indices, segment_ids).dense()`, the training mask; positions other
than the row indices are not expressible. Every row sees at least itself. Scale H**-0.5; the
output is [B, T, N, H] in q's dtype, gradients in their inputs' dtypes; scores, softmax and
accumulators are float32 inside the kernels. T need not be a multiple of the blocks: it is
padded, the padding given segment id -1, which matches no real token, and its rows dropped.
`interpret=True` runs either kernel on CPU (slowly: for tests). A pallas_call is one opaque
custom call to GSPMD, which does not split it: on a mesh, call these under shard_map (batch
over data/fsdp, heads over tensor), or the compiler gathers whole q, k, v onto every device.
jax 0.12 deprecates `pallas.ops.gpu.attention` (a DeprecationWarning on first use; successor
`tokamax.dot_product_attention`); its API is unchanged there, as is splash attention's.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from cla_jax.model.attention import check_window

_PAD_SEGMENT = -1  # padded tokens' segment id: equal to no real one (those are >= 0)
# The Pallas ops are imported on first use: CPU runs never need them, and a jax release that
# moves them breaks these two kernels, not every import of the model.

# GPU (Triton) defaults: the kernel's own `BlockSizes.get_default()`, shrunk where the blocks
# would not fit a GPU's shared memory.
GPU_BLOCK = 128           # forward query and key blocks
GPU_BLOCK_BACKWARD = 32   # every backward block
GPU_MIN_BLOCK = 16        # tl.dot's smallest operand side
# The forward kernel holds about four [block, head_dim] tiles in shared memory (seen on an
# H200: float32, blocks 128, head_dim 128 asked for 262656 bytes of the 232448 there, and
# failed). 160 KiB fits the A100's 164 KiB per block as well as Hopper's 227 KiB.
GPU_SHARED_MEMORY_BUDGET = 160 * 1024
# TPU (splash) defaults: the largest of these dividing the padded length.
TPU_BLOCKS = (512, 256, 128)
TPU_LANES = 128           # splash's query and key blocks are multiples of the lane count


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _pad_sequence(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, length: int):
    """q, k, v and segment ids padded along T to `length`; padding gets `_PAD_SEGMENT`."""
    pad = length - q_BTNH.shape[1]
    segment_ids_BT = jnp.asarray(segment_ids_BT, jnp.int32)
    if not pad:
        return q_BTNH, k_BSKH, v_BSKH, segment_ids_BT

    def pad_tokens(x):
        return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))

    return (pad_tokens(q_BTNH), pad_tokens(k_BSKH), pad_tokens(v_BSKH),
            jnp.pad(segment_ids_BT, [(0, 0), (0, pad)], constant_values=_PAD_SEGMENT))


def _check_shapes(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT):
    b, t, n, h = q_BTNH.shape
    if k_BSKH.shape != v_BSKH.shape or k_BSKH.shape[:2] != (b, t) or k_BSKH.shape[3] != h:
        raise ValueError(f"self-attention needs k, v [B, T, K, H] = [{b}, {t}, K, {h}]; got "
                         f"k {k_BSKH.shape}, v {v_BSKH.shape}")
    if n % k_BSKH.shape[2]:
        raise ValueError(f"{n} query heads are not a multiple of {k_BSKH.shape[2]} KV heads")
    if segment_ids_BT.shape != (b, t):
        raise ValueError(f"segment ids {segment_ids_BT.shape} are not [B, T] = [{b}, {t}]")


# ---------------------------------------------------------------- GPU: Triton flash attention
def _gpu_default_block(head_dim: int, itemsize: int) -> int:
    """The largest power-of-two block <= GPU_BLOCK whose four [block, head_dim] tiles (head_dim
    padded to a power of two, as the kernel does) fit `GPU_SHARED_MEMORY_BUDGET`."""
    padded = 1 << (head_dim - 1).bit_length()
    block = GPU_BLOCK
    while block > GPU_MIN_BLOCK and 4 * block * padded * itemsize > GPU_SHARED_MEMORY_BUDGET:
        block //= 2
    return block


def _gpu_block(block: int | None, default: int, t: int, name: str) -> int:
    if block is None:  # the default, or the shortest power of two covering T
        return min(default, max(GPU_MIN_BLOCK, 1 << (t - 1).bit_length()))
    if block < GPU_MIN_BLOCK or block & (block - 1):
        raise ValueError(f"{name}={block}: Triton blocks are powers of two >= {GPU_MIN_BLOCK}")
    return block


def gpu_flash_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, *, interpret: bool = False,
                        block_q: int | None = None, block_k: int | None = None,
                        block_backward: int | None = None):
    """Causal, segment-masked flash attention by jax's Triton Pallas kernel (GPU).

    The kernel indexes K/V by query head, so GQA/MQA K/V heads are repeated to N (each
    [B, T, N, H], as big as q, kept for the backward; autodiff sums dK, dV over the copies).
    block_q, block_k: the forward's query and key blocks (default 128, or less where four
    [block, head_dim] tiles would not fit 160 KiB of shared memory: 64 for float32 at
    head_dim 128); block_backward: every
    backward block (default 32; the fused backward pairs each key block with the query block
    of the same index, so one size). Blocks are powers of two >= 16; defaults are clipped to
    the shortest power of two covering T, and T is padded to a multiple of the largest block.
    Head dims that are not powers of two are padded in the kernel (masked loads). float32
    inputs run their dots as TF32 on GPU (Triton's default precision); use bf16 there.
    """
    from jax.experimental.pallas.ops.gpu import attention as triton_attention

    _check_shapes(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
    b, t, n, h = q_BTNH.shape
    groups = n // k_BSKH.shape[2]
    if groups > 1:
        k_BSKH = jnp.repeat(k_BSKH, groups, axis=2)  # KV head k serves query heads kG..kG+G-1
        v_BSKH = jnp.repeat(v_BSKH, groups, axis=2)
    default = _gpu_default_block(h, jnp.dtype(q_BTNH.dtype).itemsize)
    bq = _gpu_block(block_q, default, t, "block_q")
    bk = _gpu_block(block_k, default, t, "block_k")
    bb = _gpu_block(block_backward, GPU_BLOCK_BACKWARD, t, "block_backward")
    q, k, v, seg = _pad_sequence(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT,
                                 _round_up(t, max(bq, bk, bb)))
    block_sizes = triton_attention.BlockSizes(block_q=bq, block_k=bk, block_q_dkv=bb,
                                              block_kv_dkv=bb, block_q_dq=bb, block_kv_dq=bb)
    out = triton_attention.mha(q, k, v, seg, sm_scale=h ** -0.5, causal=True,
                               block_sizes=block_sizes, interpret=interpret)
    return out[:, :t].astype(q_BTNH.dtype)


# ---------------------------------------------------------------- TPU: splash attention
def _splash_kernel(heads: int, length: int, mqa: bool, block: int, interpret: bool,
                   window: int | None = None):
    """The splash kernel of one batch element (its mask processing is NumPy over the block
    grid, at trace time). Built afresh at every trace, never cached: flax's scan traces a
    layer group more than once, and a kernel built in one trace would carry its mask-info
    arrays into the next as leaked tracers. With a `window`, keys i - window < j <= i
    (`LocalMask`: q - left <= kv <= q + right): the blocks wholly outside are dropped from
    the kernel's grid, not just masked."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    def head_mask():
        if window is None:
            return splash.CausalMask((length, length))
        return splash.LocalMask((length, length), window_size=(window - 1, 0), offset=0)

    mask = splash.MultiHeadMask([head_mask() for _ in range(heads)])
    block_sizes = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    make = splash.make_splash_mqa_single_device if mqa else splash.make_splash_mha_single_device
    with jax.ensure_compile_time_eval():
        return make(mask, block_sizes=block_sizes, interpret=interpret)


def tpu_splash_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, *, interpret: bool = False,
                         block: int | None = None, window: int | None = None):
    """Causal, segment-masked flash attention by jax's splash attention kernel (TPU).

    GQA and MQA run natively: the kernel reads KV head i // G for query head i (the MQA
    kernel for K = 1), and accumulates dK, dV over the group. q is scaled by H**-0.5 before
    the kernel (splash does not scale), in q's dtype. block: every forward and backward
    block, a multiple of 128; default the largest of 512, 256, 128 dividing T rounded up to
    128. T is padded to a multiple of the block. The batch is vmapped. Lane-aligned head dims
    (128) are the fast case on TPU. window: a static int >= 1, query i then sees key j only
    if also i - j < window (row indices); None: global.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    _check_shapes(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
    b, t, n, h = q_BTNH.shape
    kv_heads = k_BSKH.shape[2]
    if block is None:
        block = next(size for size in TPU_BLOCKS if _round_up(t, TPU_LANES) % size == 0)
    elif block % TPU_LANES:
        raise ValueError(f"block={block}: splash blocks are multiples of {TPU_LANES}")
    q, k, v, seg = _pad_sequence(q_BTNH * h ** -0.5, k_BSKH, v_BSKH, segment_ids_BT,
                                 _round_up(t, block))
    length = q.shape[1]
    kernel = _splash_kernel(n, length, kv_heads == 1, block, bool(interpret),
                            check_window(window))
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, heads, T, H]
    if kv_heads == 1:
        k, v = k[:, 0], v[:, 0]  # the MQA kernel's [T, H]

    def one_row(q, k, v, seg):
        return kernel(q, k, v, splash.SegmentIds(q=seg, kv=seg))

    out = jax.vmap(one_row)(q, k, v, seg)  # [B, N, T, H]
    return out[:, :, :t].transpose(0, 2, 1, 3).astype(q_BTNH.dtype)
