"""The package's layers: every module of cla_jax sits in one layer, and imports only from its
own layer or the layers below it, never from one built on it.

Imports are read from the source (ast), not executed: module-level imports, imports inside
functions (the lazy ones that keep `import cla_jax` light) and a package's lazy re-exports
(its `_EXPORTS` dict, see cla_jax/lazy.py) all count. A new module must be placed in a layer
here; a module a layer names is matched by the longest name that is it or a package above it.
"""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cla_jax"

# Lowest first. A module may import its own layer and every layer before it.
LAYERS: list[tuple[str, list[str]]] = [
    ("foundation: errors, paths, checksums, lazy re-exports",
     ["cla_jax.errors", "cla_jax.storage", "cla_jax.checksum", "cla_jax.lazy"]),
    ("data: sources, token store, tokenizers, packing (no jax)", ["cla_jax.data"]),
    ("model configuration", ["cla_jax.config"]),
    ("meshes and shardings", ["cla_jax.sharding"]),
    ("sampling and the KV cache", ["cla_jax.sampling", "cla_jax.cache"]),
    ("the model and its loss", ["cla_jax.model"]),
    ("the package's public names", ["cla_jax"]),
    ("checkpoints, decoding, the serving engine",
     ["cla_jax.checkpoint", "cla_jax.decoding", "cla_jax.serving"]),
    ("evaluation (the eval step and the perplexity protocols)", ["cla_jax.evaluation"]),
    ("training (optimizer, state, train step, loop)", ["cla_jax.train"]),
    ("command-line plumbing shared by the commands", ["cla_jax.cli"]),
    ("adapting a checkpoint to CLA", ["cla_jax.adapt"]),
    ("Hugging Face and GGUF import", ["cla_jax.hf_import", "cla_jax.gguf_import"]),
    ("Hugging Face export", ["cla_jax.hf_export"]),
    ("applications on the library: HTTP server, lm-eval adapter, AOT compilation, tools",
     ["cla_jax.serving.http", "cla_jax.lm_eval", "cla_jax.aot", "cla_jax.capacity",
      "cla_jax.data.prepare"]),
    ("the command lines", ["cla_jax.scripts", "cla_jax.lm_eval_adapter"]),
]
RANK = {name: rank for rank, (_, names) in enumerate(LAYERS) for name in names}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int | None:
    """The rank of the longest layer name that is `module` or a package above it (the root
    `cla_jax` names only the package's own __init__)."""
    for name in sorted(RANK, key=len, reverse=True):
        if module == name or (name != "cla_jax" and module.startswith(name + ".")):
            return RANK[name]
    return None


def imports_of(module: str) -> set[str]:
    """Every cla_jax module `module` imports, at any depth of its code, plus the submodules
    its `_EXPORTS` re-export."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:  # `from cla_jax import checkpoint` imports a module
                submodule = f"{source}.{alias.name}"
                found.add(submodule if submodule in MODULES else source)
        elif isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets):
            found.update(f"{package}.{name}" for name in ast.literal_eval(node.value))
    return {name for name in found if name == "cla_jax" or name.startswith("cla_jax.")}


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in MODULES if layer_of(m) is None)
    assert not unplaced, f"place these modules in a layer of tests/test_layers.py: {unplaced}"


def test_every_layer_names_something_that_exists():
    missing = sorted(name for name in RANK if name not in MODULES)
    assert not missing, f"layers name modules that do not exist: {missing}"


def test_no_module_imports_a_layer_built_on_it():
    upward = []
    for module in MODULES:
        for target in sorted(imports_of(module)):
            assert target in MODULES, f"{module} imports {target}, which does not exist"
            if layer_of(target) > layer_of(module):
                upward.append(f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} "
                              f"({LAYERS[layer_of(target)][0]})")
    assert not upward, "imports that go up a layer:\n" + "\n".join(upward)


def test_the_checker_sees_lazy_imports_and_re_exports():
    """The reading above finds what the rule needs: an import inside a function, a module
    imported by `from package import module`, and a package's lazy re-exports; and the
    arrow that once ran back up (evaluation importing train.step) would fail."""
    assert "cla_jax.serving.http.server" in imports_of("cla_jax.scripts.serve")  # in main()
    assert "cla_jax.model" in imports_of("cla_jax")  # _EXPORTS
    assert "cla_jax.data.tokenizer" in imports_of("cla_jax.data")
    assert layer_of("cla_jax.serving.http.app") > layer_of("cla_jax.serving.engine")
    assert layer_of("cla_jax.data.prepare") > layer_of("cla_jax.data.store")
    assert "cla_jax.checkpoint" in imports_of("cla_jax.evaluation")  # from cla_jax import ...
    assert layer_of("cla_jax.train.step") > layer_of("cla_jax.evaluation")
