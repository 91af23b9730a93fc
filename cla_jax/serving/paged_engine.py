"""The device side of paged serving: one block pool (`cla_jax.model.paged_cache`) shared by every
sequence, and one jitted step program that runs, in a single forward, the decode tokens of
the running sequences and chunks of the prompts being prefilled, then `num_steps - 1` more
decode steps (a `lax.scan`, as `Engine.step` runs them).

    pool = engine.init_state()
    pool, decode_tokens, decode_logprobs, prefill_tokens, prefill_logprobs = engine.step(
        pool, StepInputs(...), num_steps)

The host (`cla_jax.serving.scheduler`) owns the block tables and says, per step, which
sequences decode and which prompt chunks run. Shapes come from buckets, so compiles are
bounded: decode rows (powers of two, then multiples of 16, up to `max_seqs`), prefill shapes (P rows of C tokens,
P x C = `chunk_tokens`), and the attention window (what the longest row reads).
A row's token i samples with `fold_in(key(seed), i)`, as in `Engine`: what a request samples
depends neither on its neighbours nor on whether it was preempted and recomputed.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from cla_jax import sharding
from cla_jax.config import ModelConfig
from cla_jax.errors import UserError
from cla_jax.model import Transformer, paged_cache
from cla_jax.model.paged_cache import PagedBatch, PagedCache
from cla_jax.sampling import sample_rows
from cla_jax.serving.engine import buckets


@flax.struct.dataclass
class StepInputs:
    """One step's host inputs. D decode rows, P prefill rows of C tokens; R = D + P rows
    (decode first) share the tables and the sampling settings."""
    decode_tokens: np.ndarray     # [D] int32: each decoding sequence's newest token
    decode_positions: np.ndarray  # [D] int32: where it goes (the sequence's length - 1)
    decode_active: np.ndarray     # [D] bool: False = an unused row (writes the null block)
    prefill_tokens: np.ndarray    # [P, C] int32: a chunk of each prefilling sequence
    prefill_starts: np.ndarray    # [P] int32: the chunk's first position
    prefill_lengths: np.ndarray   # [P] int32: its valid tokens (0 = an unused row)
    tables: np.ndarray            # [R, window / block_size] int32 block tables
    temperature: np.ndarray       # [R] float32
    top_k: np.ndarray             # [R] int32
    top_p: np.ndarray             # [R] float32
    key_data: np.ndarray          # [R, key words] uint32: jax.random.key(seed) of the request
    sample_index: np.ndarray      # [R] int32: the index of the token each row samples


@dataclasses.dataclass
class PagedEngine:
    """A model, its params and a pool of `num_blocks` blocks of `block_size` positions.

    max_length: the longest sequence (prompt + output) one request may reach (default the
    model's max_seq_len). max_seqs: sequences running at once at most (decode rows); the
    pool's free blocks, not this, usually bound them. chunk_tokens: prompt tokens one step
    may prefill (P x C for every prefill shape). prefill_rows: the P of each prefill shape.
    """
    config: ModelConfig
    params: dict
    num_blocks: int
    block_size: int = 16
    max_length: int | None = None
    max_seqs: int = 64
    cache_dtype: str = "float32"
    mesh: Mesh | None = None
    chunk_tokens: int = 256
    prefill_rows: tuple[int, ...] = (1, 4)
    min_decode_rows: int = 4
    min_window: int = 64

    def __post_init__(self):
        self.max_length = self.max_length or self.config.max_seq_len
        if not 1 < self.max_length <= self.config.max_seq_len:
            raise UserError(f"max_length must be in [2, model.max_seq_len="
                            f"{self.config.max_seq_len}], got {self.max_length}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise UserError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_blocks < 2:
            raise UserError(f"num_blocks must be >= 2 (block 0 is the null block), got "
                            f"{self.num_blocks}")
        if self.max_seqs < 1:
            raise UserError(f"max_seqs must be >= 1, got {self.max_seqs}")
        bad = [p for p in self.prefill_rows if p < 1 or self.chunk_tokens % p]
        if self.chunk_tokens < 1 or bad:
            raise UserError(f"every prefill_rows entry must divide chunk_tokens="
                            f"{self.chunk_tokens}; got {list(self.prefill_rows)}")
        self.mesh = self.mesh or sharding.single_device_mesh()
        # Powers of two, then multiples of 16: a padded row costs as much as a real one where
        # decode is compute-bound (CPU), while the number of compiles stays small.
        self.decode_buckets = buckets(min(self.min_decode_rows, self.max_seqs), self.max_seqs, 16)
        self.prefill_shapes = tuple((p, self.chunk_tokens // p) for p in self.prefill_rows)
        self.max_blocks_per_seq = -(-self.max_length // self.block_size)
        round_up = lambda n: -(-n // self.block_size) * self.block_size  # noqa: E731
        self.window_buckets = tuple(sorted({round_up(w) for w in buckets(
            min(self.min_window, self.max_length), self.max_length)}))
        self._model = Transformer(self.config)

    @property
    def num_slots(self) -> int:
        """Rows the host loop keeps (sequences admitted at once, at most)."""
        return self.max_seqs

    @property
    def cache_positions(self) -> int:
        """KV positions sequences can hold (the null block left out)."""
        return (self.num_blocks - 1) * self.block_size

    def describe(self) -> str:
        return (f"{self.num_blocks - 1} KV blocks x {self.block_size} positions, up to "
                f"{self.max_seqs} sequences of up to {self.max_length} tokens")

    @staticmethod
    def block_bytes(config: ModelConfig, block_size: int, cache_dtype: str) -> int:
        """Bytes of one block over every stage (int8 scales counted), from the pool's
        shapes."""
        shapes = jax.eval_shape(lambda: paged_cache.init_pool(config, 1, block_size,
                                                              jnp.dtype(cache_dtype)))
        return sum(int(np.prod(a.shape)) * a.dtype.itemsize
                   for a in jax.tree_util.tree_leaves(shapes))

    @classmethod
    def blocks_for_budget(cls, config: ModelConfig, budget_bytes: int, block_size: int,
                          cache_dtype: str) -> int:
        """Blocks that fit `budget_bytes`, the null block included."""
        return budget_bytes // cls.block_bytes(config, block_size, cache_dtype)

    def init_state(self):
        """The empty block pool (a tuple of `StageCache`, blocks along axis 1)."""
        return self._init_pool()

    def step(self, pool, inputs: StepInputs, num_steps: int = 1):
        """(pool, decode tokens [num_steps, D], their logprobs, prefill rows' tokens [P],
        their logprobs). The pool is consumed. A prefill row's token is its chunk's last
        token's sample: the sequence's next token when the chunk ends its prompt."""
        inputs = jax.device_put(inputs, sharding.replicated(self.mesh))
        return self._step(self.params, pool, inputs, num_steps)

    def empty_inputs(self, decode_rows: int, prefill_shape: tuple[int, int] | None,
                     window: int) -> StepInputs:
        """A step's inputs with every row unused (all writes go to the null block)."""
        p, c = prefill_shape or (0, 0)
        rows = decode_rows + p
        key_words = jax.random.key_data(jax.random.key(0)).shape
        return StepInputs(
            np.zeros(decode_rows, np.int32), np.zeros(decode_rows, np.int32),
            np.zeros(decode_rows, bool), np.zeros((p, c), np.int32), np.zeros(p, np.int32),
            np.zeros(p, np.int32),
            np.full((rows, window // self.block_size), paged_cache.NULL_BLOCK, np.int32),
            np.zeros(rows, np.float32), np.zeros(rows, np.int32), np.ones(rows, np.float32),
            np.zeros((rows,) + key_words, np.uint32), np.zeros(rows, np.int32))

    # --- jitted bodies ----------------------------------------------------------------------

    @functools.cached_property
    def _pool_shardings(self):
        shapes = jax.eval_shape(self._pool_body)
        return jax.tree_util.tree_map(lambda a: sharding.logical_sharding(
            paged_cache.POOL_AXES[:a.ndim], a.shape, self.mesh), shapes)

    def _pool_body(self):
        with sharding.activate(self.mesh):
            return paged_cache.constrain_pool(paged_cache.init_pool(
                self.config, self.num_blocks, self.block_size, jnp.dtype(self.cache_dtype)))

    @functools.cached_property
    def _init_pool(self):
        return jax.jit(self._pool_body, out_shardings=self._pool_shardings)

    def _forward(self, params, pool, tokens_T, positions_T, valid_T, tables, num_decode, chunk):
        kernel = paged_cache.choose_kernel(
            self.config.attention, quantized=self.cache_dtype == "int8",
            num_heads=self.config.num_heads, num_kv_heads=self.config.num_kv_heads,
            head_dim=self.config.head_dim)
        batch = PagedBatch(tables, positions_T, valid_T, num_decode, chunk, self.block_size,
                           kernel)
        logits, cache = self._model.apply({"params": params}, tokens_T[:, None],
                                          positions_T[:, None], None, PagedCache(pool, batch))
        return logits[:, 0], paged_cache.constrain_pool(cache.stages)

    @functools.cached_property
    def _step(self):
        def sample(logits_RV, x: StepInputs, rows: slice, offset):
            keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(x.key_data[rows]),
                                                x.sample_index[rows] + offset)
            return sample_rows(logits_RV, keys, x.temperature[rows], x.top_k[rows],
                               x.top_p[rows])

        def step(params, pool, x: StepInputs, num_steps):
            with sharding.activate(self.mesh):
                d = x.decode_tokens.shape[0]
                p, c = x.prefill_tokens.shape
                positions = jnp.concatenate([x.decode_positions, (
                    x.prefill_starts[:, None] + jnp.arange(c)).reshape(-1)])
                valid = jnp.concatenate([x.decode_active, (
                    jnp.arange(c)[None] < x.prefill_lengths[:, None]).reshape(-1)])
                tokens = jnp.concatenate([x.decode_tokens, x.prefill_tokens.reshape(-1)])
                logits, pool = self._forward(params, pool, tokens, positions, valid, x.tables,
                                             d, c)
                first, first_lp = sample(logits, x, slice(None), 0)

                def decode(carry, i):  # one more token for every decode row
                    pool, tokens_D = carry
                    logits, pool = self._forward(params, pool, tokens_D, x.decode_positions + i,
                                                 x.decode_active, x.tables[:d], d, 0)
                    token, logprob = sample(logits, x, slice(0, d), i)
                    return (pool, token), (token, logprob)

                tokens_KD, logprobs_KD = first[None, :d], first_lp[None, :d]
                if d and num_steps > 1:
                    (pool, _), (more, more_lp) = jax.lax.scan(
                        decode, (pool, first[:d]), jnp.arange(1, num_steps))
                    tokens_KD = jnp.concatenate([tokens_KD, more])
                    logprobs_KD = jnp.concatenate([logprobs_KD, more_lp])
                whole = lambda a: sharding.constrain(a, (None,) * a.ndim)  # noqa: E731
                return (pool, whole(tokens_KD), whole(logprobs_KD), whole(first[d:]),
                        whole(first_lp[d:]))

        replicated = sharding.replicated(self.mesh)
        return jax.jit(step, static_argnums=3, donate_argnums=1,
                       out_shardings=(self._pool_shardings,) + (replicated,) * 4)

    def blocks_needed(self, length: int) -> int:
        return math.ceil(length / self.block_size)
