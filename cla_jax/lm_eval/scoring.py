"""Scoring rows of tokens on device: the jitted scorer and the padded batches it reads.

Rows go longest first into batches of `batch_size` rows padded to a length bucket (powers of
two up to max_length): one compiled program per bucket. The unembedding and log-softmax run
loss_chunk_size positions at a time, so [rows, max_length, vocab] logits never exist (an
imported 8k-context model's rolling windows would need gigabytes). Padding has segment id 0
and is never scored, whatever its token id.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cla_jax import sharding
from cla_jax.model import Transformer
from cla_jax.model.loss import position_chunks, unembedding

DEFAULT_CHUNK = 128  # positions unembedded at a time
IN_FLIGHT = 4  # scoring batches dispatched ahead of the one whose results are read


def make_scorer(config, mesh, chunk_size: int = DEFAULT_CHUNK):
    """(params, inputs, targets, segment_ids, scored) [B, L] -> (sum of the scored targets'
    logprobs [B] float32, whether each of them is the argmax [B] bool), replicated. The
    logits are made `chunk_size` positions at a time from the final hidden states."""
    model = Transformer(config)

    def chunk_scores(unembed_DV, hidden_BCD, targets_BC):
        """float32 (target logprob, target is the argmax) [B, C] of one chunk of positions."""
        logits_BCV = jnp.einsum("bcd,dv->bcv", hidden_BCD, unembed_DV,
                                preferred_element_type=jnp.float32)
        target_BC = jnp.take_along_axis(logits_BCV, targets_BC[..., None], -1)[..., 0]
        logz_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
        return target_BC - logz_BC, jnp.argmax(logits_BCV, -1) == targets_BC

    def score(params, inputs_BL, targets_BL, segment_ids_BL, scored_BL):
        with sharding.activate(mesh):
            rows = lambda x: sharding.constrain(x, ("batch", "length"))  # noqa: E731
            inputs_BL, targets_BL, segment_ids_BL, scored_BL = map(
                rows, (inputs_BL, targets_BL, segment_ids_BL, scored_BL))
            positions_BL = jnp.broadcast_to(jnp.arange(inputs_BL.shape[1]), inputs_BL.shape)
            hidden_BLD, _ = model.apply({"params": params}, inputs_BL, positions_BL,
                                        segment_ids_BL, return_hidden=True)
            length = hidden_BLD.shape[1]
            # [L / c, B, c, ...], the last chunk zero-padded (the top bucket is max_length
            # itself, any number of positions): padding is never scored.
            by_chunk = functools.partial(position_chunks, chunk_size=min(chunk_size or length,
                                                                         length))
            unembed_DV = unembedding(config, params).astype(hidden_BLD.dtype)  # cast once
            logprob_NBC, greedy_NBC = jax.lax.map(
                lambda xs: chunk_scores(unembed_DV, *xs),
                (by_chunk(hidden_BLD), by_chunk(targets_BL)))
            scored_NBC = by_chunk(scored_BL)
            sums_B = jnp.sum(jnp.where(scored_NBC, logprob_NBC, 0.0), axis=(0, 2))
            greedy_B = jnp.all(~scored_NBC | greedy_NBC, axis=(0, 2))
            whole = lambda x: sharding.constrain(x, (None,))  # noqa: E731 (every process)
            return whole(sums_B), whole(greedy_B)

    return jax.jit(score, out_shardings=sharding.replicated(mesh))


def pack_rows(rows, num_scored, batch_size: int, length: int):
    """Rows of tokens, each scored on its last num_scored targets -> (inputs, targets,
    segment_ids, scored) [batch_size, length]; padding (columns and whole rows) has segment
    id 0 and is never scored, whatever its token id."""
    inputs = np.zeros((batch_size, length), np.int32)
    targets = np.zeros((batch_size, length), np.int32)
    segment_ids = np.zeros((batch_size, length), np.int32)
    scored = np.zeros((batch_size, length), bool)
    for b, (row, num) in enumerate(zip(rows, num_scored)):
        n = len(row) - 1
        assert 0 < num <= n, f"a row of {n} targets cannot score its last {num}"
        inputs[b, :n], targets[b, :n], segment_ids[b, :n] = row[:-1], row[1:], 1
        scored[b, n - num:n] = True
    return inputs, targets, segment_ids, scored
