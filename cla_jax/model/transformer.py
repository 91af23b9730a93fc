"""The CLA decoder: embed -> stages (one nn.scan each, one step per layer group) -> logits.

One forward serves training (no cache), prefill and decode (a grouped cache in and out):

    logits_BTV, cache = Transformer(config).apply(
        {"params": params}, tokens_BT, positions_BT, segment_ids_BT, cache)
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from cla_jax.cache import KVCache, StageCache, constrain_cache, dequantize, quantize
from cla_jax.config import REMAT_POLICIES, ModelConfig, Stage, StepLayer
from cla_jax.model import paged_cache
from cla_jax.model.attention import FLASH_KERNELS, SegmentMask, attend, choose_kernel
from cla_jax.model.layers import (
    RMSNorm,
    SwiGLU,
    apply_rope,
    dtype_of,
    embedding_lookup,
    normal_init,
    projection,
)
from cla_jax.sharding import constrain


def _write_at(cache_GBS_: jax.Array, group: jax.Array, new_BT_: jax.Array,
              positions_BT: jax.Array):
    rows_B1 = jnp.arange(cache_GBS_.shape[1])[:, None]
    return cache_GBS_.at[group, rows_B1, positions_BT].set(
        new_BT_.astype(cache_GBS_.dtype), mode="drop")


def write_cache(cache_kv: tuple, group: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array,
                positions_BT: jax.Array) -> tuple:
    """Writes each token's K and V into group `group` of a stage's cache arrays
    (`StageCache.arrays()`: K, V and, for int8, their scales), at the token's position;
    positions past the end are dropped. An int8 cache quantises the new tokens here, once.
    Only the new tokens are written: the stage cache is the scan's carry, so XLA updates it
    in place instead of copying it per step."""
    new = (k_BTKH, v_BTKH)
    if len(cache_kv) == 4:  # int8: (K, V, K scales, V scales)
        (qk, sk), (qv, sv) = quantize(k_BTKH), quantize(v_BTKH)
        new = (qk, qv, sk, sv)
    return tuple(constrain_cache(_write_at(c, group, n, positions_BT))
                 for c, n in zip(cache_kv, new))


def read_cache(cache_kv: tuple, group: jax.Array, window: int | None, dtype):
    """Group `group`'s K and V [B, S, K, H] in `dtype`: every slot, or the first `window`.
    An int8 cache is dequantised here, at the attention inputs."""
    def group_slots(c):
        c = jax.lax.dynamic_index_in_dim(c, group, keepdims=False)
        return c if window is None else c[:, :window]

    arrays = tuple(group_slots(c) for c in cache_kv)
    if len(arrays) == 4:
        return tuple(dequantize(q, s, dtype) for q, s in zip(arrays[:2], arrays[2:]))
    return tuple(a.astype(dtype) for a in arrays)


class RingMask(NamedTuple):
    """A local layer's view of a slot cache: its window of past positions is a ring of
    `window` slots (position p in slot p % window), read before the step writes and attended
    together with the step's own tokens. mask: [B, T, window + T]; slots: [B, T], the ring
    slot each token is written to (window = not written: padding, or not among the last
    `window` of its row)."""
    mask: jax.Array
    slots: jax.Array


def ring_mask(positions_BT, valid_BT, lengths_B, window: int) -> RingMask:
    """What the local layers of a cached step attend over: the ring's slots, holding the
    `window` positions before `lengths` (slot j: the latest p < length with p % window == j),
    then the step's tokens, each seen by a query within `window` positions at or before it."""
    q = positions_BT[:, :, None]
    last = lengths_B[:, None] - 1
    held_B1W = (last - jnp.mod(last - jnp.arange(window)[None, :], window))[:, None]  # < 0: empty
    old = (held_B1W >= 0) & (held_B1W <= q) & (q - held_B1W < window)
    k = positions_BT[:, None, :]
    new = valid_BT[:, None, :] & (k <= q) & (q - k < window)
    newest_B1 = jnp.max(jnp.where(valid_BT, positions_BT, -1), axis=1, keepdims=True)
    written = valid_BT & (positions_BT > newest_B1 - window)
    return RingMask(jnp.concatenate([old, new], axis=-1),
                    jnp.where(written, jnp.mod(positions_BT, window), window))


def ring_attend_kv(cache_kv: tuple, group: jax.Array, k_BTKH, v_BTKH, mask: RingMask):
    """A local producer's step over its ring: (K and V [B, window + T, K, H] to attend with:
    the ring as it was, then the new tokens; the ring with the new tokens written). An int8
    ring's new tokens are attended as stored (quantised), as later steps will read them."""
    dtype = k_BTKH.dtype
    old = read_cache(cache_kv, group, None, dtype)
    new = (k_BTKH, v_BTKH)
    if len(cache_kv) == 4:
        new = tuple(dequantize(*quantize(x), dtype) for x in new)
    kv = tuple(jnp.concatenate([o, n], axis=1) for o, n in zip(old, new))
    return kv, write_cache(cache_kv, group, k_BTKH, v_BTKH, mask.slots)


