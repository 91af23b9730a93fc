"""Autoregressive decoding through the grouped KV cache.

Prompts of different lengths are right-padded and prefilled in one forward pass; then a jitted
`lax.while_loop` carries (step, tokens, cache, rng, done, output) and writes one position per
sequence per step, at that sequence's own length. It stops when every sequence has emitted
EOS or the max_new_tokens budget is spent.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from cla_jax import sharding
from cla_jax.cache import CACHE_AXES, init_cache
from cla_jax.config import ModelConfig
from cla_jax.errors import UserError
from cla_jax.model import Transformer


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy; top_k 0 and top_p 1.0 = off. The filters compose."""
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        # Out of range, each would sample something odd rather than fail: a negative
        # temperature the least likely tokens, top_p 0 nothing but padding.
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise UserError(f"temperature must be a finite number >= 0 (0 = greedy), got "
                            f"{self.temperature}")
        if not 0 < self.top_p <= 1:  # also refuses nan
            raise UserError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (0 = off), got {self.top_k}")


def sample(logits_BV: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
    if sampling.temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits = logits_BV / sampling.temperature
    if sampling.top_k:
        kth_largest = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        # Keep the smallest set of most likely tokens whose mass reaches top_p: a token stays
        # if the mass of the tokens ranked above it is still below top_p.
        order = jnp.argsort(-logits, axis=-1)
        sorted_probs = jnp.take_along_axis(jax.nn.softmax(logits), order, axis=-1)
        mass_above = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        keep_sorted = mass_above < sampling.top_p
        keep = jnp.zeros_like(keep_sorted).at[
            jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(rng, logits).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _generate(config: ModelConfig, max_new_tokens: int, sampling: Sampling, eos_id: int,
              cache_dtype: str, mesh: Mesh, params, prompts_BP, lengths_B, key_data):
    with sharding.activate(mesh):
        tokens, cache = _decode(config, max_new_tokens, sampling, eos_id, cache_dtype, params,
                                sharding.constrain(prompts_BP, ("batch", "length")), lengths_B,
                                jax.random.wrap_key_data(key_data))
        return sharding.constrain(tokens, (None, None)), cache  # every process reads them


def _decode(config, max_new_tokens, sampling, eos_id, cache_dtype, params, prompts_BP,
            lengths_B, rng):
    model = Transformer(config)
    batch, prompt_len = prompts_BP.shape
    positions = jnp.broadcast_to(jnp.arange(prompt_len), prompts_BP.shape)
    segment_ids = (positions < lengths_B[:, None]).astype(jnp.int32)  # 0 = padding
    cache = init_cache(config, batch, prompt_len + max_new_tokens, jnp.dtype(cache_dtype))
    cache = jax.tree_util.tree_map(  # K/V [groups, B, S, K, H] and lengths [B]
        lambda a: sharding.constrain(a, CACHE_AXES if a.ndim == 5 else ("batch",)), cache)
    logits, cache = model.apply({"params": params}, prompts_BP, positions, segment_ids, cache)
    last_logits = logits[jnp.arange(batch), lengths_B - 1]
    rng, first_rng = jax.random.split(rng)
    out = jnp.zeros((batch, max_new_tokens), jnp.int32)
    done = jnp.zeros((batch,), bool)

    def cond(carry):
        step, _, _, _, done, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, token_B, cache, rng, done, out = carry
        out = out.at[:, step].set(jnp.where(done, 0, token_B))
        done = done | (token_B == eos_id)
        logits, cache = model.apply({"params": params}, token_B[:, None], cache.lengths[:, None],
                                    None, cache)
        rng, step_rng = jax.random.split(rng)
        return step + 1, sample(logits[:, 0], step_rng, sampling), cache, rng, done, out

    first = sample(last_logits, first_rng, sampling)
    carry = jax.lax.while_loop(cond, body, (0, first, cache, rng, done, out))
    return carry[5], carry[2]


def generate(config: ModelConfig, params, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             sampling: Sampling = Sampling(), rng: jax.Array | None = None, eos_id: int = -1,
             cache_dtype: str | None = None, mesh: Mesh | None = None):
    """New tokens [batch, max_new_tokens] (0 after a sequence's EOS) and the final cache.

    mesh: where `params` live (default: one device). Sequences split over (data, fsdp) when
    their number divides, heads and the cache's KV heads over tensor; every process passes the
    same prompts and gets all the tokens back.
    """
    if sampling.top_k > config.vocab_size:
        raise UserError(f"top_k ({sampling.top_k}) exceeds the model's vocab_size "
                        f"({config.vocab_size}); use at most {config.vocab_size}, or 0 = off")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("every prompt needs at least one token (an empty prompt has nothing "
                        "to condition on; start it with the BOS token)")
    bad = [t for p in prompts for t in p if not 0 <= t < config.vocab_size]
    if bad:
        raise UserError(f"token ids {sorted(set(bad))[:5]} are outside the model's vocabulary "
                        f"[0, {config.vocab_size})")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > config.max_seq_len:
        raise UserError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) "
                        f"exceeds the model's max_seq_len ({config.max_seq_len})")
    if max_new_tokens <= 0:
        raise UserError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    padded = np.zeros((len(prompts), longest), np.int32)
    for row, prompt in enumerate(prompts):
        padded[row, :len(prompt)] = prompt
    lengths = np.array([len(p) for p in prompts], np.int32)
    cache_dtype = cache_dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    rng = jax.random.key(0) if rng is None else rng
    mesh = mesh or sharding.single_device_mesh()
    inputs = jax.device_put((padded, lengths, np.asarray(jax.random.key_data(rng))),
                            sharding.replicated(mesh))
    return _generate(config, max_new_tokens, sampling, eos_id, cache_dtype, mesh, params,
                     *inputs)
