"""The CLA model: layers, attention kernels and the scanned transformer."""
from cla_jax.model.transformer import Transformer, abstract_params, init_params

__all__ = ["Transformer", "abstract_params", "init_params"]
