"""Cross-entropy over chunks of positions, so the float32 [B, T, vocab] logits never exist.

The unembedding, log-softmax and target pick run `chunk_size` positions of every row at a
time, forward and backward, under custom VJPs:

- `chunked_nll`: per-token NLL [B, T]; the backward pass recomputes each chunk's logits from
  the saved per-token logsumexp (one unembedding matmul more than unchunked autodiff).
- `chunked_nll_sum`: sum(weights * NLL), the training loss; the forward pass computes the
  gradients too, chunk by chunk, so the matmuls are the three of unchunked autodiff.

Chunks cut the sequence axis, never the batch, so a batch sharded over the mesh stays put.
The unembedding comes in as the master weight: it is cast to the compute dtype (the hidden
states'), then gathered over fsdp, once per call. Its gradient is accumulated in float32 chunk
by chunk on each device, from that device's rows only, and summed across devices once, after
the last chunk, onto the weight's fsdp shards (a reduce-scatter): summing inside the chunk
loop would move the whole [D, V] float32 gradient once per chunk (seen in the compiled TPU and
GPU programs: 16 reductions of 412 MB a step for the paper's 1B at 2048 tokens). The price is
one unsharded [D, V / tensor] float32 accumulator per device.

    nll_BT = chunked_nll(hidden_BTD, unembedding(config, params), targets_BT, chunk_size)

`token_nll` is the model's NLL of every target of a packed batch, chunked or not (by
`config.loss_chunk_size`): what the training step (`train.step`) and the evaluation step
(`evaluation.make_eval_step`) both score with.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from cla_jax.config import ModelConfig
from cla_jax.model.layers import cast_then_gather
from cla_jax.model.transformer import Transformer
from cla_jax.sharding import constrain, split_over

F32 = jnp.float32
AXES_DV = ("embed", "vocab")  # the unembedding's logical axes (the tied embedding transposed)
# The per-device partial gradient: one [D, V] per batch shard, the shards over the batch's
# mesh axes (so embed, whose fsdp axis the batch already took, stays whole).
AXES_SDV = ("batch", "embed", "vocab")


def unembedding(config: ModelConfig, params) -> jax.Array:
    """The output matrix [D, V], master dtype and layout: the embedding transposed when tied."""
    return params["embed"]["embedding"].T if config.tie_embeddings else \
        params["unembed"]["kernel"]


def position_chunks(x_BT_, chunk_size: int):
    """[B, T, ...] -> [T / chunk, B, chunk, ...], zero-padded along T to whole chunks."""
    b, t = x_BT_.shape[:2]
    pad = -t % chunk_size
    x_BT_ = jnp.pad(x_BT_, [(0, 0), (0, pad)] + [(0, 0)] * (x_BT_.ndim - 2))
    return x_BT_.reshape(b, -1, chunk_size, *x_BT_.shape[2:]).swapaxes(0, 1)


def _unchunk(x_NBC_, t: int):
    """The inverse of `position_chunks`: [N, B, C, ...] -> [B, t, ...]."""
    x_BNC_ = x_NBC_.swapaxes(0, 1)
    return x_BNC_.reshape(x_BNC_.shape[0], -1, *x_BNC_.shape[3:])[:, :t]


def _logsumexp_and_softmax(logits_BCV):
    """jax.nn.logsumexp's own arithmetic (same bits), and the softmax from the same exp."""
    max_BC1 = jnp.max(logits_BCV, axis=-1, keepdims=True)
    max_BC1 = jnp.where(jnp.isfinite(max_BC1), max_BC1, 0.0)
    exp_BCV = jnp.exp(logits_BCV - max_BC1)
    sum_BC1 = jnp.sum(exp_BCV, axis=-1, keepdims=True)
    return (jnp.log(sum_BC1) + max_BC1)[..., 0], exp_BCV / sum_BC1


