"""Lazy re-exports: a package's public names, loaded from their submodules on first use.

`import cla_jax` and `import cla_jax.data` stay light this way (the data tools, and the worker
processes that build token stores, never import jax or flax). Each such package lists its
names in an `_EXPORTS` dict, {submodule: [names]}, which tests/test_layers.py reads as that
package's imports.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable


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
