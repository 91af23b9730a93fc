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
