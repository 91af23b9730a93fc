"""The paged KV cache: the grouped cache's K/V in fixed-size blocks that sequences share out.

A block pool holds the grouped cache (`cla_jax.cache`) in blocks: per stage, K and V are
[kv_heads, groups_in_stage, num_blocks, block_size, head_dim] (an int8 pool adds its
per-token scales, [kv_heads, groups, num_blocks, block_size]), so a producer group's K/V is
still written once and read by every layer of its group, and layers that reuse K/V still
have no entry. KV heads come first, as jax's Pallas paged-attention kernels take pages
([kv_heads, pages, page_size, head_dim]): a stage's pool is one such page array of
groups x num_blocks pages, and group g's block b is page g x num_blocks + b, so a kernel
reads any group's blocks in place, with no copy of the group out of the stage. A sequence owns a
block table, the blocks holding its positions in order: position p lives in block
table[p // block_size] at offset p % block_size. Block 0 is the null block, never given to a
sequence: padding tokens write there and unused table entries point there.

One engine step is one forward over `T = D + P * C` tokens laid out one per row ([T, 1]):
D decode tokens (one per running sequence), then P prefill rows of C tokens (a chunk of a
prompt each). `PagedBatch` says where each token's K/V goes and which blocks each of the
D + P rows reads; `attend` runs the two parts: prefill rows against their gathered blocks
(an XLA gather: every backend), decode rows the same way or, where jax has one for the
platform compiled for, through a Pallas paged-attention kernel (`choose_kernel`).
"""
from __future__ import annotations

from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

from cla_jax import sharding
from cla_jax.cache import StageCache, dequantize, empty_stages, quantize
from cla_jax.config import ModelConfig
from cla_jax.model.attention import folded_attention, pallas_fits_mesh
from cla_jax.sharding import constrain

# A pool leaf's logical axes: KV heads split over tensor as in the slot cache; blocks whole
# on every device (any sequence may own any block). Scales drop head_dim.
POOL_AXES = ("kv_heads", "layers", None, None, "head_dim")
NULL_BLOCK = 0
KERNELS = ("xla", "pallas_gpu", "pallas_tpu")


def init_pool(config: ModelConfig, num_blocks: int, block_size: int,
              dtype=jnp.float32) -> tuple[StageCache, ...]:
    """An empty block pool: one `StageCache` per stage, leaves
    [kv_heads, groups, num_blocks, block_size, head_dim] (scales without head_dim)."""
    return empty_stages(config, lambda groups, window: (
        config.num_kv_heads, groups, num_blocks, block_size, config.head_dim), dtype)


def choose_kernel(requested: str, *, quantized: bool, num_heads: int, num_kv_heads: int,
                  head_dim: int) -> str:
    """The decode rows' attention for `model.attention = requested` on the platform being
    compiled for: "pallas_tpu" (jax's TPU paged_attention; float pools, head_dim a multiple
    of 128), "pallas_gpu" (jax's Triton paged_attention, int8 scales included; head_dim a
    power of two >= 16) or "xla" (the gather every backend runs). auto picks the platform's
    kernel; pallas_gpu runs it on any platform (Pallas's interpreter off GPU: tests); splash
    and cudnn stand for their platform's kernel; the others are xla."""
    platform = sharding.platform()
    if not pallas_fits_mesh(num_heads, num_kv_heads):
        return "xla"
    gpu_fits = head_dim >= 16 and head_dim & (head_dim - 1) == 0
    if (requested == "pallas_gpu" or requested in ("auto", "cudnn") and platform == "gpu") \
            and (gpu_fits or platform != "gpu"):
        return "pallas_gpu"
    if (requested in ("auto", "splash") and platform == "tpu" and not quantized
            and head_dim % 128 == 0):
        return "pallas_tpu"
    return "xla"


def constrain_pool(pool):
    """Pins every pool leaf to `POOL_AXES` on the active mesh."""
    return jax.tree_util.tree_map(lambda a: constrain(a, POOL_AXES[:a.ndim]), pool)


