"""The CLA decoder: embed -> stages (one nn.scan each, one step per layer group) -> logits.

One forward serves training (no cache), prefill and decode (a grouped cache in and out):

    logits_BTV, cache = Transformer(config).apply(
        {"params": params}, tokens_BT, positions_BT, segment_ids_BT, cache)
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from cla_jax.cache import KVCache, StageCache, constrain_cache, dequantize, quantize
from cla_jax.config import REMAT_POLICIES, ModelConfig
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


class DecoderLayer(nn.Module):
    """Pre-norm attention + SwiGLU. Only a producer owns K/V projections (and a cache slot)."""

    config: ModelConfig
    produces_kv: bool
    separate_kv_norm: bool
    causal_only: bool
    kv_window: int | None = None

    @nn.compact
    def __call__(self, x_BTD, kv, cache_kv, group, mask, positions_BT):
        """mask: what `attention_mask` built for the kernel `config.attention`, or a paged
        step's `PagedBatch` (then cache_kv is the stage's block pool)."""
        cfg = self.config
        h_BTD = RMSNorm(cfg, name="attn_norm")(x_BTD)
        if self.produces_kv:
            # CLA: a shared K/V gets its own norm; a group of one is a plain Llama layer.
            kv_in = RMSNorm(cfg, name="kv_norm")(x_BTD) if self.separate_kv_norm else h_BTD
            kv_features = (cfg.num_kv_heads, cfg.head_dim)
            kv_axes = ("embed", "kv_heads", "head_dim")
            k_BTKH = projection(cfg, kv_features, -1, kv_axes, "key")(kv_in)
            v_BTKH = projection(cfg, kv_features, -1, kv_axes, "value")(kv_in)
            k_BTKH = apply_rope(k_BTKH, positions_BT, cfg)
            axes = ("batch", "length", "kv_heads", "head_dim")
            if isinstance(mask, paged_cache.PagedBatch):  # kv: the rows' blocks (RowsKV)
                cache_kv = paged_cache.write(cache_kv, group, k_BTKH, v_BTKH, mask)
                kv = paged_cache.read(cache_kv, group, mask, k_BTKH.dtype)
            else:
                if cache_kv is not None:
                    cache_kv = write_cache(cache_kv, group, k_BTKH, v_BTKH, positions_BT)
                    k_BTKH, v_BTKH = read_cache(cache_kv, group, self.kv_window, k_BTKH.dtype)
                kv = tuple(constrain(a, axes) for a in (k_BTKH, v_BTKH))

        q_BTNH = projection(cfg, (cfg.num_heads, cfg.head_dim), -1,
                            ("embed", "heads", "head_dim"), "query")(h_BTD)
        q_BTNH = apply_rope(q_BTNH, positions_BT, cfg)
        q_BTNH = constrain(q_BTNH, ("batch", "length", "heads", "head_dim"))
        if isinstance(mask, paged_cache.PagedBatch):
            out_BTNH = paged_cache.attend(q_BTNH, kv, mask)
        else:
            out_BTNH = attend(q_BTNH, *kv, mask, kind=cfg.attention,
                              causal_only=self.causal_only)
        x_BTD = x_BTD + projection(cfg, cfg.d_model, (-2, -1), ("heads", "head_dim", "embed"),
                                   "out")(out_BTNH)
        x_BTD = x_BTD + SwiGLU(cfg, name="mlp")(RMSNorm(cfg, name="mlp_norm")(x_BTD))
        return constrain(x_BTD, ("batch", "length", "embed")), kv, cache_kv


class CLAGroup(nn.Module):
    """One scan step: the producer computes K/V once, every layer of the group uses them."""

    config: ModelConfig
    group_size: int
    causal_only: bool
    kv_window: int | None = None

    @nn.compact
    def __call__(self, carry, mask, positions_BT):
        """carry: (x [B, T, D], the stage's cache arrays (`StageCache.arrays()`) or None,
        this group's index). mask: `attention_mask`'s."""
        x_BTD, cache_kv, group = carry
        kv = None
        for i in range(self.group_size):
            x_BTD, kv, cache_kv = DecoderLayer(
                self.config, produces_kv=i == 0, separate_kv_norm=self.group_size > 1,
                causal_only=self.causal_only, kv_window=self.kv_window, name=f"layer_{i}",
            )(x_BTD, kv, cache_kv, group, mask, positions_BT)
        return (x_BTD, cache_kv, group + 1), None


def scanned_stage(config: ModelConfig, group_size: int, num_groups: int, causal_only: bool,
                  kv_window: int | None, name: str) -> nn.Module:
    """A stage: `num_groups` equal groups as one nn.scan; params get a leading `layers` axis."""
    group = CLAGroup
    if REMAT_POLICIES[config.remat] is not None:
        policy = getattr(jax.checkpoint_policies, REMAT_POLICIES[config.remat])
        group = nn.remat(CLAGroup, policy=policy, prevent_cse=False)
    return nn.scan(
        group, variable_axes={"params": 0}, split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast), length=num_groups,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(config, group_size, causal_only, kv_window, name=name)


def attention_mask(tokens_BT, positions_BT, segment_ids_BT, cache: KVCache | None,
                   kv_window: int | None = None, kernel: str = "xla"):
    """Boolean [B, T, S] mask: causal, within one packed document, or over cache slots. For
    the flash kernels (no cache) the same causal packed mask as a `SegmentMask`: each
    token's index in its row and its segment id, so no [B, T, T] array is built."""
    b, t = tokens_BT.shape
    if cache is not None:
        # Slot j holds position j; slots past a query's position are empty or stale padding.
        slots = kv_window or cache.max_length
        return jnp.arange(slots)[None, None, :] <= positions_BT[:, :, None]
    index = jnp.arange(t)
    if kernel in FLASH_KERNELS:
        segments_BT = jnp.ones_like(tokens_BT) if segment_ids_BT is None else segment_ids_BT
        return SegmentMask(jnp.broadcast_to(index, (b, t)), segments_BT)
    mask_BTS = jnp.broadcast_to(index[:, None] >= index[None, :], (b, t, t))
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
            mask = cache.batch
        else:
            mask = attention_mask(tokens_BT, positions_BT, segment_ids_BT, cache, kv_window,
                                  kernel)

        new_stages = []
        for s, (group_size, num_groups) in enumerate(cfg.stages):
            stage_kv = None if cache is None else cache.stages[s].arrays()
            (x_BTD, stage_kv, _), _ = scanned_stage(
                cfg.replace(attention=kernel), group_size, num_groups, causal_only, kv_window,
                name=f"stage_{s}")((x_BTD, stage_kv, jnp.int32(0)), mask, positions_BT)
            if cache is not None:
                new_stages.append(StageCache(*stage_kv))

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
        return out, KVCache(stages=tuple(new_stages), lengths=jnp.maximum(cache.lengths, written_B))


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