class DecoderLayer(nn.Module):
    """Pre-norm attention + SwiGLU. Only a producer owns K/V projections (and a cache entry).
    window: a local layer's window (None: global)."""

    config: ModelConfig
    produces_kv: bool
    separate_kv_norm: bool
    causal_only: bool
    kv_window: int | None = None
    window: int | None = None

    @nn.compact
    def __call__(self, x_BTD, kv, cache_kv, group, mask, positions_BT):
        """mask: what `attention_mask` built for the kernel `config.attention` (a local layer
        with a slot cache: a `RingMask`), or a paged step's `PagedBatch` (then cache_kv is
        the stage's block pool)."""
        cfg = self.config
        h_BTD = RMSNorm(cfg, name="attn_norm")(x_BTD)
        if self.produces_kv:
            # CLA: a shared K/V gets its own norm; a layer alone is a plain Llama layer.
            kv_in = RMSNorm(cfg, name="kv_norm")(x_BTD) if self.separate_kv_norm else h_BTD
            kv_features = (cfg.num_kv_heads, cfg.head_dim)
            kv_axes = ("embed", "kv_heads", "head_dim")
            k_BTKH = projection(cfg, kv_features, -1, kv_axes, "key")(kv_in)
            v_BTKH = projection(cfg, kv_features, -1, kv_axes, "value")(kv_in)
            k_BTKH = apply_rope(k_BTKH, positions_BT, cfg)
            axes = ("batch", "length", "kv_heads", "head_dim")
            if isinstance(mask, paged_cache.PagedBatch):  # kv: the rows' blocks (RowsKV)
                cache_kv = paged_cache.write(cache_kv, group, k_BTKH, v_BTKH, mask)
                kv = paged_cache.read(cache_kv, group, mask, k_BTKH.dtype, self.window)
            else:
                if isinstance(mask, RingMask):
                    (k_BTKH, v_BTKH), cache_kv = ring_attend_kv(cache_kv, group, k_BTKH,
                                                                v_BTKH, mask)
                elif cache_kv is not None:
                    cache_kv = write_cache(cache_kv, group, k_BTKH, v_BTKH, positions_BT)
                    k_BTKH, v_BTKH = read_cache(cache_kv, group, self.kv_window, k_BTKH.dtype)
                kv = tuple(constrain(a, axes) for a in (k_BTKH, v_BTKH))

        q_BTNH = projection(cfg, (cfg.num_heads, cfg.head_dim), -1,
                            ("embed", "heads", "head_dim"), "query")(h_BTD)
        q_BTNH = apply_rope(q_BTNH, positions_BT, cfg)
        q_BTNH = constrain(q_BTNH, ("batch", "length", "heads", "head_dim"))
        if isinstance(mask, paged_cache.PagedBatch):
            out_BTNH = paged_cache.attend(q_BTNH, kv, mask, self.window)
        else:
            out_BTNH = attend(q_BTNH, *kv, mask.mask if isinstance(mask, RingMask) else mask,
                              kind=cfg.attention, causal_only=self.causal_only,
                              window=self.window)
        x_BTD = x_BTD + projection(cfg, cfg.d_model, (-2, -1), ("heads", "head_dim", "embed"),
                                   "out")(out_BTNH)
        x_BTD = x_BTD + SwiGLU(cfg, name="mlp")(RMSNorm(cfg, name="mlp_norm")(x_BTD))
        return constrain(x_BTD, ("batch", "length", "embed")), kv, cache_kv


