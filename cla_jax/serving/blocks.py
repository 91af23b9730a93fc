"""The host's bookkeeping of a paged KV pool: which blocks are free, who holds each, and the
prefix cache.

Blocks are reference counted: a sequence holds the blocks of its table, and a block of a
cached prefix may be held by many sequences at once. A full block is keyed by a hash of its
tokens chained with the key of the block before it (so a key stands for the whole prefix up
to the block's end); a new sequence reuses the longest run of cached blocks its tokens
start with. A block nobody holds keeps its K/V and its key until the pool needs it: blocks
with no key are handed out first, then cached ones, least recently used first.

Block 0 (`paged_cache.NULL_BLOCK`) is never handed out.
"""
from __future__ import annotations

import collections
import hashlib

import numpy as np

from cla_jax.model.paged_cache import NULL_BLOCK


def block_keys(tokens, block_size: int, parent: bytes = b"") -> list[bytes]:
    """The key of every full block of `tokens`: blake2b of the previous key and the block's
    token ids."""
    keys = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hashlib.blake2b(
            parent + np.asarray(tokens[start:start + block_size], np.int64).tobytes(),
            digest_size=16).digest()
        keys.append(parent)
    return keys


class BlockPool:
    """`num_blocks` blocks of `block_size` positions (block 0 reserved). caching=False turns
    the prefix cache off: freed blocks forget their contents."""

    def __init__(self, num_blocks: int, block_size: int, caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"a block pool needs at least 2 blocks (one is the null block), "
                             f"got {num_blocks}")
        self.num_blocks, self.block_size, self.caching = num_blocks, block_size, caching
        self.refs = np.zeros(num_blocks, np.int64)
        self._empty = collections.deque(b for b in range(num_blocks) if b != NULL_BLOCK)
        self._cached_free: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._key_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self.hits = 0       # blocks reused from the cache
        self.evictions = 0  # cached blocks given to new contents

    @property
    def usable(self) -> int:
        """Blocks a sequence can ever hold: all but the null block."""
        return self.num_blocks - 1

    def num_free(self) -> int:
        """Blocks nobody holds (cached ones included: they are given out when needed)."""
        return len(self._empty) + len(self._cached_free)

    def num_cached(self) -> int:
        return len(self._key_of)

    def allocate(self) -> int:
        """A block for new contents, held once. IndexError when none is free."""
        if self._empty:
            block = self._empty.popleft()
        elif self._cached_free:
            block, _ = self._cached_free.popitem(last=False)  # least recently used
            del self._block_of[self._key_of.pop(block)]
            self.evictions += 1
        else:
            raise IndexError("no free block")
        self.refs[block] = 1
        return block

    def release(self, blocks) -> None:
        """Drops one hold of each block; a block nobody holds becomes free (keeping its
        cached contents, most recently used last)."""
        for block in blocks:
            self.refs[block] -= 1
            assert self.refs[block] >= 0, f"block {block} released more often than held"
            if self.refs[block] == 0:
                if block in self._key_of:
                    self._cached_free[block] = None
                else:
                    self._empty.append(block)

    def lookup(self, keys) -> list[int]:
        """The cached blocks of the longest prefix of `keys`, each now held once more."""
        if not self.caching:
            return []
        blocks = []
        for key in keys:
            block = self._block_of.get(key)
            if block is None:
                break
            if self.refs[block] == 0:
                del self._cached_free[block]
            self.refs[block] += 1
            blocks.append(block)
        self.hits += len(blocks)
        return blocks

    def register(self, block: int, key: bytes) -> None:
        """Records that `block` (held, full) holds the prefix `key`; a prefix already cached
        in another block keeps that one."""
        if self.caching and key not in self._block_of and block not in self._key_of:
            self._block_of[key] = block
            self._key_of[block] = key
