"""The documentation site builds with warnings as errors (mkdocs build --strict).

So a broken link or heading anchor (in docs/, in the README or in benchmarks/README.md, which
the site includes), a page missing from the navigation, or an API page that names a module or
object that no longer exists fails the suite. The API pages must also cover the package: every
public module of `cla_jax`, and the module of every name a package exports in `__all__`.
"""
from __future__ import annotations

import importlib
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("mkdocs")
pytest.importorskip("mkdocstrings")
pytest.importorskip("material")

ROOT = pathlib.Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "api"
DIRECTIVE = re.compile(r"^::: ([\w.]+)", re.M)
# The repository entries a build reads (a linked copy of them builds the same site).
BUILD_INPUTS = ["mkdocs.yml", "docs", "README.md", "benchmarks", "cla_jax"]


def mkdocs_build(config: pathlib.Path, site: pathlib.Path) -> subprocess.CompletedProcess:
    # Not --quiet: it drops the warnings before --strict counts them, and the build passes.
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict",
                           "-f", str(config), "-d", str(site)], cwd=config.parent, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_site_builds_with_warnings_as_errors(tmp_path):
    result = mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stderr[-5000:]
    site = tmp_path / "site"
    for page in ["index.html", "guides/quickstart/index.html", "api/serving/index.html",
                 "benchmarks/index.html", "readme/index.html"]:
        assert (site / page).is_file(), page
    # The API reference is rendered from the docstrings, not left as directives.
    model_page = (site / "api" / "model" / "index.html").read_text()
    assert "ModelConfig" in model_page and ":::" not in model_page
    # A results file linked from the guides is in the site.
    assert list((site / "benchmarks" / "results").glob("*.json"))


def linked_copy(tmp_path: pathlib.Path) -> pathlib.Path:
    """A folder that builds like the checkout: docs/ and mkdocs.yml copied (mkdocs finds docs/
    beside the config file's real path), the rest linked."""
    root = tmp_path / "repo"
    root.mkdir()
    for name in BUILD_INPUTS:
        if name == "docs":
            shutil.copytree(ROOT / name, root / name)
        elif name == "mkdocs.yml":
            shutil.copy(ROOT / name, root / name)
        else:
            (root / name).symlink_to(ROOT / name)
    return root


@pytest.mark.parametrize("breakage", ["missing page", "missing anchor", "missing object",
                                      "page not in nav"])
def test_a_broken_reference_fails_the_build(tmp_path, breakage):
    """Negative controls: each kind of breakage the strict build is there to catch."""
    root = linked_copy(tmp_path)
    guide = root / "docs" / "guides" / "quickstart.md"
    if breakage == "missing page":
        guide.write_text(guide.read_text() + "\nSee [nothing](no_such_guide.md).\n")
    elif breakage == "missing anchor":
        guide.write_text(guide.read_text() + "\nSee [nothing](data.md#no-such-heading).\n")
    elif breakage == "missing object":
        page = root / "docs" / "api" / "model.md"
        page.write_text(page.read_text() + "\n::: cla_jax.config.no_such_function\n")
    else:
        (root / "docs" / "guides" / "orphan.md").write_text("# Not in the navigation\n")
    result = mkdocs_build(root / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0, f"{breakage}: the build passed"


def public_modules() -> list[str]:
    names = []
    for path in sorted((ROOT / "cla_jax").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] in ("__init__", "__main__"):
            parts = parts[:-1] if parts[-1] == "__init__" else None
        if parts and not any(p.startswith("_") for p in parts) and len(parts) > 1:
            names.append(".".join(parts))
    return names


def documented() -> set[str]:
    return {m for page in API.glob("*.md") for m in DIRECTIVE.findall(page.read_text())}


def test_every_public_module_has_an_api_page():
    missing = [m for m in public_modules() if m not in documented()]
    assert not missing, f"add these to a page of docs/api/: {missing}"


@pytest.mark.parametrize("package", ["cla_jax", "cla_jax.model", "cla_jax.data",
                                     "cla_jax.serving"])
def test_every_exported_name_is_documented(package):
    """Each name of a package's __all__ is defined in a module the API pages render."""
    module = importlib.import_module(package)
    rendered = documented()
    lazy = {name: f"{package}.{home}" for home, names in getattr(module, "_EXPORTS", {}).items()
            for name in names}
    for name in module.__all__:
        home = lazy.get(name) or getattr(module, name).__module__
        assert home in rendered or f"{home}.{name}" in rendered, (package, name, home)


def test_the_readme_stays_short_and_links_into_the_guides():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 160
    assert text.startswith("# cla-jax\n\n```bash\nmake demo")
    assert "docs/guides/quickstart.md" in text
