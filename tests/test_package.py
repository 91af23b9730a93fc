"""The installable package: every console script of pyproject.toml names a real function, and
an installed script runs from any directory with a config given by path (the configs import
their siblings as `configs.*`)."""
import ast
import importlib.util
import pathlib
import subprocess
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def console_scripts() -> dict[str, str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["scripts"]


def test_every_console_script_names_a_function_of_its_module():
    # Read, not imported: each command module defines its absl flags on import.
    scripts = console_scripts()
    assert {"cla-train", "cla-eval", "cla-generate"} <= set(scripts)
    for name, target in scripts.items():
        module, function = target.split(":")
        spec = importlib.util.find_spec(module)
        assert spec is not None, f"{name}: no module {module}"
        tree = ast.parse(pathlib.Path(spec.origin).read_text())
        functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        assert function in functions, f"{name}: {module} has no function {function}"


def test_an_installed_script_runs_from_another_directory_with_a_config_by_path(tmp_path):
    script = pathlib.Path(sys.executable).parent / "cla-capacity"
    assert script.exists(), "the package is not installed: make test installs it (pip -e .)"
    config = ROOT / "configs" / "paper" / "1b_h128_mqa_cla2.py"  # imports configs.paper.common
    result = subprocess.run([str(script), f"--config={config}", "--budget_gib=40"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "5120 bytes/token" in result.stdout and "2.000x" in result.stdout
