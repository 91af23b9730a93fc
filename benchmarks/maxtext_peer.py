"""The MaxText peer (benchmarks/peers/): its reference model and a runner for its scripts.

The scripts install MaxText 0.2.5 into its own Python 3.12 environment outside the repo on
first use (about 3 GB, a few minutes) and run it on the CPU.
"""
import os
import pathlib
import subprocess
import tempfile

PEERS = pathlib.Path(__file__).resolve().parent / "peers"
# The peer model in cla-jax's terms: Llama-style MQA, untied output, float32.
REFERENCE = dict(vocab_size=32000, d_model=256, num_layers=4, num_heads=4, num_kv_heads=1,
                 head_dim=64, mlp_dim=1024, kv_sharing=1, rope_base=10000.0, norm_eps=1e-5,
                 max_seq_len=256, tie_embeddings=False, dtype="float32",
                 param_dtype="float32", attention="auto", remat="none")


def run_peer(script: str, **env_overrides: str) -> str:
    """Runs benchmarks/peers/<script> and returns its output; raises with its tail on failure."""
    if not (PEERS / script).is_file():
        raise FileNotFoundError(f"{PEERS / script} not found: the MaxText peer scripts live "
                                "in benchmarks/peers/ of this repository")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if "PY312" not in env:  # a pyenv shim named python3.12 may exist and still not run
        root = subprocess.run(["pyenv", "root"], capture_output=True, text=True).stdout.strip() \
            if any((pathlib.Path(p) / "pyenv").exists() for p in env["PATH"].split(":")) else ""
        found = sorted(pathlib.Path(root).glob("versions/3.12*/bin/python")) if root else []
        if found:
            env["PY312"] = str(found[-1])
    with tempfile.TemporaryDirectory() as work:
        result = subprocess.run(["bash", str(PEERS / script)], capture_output=True, text=True,
                                env={**env, "MAXTEXT_WORK": work, **env_overrides})
    log = result.stdout + result.stderr
    if result.returncode != 0:
        raise RuntimeError(f"{script} failed (exit {result.returncode}):\n{log[-2000:]}")
    return log