class LayerStep(nn.Module):
    """One scan step of a stage: its layers in order, each producer computing K/V once for
    the layers of the step that use them; a layer whose producer is in an earlier stage
    attends with that stage's K/V (`outer_kv`, the same for every step)."""

    config: ModelConfig
    layers: tuple[StepLayer, ...]
    exports: tuple[int, ...]
    outer_refs: tuple[int, ...]  # the earlier producers (layer indices) `outer_kv` holds
    causal_only: bool
    kv_window: int | None = None

    @nn.compact
    def __call__(self, carry, masks, positions_BT, outer_kv):
        """carry: (x [B, T, D], the cache arrays (`StageCache.arrays()`) of each producer of
        the step, or None, this step's index). masks: (global, local) masks or a PagedBatch.
        Returns the carry and the K/V of the producers in `exports`."""
        x_BTD, caches, step = carry
        caches = list(caches) if caches is not None else None
        kvs, entry = {}, 0
        for i, layer in enumerate(self.layers):
            cache_kv = None
            if layer.source == "self":
                kv = None
                cache_kv = None if caches is None else caches[entry]
            elif layer.source == "step":
                kv = kvs[layer.ref]
            else:
                kv = outer_kv[self.outer_refs.index(layer.ref)]
            mask = masks if isinstance(masks, paged_cache.PagedBatch) else \
                masks[layer.window is not None]
            x_BTD, kv, cache_kv = DecoderLayer(
                self.config, produces_kv=layer.source == "self", separate_kv_norm=layer.shared,
                causal_only=self.causal_only, kv_window=self.kv_window, window=layer.window,
                name=f"layer_{i}")(x_BTD, kv, cache_kv, step, mask, positions_BT)
            if layer.source == "self":
                kvs[i] = kv
                if caches is not None:
                    caches[entry] = cache_kv
                entry += 1
        caches = tuple(caches) if caches is not None else None
        return (x_BTD, caches, step + 1), tuple(kvs[i] for i in self.exports)


def scanned_stage(config: ModelConfig, stage: Stage, causal_only: bool,
                  kv_window: int | None, name: str) -> nn.Module:
    """A stage: its steps as one nn.scan; params get a leading `layers` axis (one per step)."""
    step = LayerStep
    if REMAT_POLICIES[config.remat] is not None:
        policy = getattr(jax.checkpoint_policies, REMAT_POLICIES[config.remat])
        step = nn.remat(LayerStep, policy=policy, prevent_cse=False)
    return nn.scan(
        step, variable_axes={"params": 0}, split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=stage.steps,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(config, stage.layers, stage.exports, stage.outer_refs, causal_only, kv_window, name=name)


def attention_mask(tokens_BT, positions_BT, segment_ids_BT, cache: KVCache | None,
                   kv_window: int | None = None, kernel: str = "xla",
                   local_window: int | None = None):
    """Boolean [B, T, S] mask: causal, within one packed document, or over cache slots. For
    the flash kernels (no cache) the same causal packed mask as a `SegmentMask`: each
    token's index in its row and its segment id, so no [B, T, T] array is built (the kernels
    apply a local window themselves). With `local_window`, a local layer's mask: without a
    cache, the dense mask limited to the last `local_window` positions; with one, a
    `RingMask` over its ring and the step's tokens."""
    b, t = tokens_BT.shape
    if cache is not None:
        if local_window is not None:
            valid_BT = positions_BT < cache.max_length
            if segment_ids_BT is not None:
                valid_BT &= segment_ids_BT > 0
            return ring_mask(positions_BT, valid_BT, cache.lengths, local_window)
        # Slot j holds position j; slots past a query's position are empty or stale padding.
        slots = kv_window or cache.max_length
        return jnp.arange(slots)[None, None, :] <= positions_BT[:, :, None]
    index = jnp.arange(t)
    if kernel in FLASH_KERNELS:
        segments_BT = jnp.ones_like(tokens_BT) if segment_ids_BT is None else segment_ids_BT
        return SegmentMask(jnp.broadcast_to(index, (b, t)), segments_BT)
    see_TT = index[:, None] >= index[None, :]
    if local_window is not None:
        see_TT &= index[:, None] - index[None, :] < local_window
    mask_BTS = jnp.broadcast_to(see_TT, (b, t, t))
    if segment_ids_BT is not None:
        mask_BTS = mask_BTS & (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])
    return mask_BTS


