"""The paged KV cache: the grouped cache's K/V in fixed-size blocks that sequences share out.

A block pool is the grouped cache (`cla_jax.cache`) with blocks in place of sequences: per
stage, K and V are [groups_in_stage, num_blocks, block_size, kv_heads, head_dim] (an int8 pool
adds its per-token scales), so a producer group's K/V is still written once and read by
every layer of its group, and layers that reuse K/V still have no entry. A sequence owns a
block table, the blocks holding its positions in order: position p lives in block
table[p // block_size] at offset p % block_size. Block 0 is the null block, never given to a
sequence: padding tokens write there and unused table entries point there.

One engine step is one forward over `T = D + P * C` tokens laid out one per row ([T, 1]):
D decode tokens (one per running sequence), then P prefill rows of C tokens (a chunk of a
prompt each). `PagedBatch` says where each token's K/V goes and which blocks each of the
D + P rows reads; `attend` runs the two parts against their rows' gathered blocks (an XLA
gather, so it runs on every backend).
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from cla_jax.cache import StageCache, dequantize, init_cache, quantize
from cla_jax.config import ModelConfig
from cla_jax.model.attention import folded_attention
from cla_jax.sharding import constrain

# A pool leaf's logical axes: blocks are whole on every device (any sequence may own any
# block), KV heads split over tensor as in the slot cache. Scales drop head_dim.
POOL_AXES = ("layers", None, None, "kv_heads", "head_dim")
NULL_BLOCK = 0


def init_pool(config: ModelConfig, num_blocks: int, block_size: int,
              dtype=jnp.float32) -> tuple[StageCache, ...]:
    """An empty block pool: one `StageCache` per stage, blocks along axis 1."""
    return init_cache(config, num_blocks, block_size, dtype).stages


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

    def masks(self) -> tuple[jax.Array, jax.Array | None]:
        """Boolean masks over each row's gathered window: decode [D, 1, W], prefill
        [P, C, W]. Slot j of a row holds position j, so a query sees j <= its position."""
        slots = jnp.arange(self.window)
        d = self.num_decode
        see = slots[None, :] <= self.positions[:, None]  # [T, W]
        decode = see[:d, None]
        prefill = see[d:].reshape(self.num_prefill, self.chunk, -1) if self.num_prefill else None
        return decode, prefill


@flax.struct.dataclass
class PagedCache:
    """What the model takes in place of a `KVCache` for a paged step: the pool's stages and
    the step's layout. It returns the same with the step's K/V written."""
    stages: tuple[StageCache, ...]
    batch: PagedBatch


def write(pool_kv: tuple, group: jax.Array, k_T1KH: jax.Array, v_T1KH: jax.Array,
          batch: PagedBatch) -> tuple:
    """Writes each token's K and V (int8: quantised, with scales) into group `group` of a
    stage's pool arrays (`StageCache.arrays()`), at its block and offset."""
    new = (k_T1KH[:, 0], v_T1KH[:, 0])
    if len(pool_kv) == 4:
        (qk, sk), (qv, sv) = quantize(new[0]), quantize(new[1])
        new = (qk, qv, sk, sv)
    block_T, offset_T = batch.write_targets()
    return tuple(constrain_pool(c.at[group, block_T, offset_T].set(n.astype(c.dtype)))
                 for c, n in zip(pool_kv, new))


def read(pool_kv: tuple, group: jax.Array, batch: PagedBatch, dtype) -> tuple:
    """Group `group`'s K and V for every row, [D + P, W, K, H] in `dtype`: its table's
    blocks gathered in position order (int8 dequantised here)."""
    def rows(c):
        blocks = jax.lax.dynamic_index_in_dim(c, group, keepdims=False)[batch.tables]
        return blocks.reshape((blocks.shape[0], batch.window) + blocks.shape[3:])

    arrays = tuple(rows(c) for c in pool_kv)
    if len(arrays) == 4:
        return tuple(dequantize(q, s, dtype) for q, s in zip(arrays[:2], arrays[2:]))
    return tuple(a.astype(dtype) for a in arrays)


def attend(q_T1NH: jax.Array, k_RWKH: jax.Array, v_RWKH: jax.Array,
           batch: PagedBatch) -> jax.Array:
    """Attention output [T, 1, N, H]: the decode tokens against their rows, each prefill row's
    chunk against its row (earlier chunks and cached prefix blocks included)."""
    d, p, c = batch.num_decode, batch.num_prefill, batch.chunk
    decode_mask, prefill_mask = batch.masks()
    parts = []
    if d:
        parts.append(folded_attention(q_T1NH[:d], k_RWKH[:d], v_RWKH[:d], decode_mask))
    if p:
        q_PCNH = q_T1NH[d:].reshape((p, c) + q_T1NH.shape[2:])
        out = folded_attention(q_PCNH, k_RWKH[d:], v_RWKH[d:], prefill_mask)
        parts.append(out.reshape((p * c, 1) + out.shape[2:]))
    return jnp.concatenate(parts) if len(parts) > 1 else parts[0]