@flax.struct.dataclass
class PagedBatch:
    """Where one step's tokens write and what each row reads.

    tables: [D + P, W / block_size] int32, the blocks of each row's sequence in position
    order (NULL_BLOCK past its end); positions: [T] int32; valid: [T] bool (padding tokens
    write to the null block and are attended by nobody).
    """
    tables: jax.Array
    positions: jax.Array
    valid: jax.Array
    num_decode: int = flax.struct.field(pytree_node=False)
    chunk: int = flax.struct.field(pytree_node=False)  # C; 0 = no prefill rows
    block_size: int = flax.struct.field(pytree_node=False)
    kernel: str = flax.struct.field(pytree_node=False, default="xla")  # the decode rows'

    @property
    def num_prefill(self) -> int:
        return self.tables.shape[0] - self.num_decode

    @property
    def window(self) -> int:
        return self.tables.shape[1] * self.block_size

    def token_rows(self) -> jax.Array:
        """[T]: the row (of tables) each token belongs to."""
        d, c = self.num_decode, max(self.chunk, 1)
        return jnp.concatenate([jnp.arange(d), d + jnp.arange(self.num_prefill * self.chunk) // c])

    def sample_rows(self) -> jax.Array:
        """[D + P]: the tokens whose logits are sampled: every decode token, and the last
        valid token of each prefill row (its chunk's last)."""
        d, c = self.num_decode, self.chunk
        if not self.num_prefill:
            return jnp.arange(d)
        valid_PC = self.valid[d:].reshape(self.num_prefill, c)
        last_P = jnp.maximum(valid_PC.sum(axis=1) - 1, 0)
        return jnp.concatenate([jnp.arange(d), d + jnp.arange(self.num_prefill) * c + last_P])

    def write_targets(self) -> tuple[jax.Array, jax.Array]:
        """(block [T], offset [T]) of each token's K/V; padding, and a position past its
        row's table, go to the null block (never into another position's slot)."""
        index = self.positions // self.block_size
        inside = self.valid & (index < self.tables.shape[1])
        block = self.tables[self.token_rows(), jnp.where(inside, index, 0)]
        return (jnp.where(inside, block, NULL_BLOCK),
                jnp.where(inside, self.positions % self.block_size, 0))

    def masks(self, local_window: int | None = None) -> tuple[jax.Array, jax.Array | None]:
        """Boolean masks over each row's gathered window: decode [D, 1, W], prefill
        [P, C, W]. Slot j of a row holds position j, so a query sees j <= its position (and,
        for a local layer, j > its position - local_window)."""
        slots = jnp.arange(self.window)
        d = self.num_decode
        see = slots[None, :] <= self.positions[:, None]  # [T, W]
        if local_window is not None:
            see &= slots[None, :] > self.positions[:, None] - local_window
        decode = see[:d, None]
        prefill = see[d:].reshape(self.num_prefill, self.chunk, -1) if self.num_prefill else None
        return decode, prefill


@flax.struct.dataclass
class PagedCache:
    """What the model takes in place of a `KVCache` for a paged step: the pool's stages and
    the step's layout. It returns the same with the step's K/V written."""
    stages: tuple[StageCache, ...]
    batch: PagedBatch


class RowsKV(NamedTuple):
    """What the layers of a group attend with: K and V gathered [rows, W, K, H] for the rows
    the XLA path serves (every row, or the prefill rows when a kernel serves the decode
    ones), and the stage's pool arrays with the group's page offset for the kernel."""
    k: jax.Array | None
    v: jax.Array | None
    pages: tuple | None = None
    page_offset: jax.Array | None = None


def write(pool_kv: tuple, group: jax.Array, k_T1KH: jax.Array, v_T1KH: jax.Array,
          batch: PagedBatch) -> tuple:
    """Writes each token's K and V (int8: quantised, with scales) into group `group` of a
    stage's pool arrays (`StageCache.arrays()`), at its block and offset."""
    new = (k_T1KH[:, 0], v_T1KH[:, 0])
    if len(pool_kv) == 4:
        (qk, sk), (qv, sv) = quantize(new[0]), quantize(new[1])
        new = (qk, qv, sk, sv)
    block_T, offset_T = batch.write_targets()
    # [K, G, NB, bs, ...] at (:, group, block_T, offset_T): the update is [K, T, ...].
    return tuple(constrain_pool(c.at[:, group, block_T, offset_T].set(
        jnp.moveaxis(n, 1, 0).astype(c.dtype))) for c, n in zip(pool_kv, new))


def read(pool_kv: tuple, group: jax.Array, batch: PagedBatch, dtype,
         local_window: int | None = None) -> RowsKV:
    """Group `group`'s K and V [rows, W, K, H] in `dtype` for the rows the XLA path serves:
    each table's blocks gathered in position order (int8 dequantised here). A local layer's
    rows all take the XLA path (the kernels have no window)."""
    xla = batch.kernel == "xla" or local_window is not None
    first = 0 if xla else batch.num_decode
    tables = batch.tables[first:]

    def rows(c):  # [K, R, W / block_size, block_size, ...] -> [R, W, K, ...]
        blocks = jnp.moveaxis(c[:, group, tables], 0, 3)
        return blocks.reshape((blocks.shape[0], batch.window) + blocks.shape[3:])

    kv = None, None
    if tables.shape[0]:
        arrays = tuple(rows(c) for c in pool_kv)
        kv = (tuple(dequantize(q, s, dtype) for q, s in zip(arrays[:2], arrays[2:]))
              if len(arrays) == 4 else tuple(a.astype(dtype) for a in arrays))
    if xla:
        return RowsKV(*kv)
    return RowsKV(*kv, pages=pool_kv, page_offset=group * pool_kv[0].shape[2])


def attend(q_T1NH: jax.Array, kv: RowsKV, batch: PagedBatch,
           local_window: int | None = None) -> jax.Array:
    """Attention output [T, 1, N, H]: the decode tokens against their rows, each prefill row's
    chunk against its row (earlier chunks and cached prefix blocks included); a local layer
    sees the last `local_window` positions only."""
    d, p, c = batch.num_decode, batch.num_prefill, batch.chunk
    decode_mask, prefill_mask = batch.masks(local_window)
    parts = []
    if d and kv.pages is not None:
        out = decode_kernel(batch.kernel, q_T1NH[:d, 0], kv.pages,
                            batch.tables[:d] + kv.page_offset, batch.positions[:d] + 1)
        parts.append(out[:, None])
    elif d:
        parts.append(folded_attention(q_T1NH[:d], kv.k[:d], kv.v[:d], decode_mask))
    if p:
        q_PCNH = q_T1NH[d:].reshape((p, c) + q_T1NH.shape[2:])
        out = folded_attention(q_PCNH, kv.k[-p:], kv.v[-p:], prefill_mask)
        parts.append(out.reshape((p * c, 1) + out.shape[2:]))
    return jnp.concatenate(parts) if len(parts) > 1 else parts[0]


def _largest_divisor(n: int, cap: int) -> int:
    """The largest power of two <= cap that divides n."""
    size = 1
    while size * 2 <= cap and n % (size * 2) == 0:
        size *= 2
    return size


def decode_kernel(kernel: str, q_DNH: jax.Array, pages: tuple, page_indices_DW: jax.Array,
                  lengths_D: jax.Array) -> jax.Array:
    """Decode attention [D, N, H] through jax's Pallas paged-attention kernel: each row's query
    against the first `lengths` positions of its pages, read in place from the stage's pool
    (`pages`: its K, V and, int8, scales, as [kv_heads, pages, page_size, head_dim]). Runs
    shard by shard on a mesh (heads over tensor, rows over data)."""
    out_dtype = q_DNH.dtype
    if jnp.issubdtype(pages[0].dtype, jnp.floating):  # the kernels take one dtype for both
        q_DNH = q_DNH.astype(pages[0].dtype)
    q_DNH = q_DNH * jnp.asarray(q_DNH.shape[-1] ** -0.5, q_DNH.dtype)  # the kernels do not
    flat = tuple(a.reshape((a.shape[0], -1) + a.shape[3:]) for a in pages)  # [K, G*NB, bs..]
    per_row = page_indices_DW.shape[1]
    lengths_D = lengths_D.astype(jnp.int32)

    if kernel == "pallas_tpu":
        from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

        def run(q, k, v, lengths, indices):
            return paged_attention(q, k, v, lengths, indices,
                                   pages_per_compute_block=_largest_divisor(per_row, 8))
    elif kernel == "pallas_gpu":
        from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

        splits = _largest_divisor(per_row, 16)

        def run(q, k, v, lengths, indices, *scales):  # int8 pages come with their scales
            return paged_attention(
                q, k, v, indices, lengths, *scales, k_splits=splits,
                pages_per_compute_block=_largest_divisor(per_row // splits, 8),
                interpret=sharding.platform() != "gpu")
    else:
        raise ValueError(f"unknown paged kernel {kernel!r}; choose from {KERNELS}")
    page_axes = ("kv_heads", None, None, "head_dim")
    args = (q_DNH, *flat[:2], lengths_D, page_indices_DW, *flat[2:])
    axes = (("batch", "heads", "head_dim"), page_axes, page_axes, ("batch",), ("batch", None),
            *(page_axes[:3],) * len(flat[2:]))
    return sharding.per_shard(run, args, axes).astype(out_dtype)