def _scan(hidden_BTD, unembed_DV, targets_BT, chunk_size, g_BT=None, logz_BT=None,
          master_dtype=None):
    """Per-token (NLL, logsumexp) float32 [B, T] and, given the NLL's cotangent g_BT, the
    gradients (d hidden [B, T, D], d unembed [D, V] in `master_dtype`) of sum(g * NLL); a
    saved logz_BT spares recomputing the logsumexp. unembed_DV: already in the compute dtype
    and gathered (`cast_then_gather`)."""
    b, t, d = hidden_BTD.shape
    chunk_size = min(chunk_size, t)
    dtype = unembed_DV.dtype

    shards = split_over("batch", b)  # how many ways the mesh splits the batch (1: none)

    def chunk(d_unembed_SDV, xs):
        h_BCD, targets_BC, g_BC, logz_BC = xs
        h_MD = h_BCD.reshape(-1, d)  # 2-D matmuls: faster on CPU (see layers.Projection)
        # float32 accumulation, rounded to the compute dtype as the model's own logits are.
        logits_MV = jnp.dot(h_MD, unembed_DV, preferred_element_type=F32).astype(dtype)
        logits_BCV = constrain(logits_MV.astype(F32).reshape(b, -1, unembed_DV.shape[1]),
                               ("batch", "length", "vocab"))
        if logz_BC is None:
            logz_BC, softmax_BCV = _logsumexp_and_softmax(logits_BCV)
        else:
            softmax_BCV = jnp.exp(logits_BCV - logz_BC[..., None])
        # A one-hot sum, not a gather: it stays local when the vocab is split over tensor.
        is_target_BCV = jnp.arange(logits_BCV.shape[-1]) == targets_BC[..., None]
        nll_BC = logz_BC - jnp.sum(jnp.where(is_target_BCV, logits_BCV, 0.0), axis=-1)
        if g_BC is None:
            return d_unembed_SDV, (nll_BC, logz_BC, None)
        # Cast to the compute dtype, as autodiff of the model's logits casts its cotangent.
        d_logits_MV = ((softmax_BCV - is_target_BCV) * g_BC[..., None]).astype(dtype).reshape(
            h_MD.shape[0], -1)
        d_h_BCD = jnp.dot(d_logits_MV, unembed_DV.T, preferred_element_type=F32).astype(
            h_BCD.dtype).reshape(h_BCD.shape)
        # Each batch shard's rows into its own partial sum: no cross-device sum in the loop.
        d_unembed_SDV = constrain(d_unembed_SDV + jnp.einsum(
            "smd,smv->sdv", h_MD.reshape(shards, -1, d),
            d_logits_MV.reshape(shards, -1, d_logits_MV.shape[-1]),
            preferred_element_type=F32), AXES_SDV)
        return d_unembed_SDV, (nll_BC, logz_BC, d_h_BCD)

    xs = tuple(None if x is None else position_chunks(x, chunk_size)
               for x in (hidden_BTD, targets_BT, g_BT, logz_BT))
    zeros = None if g_BT is None else constrain(jnp.zeros((shards, *unembed_DV.shape), F32),
                                                AXES_SDV)
    d_unembed_SDV, (nll, logz, d_hidden) = jax.lax.scan(chunk, zeros, xs)
    nll_BT, logz_BT = _unchunk(nll, t), _unchunk(logz, t)
    if g_BT is None:
        return nll_BT, logz_BT
    # One sum across devices, in float32, onto the weight's layout: a reduce-scatter.
    d_unembed_DV = constrain(jnp.sum(d_unembed_SDV, axis=0), AXES_DV)
    return nll_BT, logz_BT, _unchunk(d_hidden, t), d_unembed_DV.astype(master_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def chunked_nll(hidden_BTD, unembed_DV, targets_BT, chunk_size: int) -> jax.Array:
    """Per-token NLL float32 [B, T] of `targets_BT` under the logits hidden @ unembed, computed
    `chunk_size` positions at a time (T need not be a multiple: the last chunk is padded).

    hidden_BTD in the compute dtype, unembed_DV the master weight (see `unembedding`); the
    matmul runs in the compute dtype and accumulates in float32. Differentiable in hidden and
    unembed (whose gradient is in unembed's own dtype).
    """
    return _nll_forward(hidden_BTD, unembed_DV, targets_BT, chunk_size)[0]


def _compute_weight(unembed_DV, hidden_BTD):
    return cast_then_gather(unembed_DV, AXES_DV, hidden_BTD.dtype)


def _nll_forward(hidden_BTD, unembed_DV, targets_BT, chunk_size):
    w_DV = _compute_weight(unembed_DV, hidden_BTD)
    nll_BT, logz_BT = _scan(hidden_BTD, w_DV, targets_BT, chunk_size)
    return nll_BT, (hidden_BTD, w_DV, targets_BT, logz_BT, unembed_DV)


def _nll_backward(chunk_size, saved, g_BT):
    hidden_BTD, w_DV, targets_BT, logz_BT, unembed_DV = saved
    *_, d_hidden, d_unembed = _scan(hidden_BTD, w_DV, targets_BT, chunk_size, g_BT, logz_BT,
                                    unembed_DV.dtype)
    return d_hidden, d_unembed, None


chunked_nll.defvjp(_nll_forward, _nll_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def chunked_nll_sum(hidden_BTD, unembed_DV, targets_BT, weights_BT, chunk_size: int):
    """sum(weights * NLL), float32 scalar: `chunked_nll`'s NLL, weighed and summed.

    Differentiating it costs no recomputation: its forward pass under autodiff already
    computes the gradients of hidden and unembed (they are linear in the scalar's cotangent).
    """
    return jnp.sum(chunked_nll(hidden_BTD, unembed_DV, targets_BT, chunk_size) * weights_BT)


def _sum_forward(hidden_BTD, unembed_DV, targets_BT, weights_BT, chunk_size):
    nll_BT, _, d_hidden, d_unembed = _scan(
        hidden_BTD, _compute_weight(unembed_DV, hidden_BTD), targets_BT, chunk_size,
        weights_BT.astype(F32), master_dtype=unembed_DV.dtype)
    return jnp.sum(nll_BT * weights_BT), (d_hidden, d_unembed, nll_BT, weights_BT)


def _sum_backward(chunk_size, saved, g):
    d_hidden, d_unembed, nll_BT, weights_BT = saved
    return ((g * d_hidden).astype(d_hidden.dtype), (g * d_unembed).astype(d_unembed.dtype),
            None, (g * nll_BT).astype(weights_BT.dtype))


chunked_nll_sum.defvjp(_sum_forward, _sum_backward)


def forward(config: ModelConfig, params, batch, return_hidden: bool) -> jax.Array:
    """The model over a packed batch (inputs, positions, segment_ids): logits [B, L, vocab],
    or the final hidden states [B, L, D] with return_hidden."""
    return Transformer(config).apply({"params": params}, batch["inputs"], batch["positions"],
                                     batch["segment_ids"], return_hidden=return_hidden)[0]


def token_nll(config: ModelConfig, params, batch) -> jax.Array:
    """Negative log-likelihood of every target token, float32 [B, L]: over chunks of
    `config.loss_chunk_size` positions (`chunked_nll`), or from whole logits when it is 0."""
    if config.loss_chunk_size:
        hidden_BLD = forward(config, params, batch, return_hidden=True)
        return chunked_nll(hidden_BLD, unembedding(config, params), batch["targets"],
                           config.loss_chunk_size)
    logits = forward(config, params, batch, return_hidden=False)
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    return logz - target_logit
