"""Autoregressive decoding through the grouped KV cache.

Prompts of different lengths are right-padded and prefilled in one forward pass; then a jitted
`lax.while_loop` carries (step, tokens, cache, done, output) and writes one position per
sequence per step, at that sequence's own length. It stops when every sequence has emitted
EOS or the max_new_tokens budget is spent.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from cla_jax import sharding
from cla_jax.cache import constrain_cache, init_cache
from cla_jax.config import ModelConfig
from cla_jax.errors import UserError
from cla_jax.model import Transformer
from cla_jax.sampling import Sampling, sample, sample_rows  # noqa: F401 (re-exported)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _generate(config: ModelConfig, max_new_tokens: int, sampling: Sampling, eos_ids: tuple,
              cache_dtype: str, mesh: Mesh, params, prompts_BP, lengths_B, key_data):
    with sharding.activate(mesh):
        tokens, cache = _decode(config, max_new_tokens, sampling, eos_ids, cache_dtype, params,
                                sharding.constrain(prompts_BP, ("batch", "length")), lengths_B,
                                jax.random.wrap_key_data(key_data))
        return sharding.constrain(tokens, (None, None)), cache  # every process reads them


def _decode(config, max_new_tokens, sampling, eos_ids, cache_dtype, params, prompts_BP,
            lengths_B, rng):
    model = Transformer(config)
    batch, prompt_len = prompts_BP.shape
    positions = jnp.broadcast_to(jnp.arange(prompt_len), prompts_BP.shape)
    segment_ids = (positions < lengths_B[:, None]).astype(jnp.int32)  # 0 = padding
    cache = constrain_cache(init_cache(config, batch, prompt_len + max_new_tokens,
                                       jnp.dtype(cache_dtype)))
    logits, cache = model.apply({"params": params}, prompts_BP, positions, segment_ids, cache,
                                logits_at_B=lengths_B - 1)
    last_logits = logits[:, 0]
    # Row b's token i draws with fold_in(fold_in(rng, b), i): a row's text does not depend on
    # the rest of the batch (the serving engine keys its requests the same way).
    row_keys_B = jax.vmap(lambda b: jax.random.fold_in(rng, b))(jnp.arange(batch))
    settings_B = (jnp.full((batch,), sampling.temperature, jnp.float32),
                  jnp.full((batch,), sampling.top_k, jnp.int32),
                  jnp.full((batch,), sampling.top_p, jnp.float32))

    def draw(logits_BV, step):
        keys_B = jax.vmap(jax.random.fold_in, (0, None))(row_keys_B, step)
        return sample_rows(logits_BV, keys_B, *settings_B)[0]

    out = jnp.zeros((batch, max_new_tokens), jnp.int32)
    done = jnp.zeros((batch,), bool)

    def cond(carry):
        step, _, _, done, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, token_B, cache, done, out = carry
        out = out.at[:, step].set(jnp.where(done, 0, token_B))
        done = done | jnp.isin(token_B, jnp.array(eos_ids, jnp.int32))
        logits, cache = model.apply({"params": params}, token_B[:, None], cache.lengths[:, None],
                                    None, cache)
        return step + 1, draw(logits[:, 0], step + 1), cache, done, out

    carry = jax.lax.while_loop(cond, body, (0, draw(last_logits, 0), cache, done, out))
    return carry[4], carry[2]


def generate(config: ModelConfig, params, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             sampling: Sampling = Sampling(), rng: jax.Array | None = None,
             eos_id: int | Sequence[int] = (),
             cache_dtype: str | None = None, mesh: Mesh | None = None):
    """New tokens [batch, max_new_tokens] (0 after a sequence's EOS) and the final cache.

    eos_id: the id, or ids, that end a sequence (it is kept in the output); () = none.

    mesh: where `params` live (default: one device). Sequences split over (data, fsdp) when
    their number divides, heads and the cache's KV heads over tensor; every process passes the
    same prompts and gets all the tokens back.
    """
    sampling.check_vocab(config.vocab_size)
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
    eos_ids = tuple(sorted({eos_id} if isinstance(eos_id, (int, np.integer)) else set(eos_id)))
    return _generate(config, max_new_tokens, sampling, eos_ids, cache_dtype, mesh, params,
                     *inputs)
