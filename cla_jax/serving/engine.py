"""The device side of serving: a pool of slots over one grouped KV cache, and three jitted
programs, as in JetStream's engine API:

    prefix = engine.prefill(prompt, settings)   # a prompt's K/V (one entry per layer group)
    state = engine.insert(state, prefix, slot)  # into a free slot of the pool's cache
    state, tokens, logprobs = engine.step(state, active, window, k)  # k tokens for every slot

The pool's cache is `init_cache(config, num_slots, max_length)`; every slot is a row of it.
A slot's sampling settings, PRNG key and token count live in the state as arrays, so one
compiled step serves any mix of requests, and token i of a request draws with
`fold_in(key(seed), i)`: what a request samples does not depend on what else is batched.

Compiles are bounded by buckets: a prompt is padded to the next prompt bucket, and a step
attends over the first `window` slots (the next window bucket above the longest active
sequence), not the whole allocation. Inactive slots still run through the step (fixed
shapes) but write nothing: their position is past the end of the cache, and writes there
are dropped.

A step call can run k decode steps in one program (a `lax.scan`): the host then sees tokens
every k steps, paying the dispatch and the device-to-host copy once per k tokens, and a
request that ends inside a block holds its slot for at most k - 1 extra steps.
"""
from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from cla_jax import sharding
from cla_jax.cache import KVCache, cache_axes, constrain_cache, init_cache
from cla_jax.config import ModelConfig
from cla_jax.errors import UserError
from cla_jax.model import Transformer
from cla_jax.sampling import sample_rows, seed_key


@flax.struct.dataclass
class SlotSettings:
    """Per-slot sampling settings, [num_slots] each (or [1] for one prefill)."""
    temperature: jax.Array  # float32, 0 = greedy
    top_k: jax.Array        # int32, 0 = off
    top_p: jax.Array        # float32, 1 = off
    key_data: jax.Array     # uint32 [.., key words]: jax.random.key(seed) of the request


@flax.struct.dataclass
class PoolState:
    """The engine's device state: the slots' KV cache, each slot's next input token, tokens
    sampled so far and sampling settings."""
    cache: KVCache           # [num_slots, max_length] grouped cache; lengths = filled slots
    tokens: jax.Array        # [num_slots] int32: each slot's newest token, the next input
    generated: jax.Array     # [num_slots] int32: tokens sampled so far (the PRNG index)
    settings: SlotSettings


@flax.struct.dataclass
class Prefix:
    """One prefilled prompt: its cache (batch 1, a bucket of slots), first token, logprob."""
    cache: KVCache
    token: jax.Array
    logprob: jax.Array
    settings: SlotSettings


def buckets(smallest: int, largest: int, step: int | None = None) -> tuple[int, ...]:
    """Powers of two from `smallest` up (then multiples of `step`, once past it), and
    `largest` itself as the last bucket."""
    sizes, size = [], smallest
    while size < largest:
        sizes.append(size)
        size = size * 2 if step is None or size < step else size + step
    return tuple(sizes) + (largest,)


def bucket_for(length: int, sizes: tuple[int, ...]) -> int:
    """The smallest size of `sizes` (ascending) that holds `length`; ValueError past the
    largest."""
    for size in sizes:
        if length <= size:
            return size
    raise ValueError(f"{length} exceeds the largest bucket {sizes[-1]}")


