"""cla-jax: decoder-only language models with Cross-Layer Attention (Brandon et al., 2024).

`import cla_jax` is light: the names below load jax and flax only when first used, so the
data tools (and the worker processes that build token stores) never import them.
"""
from __future__ import annotations

from cla_jax.lazy import lazy_exports

_EXPORTS = {
    "cache": ["KVCache", "init_cache", "kv_bytes"],
    "config": ["ConfigError", "ModelConfig", "kv_bytes_per_token", "num_params",
               "train_flops_per_token"],
    "model": ["Transformer", "abstract_params", "init_params"],
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
