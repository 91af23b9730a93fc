"""cla-jax: decoder-only language models with Cross-Layer Attention (Brandon et al., 2024)."""
from cla_jax.cache import KVCache, init_cache, kv_bytes
from cla_jax.config import (ConfigError, ModelConfig, kv_bytes_per_token, num_params,
                            train_flops_per_token)
from cla_jax.model import Transformer, abstract_params, init_params

__all__ = [
    "ConfigError", "KVCache", "ModelConfig", "Transformer", "abstract_params", "init_cache",
    "init_params", "kv_bytes", "kv_bytes_per_token", "num_params",
    "train_flops_per_token",
]