@dataclasses.dataclass
class Engine:
    """A model, its params and a pool of `num_slots` sequences of up to `max_length` tokens.

    cache_dtype: "float32", "bfloat16", "float16" or "int8" (per-token absmax, see
    cla_jax.cache). mesh: where the params live (default one device); the slots split over
    (data, fsdp) when their number divides, KV heads over tensor.
    """
    config: ModelConfig
    params: dict
    num_slots: int
    max_length: int
    cache_dtype: str = "float32"
    mesh: Mesh | None = None
    min_prompt_bucket: int = 16
    # Prompts past this many tokens pad to a multiple of it, not to a power of two: less
    # padding for a few more compiles (a prefill's cost grows with its bucket).
    prompt_bucket_step: int = 128
    min_window_bucket: int = 64

    def __post_init__(self):
        if self.num_slots < 1:
            raise UserError(f"the engine needs at least one slot, got num_slots={self.num_slots}")
        if not 1 < self.max_length <= self.config.max_seq_len:
            raise UserError(f"max_length must be in [2, model.max_seq_len="
                            f"{self.config.max_seq_len}], got {self.max_length}")
        self.mesh = self.mesh or sharding.single_device_mesh()
        self.prompt_buckets = buckets(min(self.min_prompt_bucket, self.max_length),
                                      self.max_length, self.prompt_bucket_step)
        self.window_buckets = buckets(min(self.min_window_bucket, self.max_length),
                                      self.max_length)
        self._model = Transformer(self.config)

    @property
    def cache_positions(self) -> int:
        """KV positions the pool holds."""
        return self.num_slots * self.max_length

    def describe(self) -> str:
        return f"{self.num_slots} slots x {self.max_length} tokens"

    # --- the three programs -------------------------------------------------------------

    def init_state(self) -> PoolState:
        return self._init_state()

    def prefill(self, prompt, temperature=0.0, top_k=0, top_p=1.0, seed=0) -> Prefix:
        """Runs the prompt (padded to its bucket) into a fresh one-sequence cache and samples
        its first new token. Arguments are checked by the caller (`Request`)."""
        bucket = bucket_for(len(prompt), self.prompt_buckets)
        tokens = np.zeros((1, bucket), np.int32)
        tokens[0, :len(prompt)] = prompt
        settings = SlotSettings(np.float32([temperature]), np.int32([top_k]),
                                np.float32([top_p]),
                                np.asarray(jax.random.key_data(seed_key(seed)))[None])
        inputs = jax.device_put((tokens, np.int32(len(prompt)), settings),
                                sharding.replicated(self.mesh))
        return self._prefill(self.params, *inputs)

    def insert(self, state: PoolState, prefix: Prefix, slot: int) -> PoolState:
        """The prefix's K/V and first token into row `slot` (the old state is consumed)."""
        return self._insert(state, prefix, jnp.int32(slot))

    def step(self, state: PoolState, active, window: int, num_steps: int = 1):
        """`num_steps` tokens for every active slot, in one call: (state, tokens
        [num_steps, num_slots], logprobs [num_steps, num_slots]). Step i is the same as the
        i-th of that many single steps. `window` (a window bucket) must exceed every active
        slot's length + num_steps - 1, or be the whole cache."""
        active = jax.device_put(np.asarray(active, bool), sharding.replicated(self.mesh))
        return self._step(self.params, state, active, window, num_steps)

    # --- their jitted bodies --------------------------------------------------------------

    @functools.cached_property
    def _state_shardings(self):
        """One layout for the pool state, whatever program made it (the cache split as
        cache_axes say, the rest replicated): a state from init_state, insert or step then
        feeds any of them without a recompile."""
        shapes = jax.eval_shape(self._init_body)
        return PoolState(
            jax.tree_util.tree_map(lambda a: sharding.logical_sharding(
                cache_axes(a), a.shape, self.mesh), shapes.cache),
            *(jax.tree_util.tree_map(lambda _: sharding.replicated(self.mesh), leaf)
              for leaf in (shapes.tokens, shapes.generated, shapes.settings)))

    @functools.cached_property
    def _init_state(self):
        return jax.jit(self._init_body, out_shardings=self._state_shardings)

    def _init_body(self) -> PoolState:
        with sharding.activate(self.mesh):
            cache = constrain_cache(init_cache(self.config, self.num_slots, self.max_length,
                                               jnp.dtype(self.cache_dtype)))
        n = self.num_slots
        key_words = jax.random.key_data(jax.random.key(0)).shape
        settings = SlotSettings(jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.int32),
                                jnp.ones((n,), jnp.float32),
                                jnp.zeros((n,) + key_words, jnp.uint32))
        return PoolState(cache, jnp.zeros((n,), jnp.int32), jnp.zeros((n,), jnp.int32),
                         settings)

    @functools.cached_property
    def _prefill(self):
        def prefill(params, tokens_1P, length, settings):
            with sharding.activate(self.mesh):
                bucket = tokens_1P.shape[1]
                positions = jnp.arange(bucket)[None]
                segment_ids = (positions < length).astype(jnp.int32)  # 0 = padding
                cache = init_cache(self.config, 1, bucket, jnp.dtype(self.cache_dtype))
                logits, cache = self._model.apply({"params": params}, tokens_1P, positions,
                                                  segment_ids, cache,
                                                  logits_at_B=jnp.reshape(length - 1, (1,)))
                key = jax.random.wrap_key_data(settings.key_data)
                token, logprob = sample_rows(
                    logits[:, 0], jax.vmap(jax.random.fold_in, (0, None))(key, 0),
                    settings.temperature, settings.top_k, settings.top_p)
                return Prefix(cache, token, logprob, settings)
        return jax.jit(prefill)

    @functools.cached_property
    def _insert(self):
        def insert(state, prefix, slot):
            with sharding.activate(self.mesh):
                def put(pool_leaf, prefix_leaf):  # [groups, batch, slots, ...] <- row `slot`
                    start = (0, slot) + (0,) * (pool_leaf.ndim - 2)
                    return jax.lax.dynamic_update_slice(pool_leaf, prefix_leaf, start)

                stages = jax.tree_util.tree_map(put, state.cache.stages, prefix.cache.stages)
                cache = constrain_cache(state.cache.replace(
                    stages=stages,
                    lengths=state.cache.lengths.at[slot].set(prefix.cache.lengths[0])))
                settings = jax.tree_util.tree_map(lambda a, b: a.at[slot].set(b[0]),
                                                  state.settings, prefix.settings)
                return PoolState(cache, state.tokens.at[slot].set(prefix.token[0]),
                                 state.generated.at[slot].set(1), settings)
        return jax.jit(insert, donate_argnums=0, out_shardings=self._state_shardings)

    @functools.cached_property
    def _step(self):
        def one_step(params, state, active_B, window):
            lengths_B = state.cache.lengths
            # An inactive slot writes at max_length, past the end: dropped.
            positions_B1 = jnp.where(active_B, lengths_B, self.max_length)[:, None]
            logits, cache = self._model.apply(
                {"params": params}, state.tokens[:, None], positions_B1, None,
                state.cache, kv_window=window)
            s = state.settings
            keys_B = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(s.key_data),
                                                  state.generated)
            tokens_B, logprobs_B = sample_rows(logits[:, 0], keys_B, s.temperature,
                                               s.top_k, s.top_p)
            cache = constrain_cache(cache.replace(
                lengths=jnp.where(active_B, lengths_B + 1, lengths_B)))
            state = PoolState(cache, jnp.where(active_B, tokens_B, state.tokens),
                              state.generated + active_B, s)
            return state, (tokens_B, logprobs_B)

        def steps(params, state, active_B, window, num_steps):
            with sharding.activate(self.mesh):
                state, (tokens_KB, logprobs_KB) = jax.lax.scan(
                    lambda st, _: one_step(params, st, active_B, window), state, None,
                    length=num_steps)
                replicated = lambda x: sharding.constrain(x, (None, None))  # noqa: E731
                return state, replicated(tokens_KB), replicated(logprobs_KB)
        replicated = sharding.replicated(self.mesh)
        return jax.jit(steps, static_argnums=(3, 4), donate_argnums=1,
                       out_shardings=(self._state_shardings, replicated, replicated))
