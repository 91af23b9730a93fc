"""Checksums of arrays, computed where the arrays live: on their devices, in their shards.

An array's bit pattern is read as unsigned 32-bit words w[i_0, ..., i_n] (narrower dtypes are
widened, wider ones split along a trailing axis), and its checksum is

    sum over all positions of  w[i_0, ..., i_n] * m_0[i_0] * ... * m_n[i_n]   mod 2^32,

with one odd multiplier per index of each axis, m_a[j] = fmix32(j ^ seed_a) | 1 (fmix32 is
MurmurHash3's finalizer). Why this form:
- it is a sum of per-position terms, so it is the same however the array is split into shards
  or over processes (XLA adds the partial sums), and a checkpoint saved on one mesh verifies
  after a restore onto another, with every process reaching the same verdict;
- each position's multiplier is a product of odd numbers, hence odd, so changing any single
  bit of any word (w changes by +-2^b) always changes the sum, and random damage goes unseen
  with probability 2^-32, as with a crc32; the multipliers differ by position, so swapped or
  shifted words are caught too;
- the multipliers factor over axes, so each word costs one multiply-add; the axes are summed
  outermost first, because XLA:CPU fuses the widening and the multiply into a reduction over
  the leading axis of a stacked [layers, ...] weight (temporaries: the size of one layer,
  tested), not into one over the minor axis (temporaries: the whole array). 2-D arrays (the
  embeddings) still get a temporary of their own size on CPU.
It detects damage, not tampering: it is not a cryptographic hash.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

GOLDEN = 0x9E3779B9  # spreads the per-axis seeds


def fmix32(h):
    """MurmurHash3's 32-bit finalizer (jnp or numpy uint32)."""
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def axis_multipliers(size: int, axis: int) -> jax.Array:
    """uint32[size]: the odd multipliers m_axis."""
    seed = np.uint32(GOLDEN * (axis + 1) % 2**32)
    return fmix32(jnp.arange(size, dtype=jnp.uint32) ^ seed) | np.uint32(1)


def _words(x: jax.Array) -> jax.Array:
    """The bits of `x` as uint32 words (a trailing axis for 8-byte dtypes)."""
    dtype = np.dtype(x.dtype)
    if dtype == np.bool_:
        return x.astype(jnp.uint32)
    if dtype.itemsize >= 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    narrow = {1: jnp.uint8, 2: jnp.uint16}[dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, narrow).astype(jnp.uint32)


def leaf_checksum(x: jax.Array) -> jax.Array:
    """uint32 scalar: `x`'s checksum (jit-compatible)."""
    acc = _words(x)
    for axis in range(acc.ndim):
        # The outermost axis first: XLA fuses the widening and the multiply into a reduction
        # over the leading axis, while one over the minor axis (on CPU) first writes the
        # whole array of products, a temporary as large as the state being checksummed.
        multipliers = axis_multipliers(acc.shape[0], axis).reshape(-1, *[1] * (acc.ndim - 1))
        acc = jnp.sum(acc * multipliers, axis=0, dtype=jnp.uint32)
    return acc


@functools.lru_cache(maxsize=None)
def _jitted(out_sharding):
    return jax.jit(lambda tree: jax.tree_util.tree_map(leaf_checksum, tree),
                   out_shardings=out_sharding)


def _replicated_like(tree):
    """A replicated sharding on the leaves' mesh, so every process can read the result."""
    for leaf in jax.tree_util.tree_leaves(tree):
        if isinstance(getattr(leaf, "sharding", None), NamedSharding):
            return NamedSharding(leaf.sharding.mesh, PartitionSpec())
    return None


def tree_checksums(tree) -> dict[str, str]:
    """{jax.tree_util.keystr(path): 8 hex digits} for every array leaf, in one jitted call."""
    sums = _jitted(_replicated_like(tree))(tree)
    flat, _ = jax.tree_util.tree_flatten_with_path(sums)
    # Replicated: the first local shard is the whole value, on every process.
    return {jax.tree_util.keystr(path): f"{int(np.asarray(s.addressable_data(0))):08x}"
            for path, s in flat}