class Transformer(nn.Module):
    """The decoder-only CLA transformer: embedding, scanned stages of layers that share K/V,
    final norm and (tied or separate) unembedding; with a KV cache for decoding."""
    config: ModelConfig

    @nn.compact
    def __call__(self, tokens_BT, positions_BT, segment_ids_BT=None,
                 cache: KVCache | paged_cache.PagedCache | None = None,
                 kv_window: int | None = None, logits_at_B=None, return_hidden: bool = False):
        """Logits [B, T, vocab] in float32 and the updated cache (None without one).

        segment_ids_BT: packed documents (attention stays inside a segment) in training; with
        a cache, 0 marks padding tokens that do not count towards the cache lengths.
        kv_window (static, with a cache): attend over the first `kv_window` slots only, so a
        decode step costs what the filled part of the cache costs, not the whole allocation.
        Every position written must be below it.
        logits_at_B: the one index along T whose logits each row needs (a prefill needs only
        its last token's): the logits are then [B, 1, vocab], and the unembedding, a large
        part of a prefill, runs on one token per row.
        return_hidden: return the final-normed hidden states [B, T, D] (compute dtype) in
        place of the logits, for a loss that unembeds them itself (`model.loss`).

        A `PagedCache` (one serving step over a block pool, `cla_jax.model.paged_cache`) takes
        tokens and positions as [T, 1], one token per row, and returns logits
        [D + P, 1, vocab] for the tokens its batch samples, and the pool written.
        """
        cfg = self.config
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype_of(cfg.dtype),
                         param_dtype=dtype_of(cfg.param_dtype),
                         embedding_init=normal_init(cfg, ("vocab", "embed")), name="embed")
        # Gather the FSDP shards of the table before the lookup, as for any weight: a lookup
        # into an embed-sharded table would leave [B, T, D] split on D, and moving it to the
        # batch split costs a full replication (XLA's "involuntary full rematerialization").
        x_BTD = constrain(embedding_lookup(embed.embedding, tokens_BT, ("vocab", "embed"),
                                           dtype_of(cfg.dtype)),
                          ("batch", "length", "embed"))
        paged = isinstance(cache, paged_cache.PagedCache)
        if paged:
            kv_window = None
        elif kv_window is not None and cache is not None and not 0 < kv_window <= cache.max_length:
            raise ValueError(f"kv_window {kv_window} must be in (0, {cache.max_length}]")
        if not paged and (cache is None or kv_window == cache.max_length):
            kv_window = None
        causal_only = cache is None and segment_ids_BT is None
        # One kernel for every layer; the layers see it as their config's `attention`.
        kernel = choose_kernel(cfg.attention, dtype=dtype_of(cfg.dtype),
                               seq_len=tokens_BT.shape[1], causal_only=causal_only,
                               with_cache=cache is not None, num_heads=cfg.num_heads,
                               num_kv_heads=cfg.num_kv_heads)
        if paged:
            masks = cache.batch
        else:  # (global layers', local layers')
            local = None if not cfg.has_local_layers else attention_mask(
                tokens_BT, positions_BT, segment_ids_BT, cache, kv_window, kernel,
                min(cfg.local_window, cfg.max_seq_len))
            masks = (attention_mask(tokens_BT, positions_BT, segment_ids_BT, cache, kv_window,
                                    kernel), local)

        new_stages, exported, entry = [], {}, 0
        for s, stage in enumerate(cfg.plan):
            entries = None if cache is None else cache.stages[entry:entry + len(stage.producers)]
            carry = (x_BTD, None if cache is None else tuple(e.arrays() for e in entries),
                     jnp.int32(0))
            outer = tuple(exported[r] for r in stage.outer_refs)
            (x_BTD, stage_kv, _), kv_out = scanned_stage(
                cfg.replace(attention=kernel), stage, causal_only, kv_window,
                name=f"stage_{s}")(carry, masks, positions_BT, outer)
            for i, kv in zip(stage.exports, kv_out):  # one step: [1, ...] -> [...]
                exported[stage.first + i] = jax.tree_util.tree_map(lambda a: a[0], kv)
            if cache is not None:
                new_stages += [StageCache(*arrays) for arrays in stage_kv]
            entry += len(stage.producers)

        if paged:
            x_BTD = x_BTD[cache.batch.sample_rows()]
        elif logits_at_B is not None:
            x_BTD = jnp.take_along_axis(x_BTD, logits_at_B[:, None, None], axis=1)
        x_BTD = RMSNorm(cfg, name="final_norm")(x_BTD)
        if return_hidden:
            out = constrain(x_BTD, ("batch", "length", "embed"))
        else:
            if cfg.tie_embeddings:
                logits_BTV = embed.attend(x_BTD)
            else:
                logits_BTV = projection(cfg, cfg.vocab_size, -1, ("embed", "vocab"),
                                        "unembed")(x_BTD)
            out = constrain(logits_BTV.astype(jnp.float32), ("batch", "length", "vocab"))
        if cache is None:
            return out, None
        if paged:
            return out, cache.replace(stages=tuple(new_stages))
        valid_BT = jnp.ones_like(tokens_BT, bool) if segment_ids_BT is None else segment_ids_BT > 0
        written_B = jnp.max(jnp.where(valid_BT, positions_BT + 1, 0), axis=1)
        return out, cache.replace(stages=tuple(new_stages),
                                  lengths=jnp.maximum(cache.lengths, written_B))


def init_params(config: ModelConfig, rng: jax.Array):
    """Parameters (boxed with their logical axis names) for `config`.

    Jitted: an eager init of a scanned model dispatches op by op and is many times slower.
    """
    tokens = jnp.zeros((1, 1), jnp.int32)
    return jax.jit(lambda r: Transformer(config).init(r, tokens, tokens)["params"])(rng)


@functools.lru_cache(maxsize=32)
def abstract_params(config: ModelConfig):
    """Shapes and dtypes of the parameters, without allocating them (works at 1B+)."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
