"""What the benchmarks rely on, minus any timing: remat policies really shrink a compiled train
step's activation memory (XLA's buffer assignment, exact), and results files are named and
written as benchmarks/README.md says."""
import json

import pytest

from benchmarks import common
from benchmarks.train_memory import step_memory
from cla_jax import ModelConfig

TINY = dict(vocab_size=256, d_model=64, num_layers=4, num_heads=4, num_kv_heads=1, head_dim=16,
            mlp_dim=128, max_seq_len=128, kv_sharing=2, attention="xla")


def test_remat_policies_shrink_the_train_step_activations():
    temporaries = {remat: step_memory(ModelConfig(remat=remat, **TINY), batch=4, seq_len=128)
                   ["temporaries"] for remat in ("none", "dots", "full")}
    # Saving only matmul outputs keeps less than saving everything; saving nothing, less still.
    assert temporaries["full"] < temporaries["dots"] < temporaries["none"], temporaries


def test_results_file_is_named_by_benchmark_date_and_device(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    report = {"benchmark": "demo", "date": common.today(), "environment": common.environment()}
    path = common.write_results(report)
    assert path == tmp_path / f"demo_{report['date']}_cpu.json"
    assert json.loads(path.read_text())["environment"]["backend"] == "cpu"


def test_missing_config_file_says_which(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.py"):
        common.model_from_config_file(str(tmp_path / "nope.py"))


def test_the_maxtext_peer_scripts_ship_in_the_repository():
    """The MaxText comparison once needed a shared/peers/ folder beside the repository, which
    no user has: every script a benchmark runs, and every file those scripts source or
    run, is under benchmarks/peers/, and no file points outside the repository."""
    import pathlib
    import re
    import subprocess

    from benchmarks import maxtext_peer as peers
    root = pathlib.Path(__file__).resolve().parents[1]
    assert peers.PEERS == root / "benchmarks" / "peers"
    called = set()
    for bench in (root / "benchmarks").glob("*.py"):
        called |= set(re.findall(r'run_peer\("([^"]+)"', bench.read_text()))
    assert called >= {"maxtext_train.sh", "maxtext_decode.sh"}, called
    for script in sorted(called):
        text = (peers.PEERS / script).read_text()
        subprocess.run(["bash", "-n", str(peers.PEERS / script)], check=True)  # it parses
        for used in re.findall(r'\$here/([\w.]+)', text):
            assert (peers.PEERS / used).is_file(), f"{script} needs {used}"
    listed = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True)
    files = listed.stdout.split() if listed.returncode == 0 else \
        [str(p.relative_to(root)) for p in root.rglob("*.md")]  # not a git checkout
    for name in files:
        path = root / name
        if path.suffix in (".py", ".md", ".sh") and path.is_file():
            assert "../" + "shared/" not in path.read_text(errors="replace"), name
