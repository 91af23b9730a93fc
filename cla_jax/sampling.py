"""Token sampling with per-row settings: temperature, top-k and top-p are arrays, one value per
row, so one compiled step serves any mix of requests (`decoding.generate` and the serving
engine share it).

The filters compose in the usual order: temperature, then top-k, then top-p over what top-k
kept. Each row draws with its own key, so a row's token never depends on the other rows.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from cla_jax.errors import UserError

# A nucleus whose mass is within this of top_p counts as reaching it: the float32 sum of the
# probabilities of the tokens above the boundary is rarely exact (0.5 + 0.25 can come out as
# 0.74999994), and the rule must not flip on that last bit.
TOP_P_TOLERANCE = 1e-6


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy; top_k 0 and top_p 1.0 = off. The filters compose."""
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        # Out of range, each would sample something odd rather than fail: a negative
        # temperature the least likely tokens, top_p 0 nothing but padding.
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise UserError(f"temperature must be a finite number >= 0 (0 = greedy), got "
                            f"{self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):  # refuses nan
            raise UserError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (an integer; 0 = off), got {self.top_k!r}")

    def check_vocab(self, vocab_size: int) -> None:
        if self.top_k > vocab_size:
            raise UserError(f"top_k ({self.top_k}) exceeds the model's vocab_size "
                            f"({vocab_size}); use at most {vocab_size}, or 0 = off")


def filter_logits(logits_BV, temperature_B, top_k_B, top_p_B):
    """Logits scaled by temperature with the tokens top-k and top-p drop set to -inf.

    Rows with temperature 0 come back unscaled (they are sampled greedily). Ties at a boundary
    stay in: a filter keeps every token whose logit equals the last one it keeps.
    """
    logits_BV = logits_BV.astype(jnp.float32)
    vocab = logits_BV.shape[-1]
    scale_B = jnp.where(temperature_B > 0, temperature_B, 1.0).astype(jnp.float32)
    logits_BV = logits_BV / scale_B[:, None]

    def filtered(logits_BV):
        sorted_BV = -jnp.sort(-logits_BV, axis=-1)  # descending
        # top-k: keep logits >= the k-th largest (k = 0: off).
        k_B = jnp.where(top_k_B > 0, jnp.minimum(top_k_B, vocab), vocab)
        rank_V = jnp.arange(vocab)
        sorted_BV = jnp.where(rank_V < k_B[:, None], sorted_BV, -jnp.inf)
        # top-p over what top-k kept: a token stays if the mass ranked above it is still below
        # top_p; the most likely token always stays.
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        mass_above_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
        keep_BV = ((mass_above_BV < top_p_B[:, None] - TOP_P_TOLERANCE) | (rank_V == 0)
                   | (top_p_B[:, None] >= 1.0))
        keep_BV &= rank_V < k_B[:, None]
        last_kept_B = jnp.sum(keep_BV, axis=-1) - 1
        threshold_B = jnp.take_along_axis(sorted_BV, last_kept_B[:, None], axis=-1)
        return jnp.where(logits_BV >= threshold_B, logits_BV, -jnp.inf)

    # Sorting the vocabulary is the costly part; a batch with no filter on skips it.
    needs_filter = jnp.any((top_k_B > 0) & (top_k_B < vocab)) | jnp.any(top_p_B < 1.0)
    return jax.lax.cond(needs_filter, filtered, lambda x: x, logits_BV)


def seed_key(seed: int) -> jax.Array:
    """The PRNG key of a seed in [0, 2^64): every bit of the seed counts.

    `jax.random.key(seed)` keeps only the low 32 bits unless jax_enable_x64 is on (seeds 5 and
    2^32 + 5 would sample the same text). For the default threefry keys this builds the key
    jax builds with x64 on, (high word, low word), so a seed below 2^32 keeps its old key;
    other key kinds fold the high word into the low word's key.
    """
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise UserError(f"a seed must be in [0, 2^64), got {seed}")
    high, low = seed >> 32, seed & 0xFFFFFFFF
    key = jax.random.key(low)
    if jax.random.key_data(key).shape == (2,):  # threefry2x32: the key *is* the seed's words
        return jax.random.wrap_key_data(jnp.asarray([high, low], jnp.uint32))
    return jax.random.fold_in(key, high) if high else key


def sample_rows(logits_BV, keys_B, temperature_B, top_k_B, top_p_B):
    """One token per row [B] int32, and its log-probability under the model's own
    (unscaled, unfiltered) distribution [B] float32.

    keys_B: a typed PRNG key per row (`jax.random.key`); the row's draw uses nothing else.
    """
    filtered_BV = filter_logits(logits_BV, temperature_B, top_k_B, top_p_B)
    drawn_B = jax.vmap(jax.random.categorical)(keys_B, filtered_BV)
    greedy_B = jnp.argmax(logits_BV, axis=-1)
    tokens_B = jnp.where(temperature_B > 0, drawn_B, greedy_B).astype(jnp.int32)
    logprobs_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
    return tokens_B, jnp.take_along_axis(logprobs_BV, tokens_B[:, None], axis=-1)[:, 0]


def sample(logits_BV, rng, sampling: Sampling):
    """Every row with the same settings; row b draws with `fold_in(rng, b)`."""
    batch = logits_BV.shape[0]
    keys_B = jax.vmap(lambda b: jax.random.fold_in(rng, b))(jnp.arange(batch))
    full = lambda value, dtype: jnp.full((batch,), value, dtype)  # noqa: E731
    return sample_rows(logits_BV, keys_B, full(sampling.temperature, jnp.float32),
                       full(sampling.top_k, jnp.int32), full(sampling.top_p, jnp.float32))[0]
