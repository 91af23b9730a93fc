"""cla-jax: decoder-only language models with Cross-Layer Attention (Brandon et al., 2024).

`import cla_jax` is light: the names below load jax and flax only when first used, so the
data tools (and the worker processes that build token stores) never import them.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

_EXPORTS = {
    "cache": ["KVCache", "init_cache", "kv_bytes"],
    "config": ["ConfigError", "ModelConfig", "kv_bytes_per_token", "num_params",
               "train_flops_per_token"],
    "model": ["Transformer", "abstract_params", "init_params"],
}


def lazy_exports(package: str, exports: dict[str, list[str]]) -> tuple[Callable, Callable, list]:
    """(__getattr__, __dir__, __all__) for a package whose names load from their submodules on
    first use."""
    module_of = {name: module for module, names in exports.items() for name in names}
    package_globals = vars(importlib.import_module(package))

    def getattr_(name: str) -> Any:
        if name not in module_of:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module_of[name]}"), name)
        package_globals[name] = value
        return value

    def dir_() -> list[str]:
        return sorted([*package_globals, *module_of])

    return getattr_, dir_, sorted(module_of)


__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
