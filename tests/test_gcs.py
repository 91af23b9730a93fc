"""gs:// end to end against a local GCS emulator (tests/gcs_emulator.py): the corpus, the token
store, the tokenizer, checkpoints, metrics, TensorBoard and eval results all live in a bucket.

train.py is killed (SIGKILL) after its first checkpoint, the run resumes from the bucket, and
its final params must equal those of an uninterrupted run with a local workdir, bit for bit;
eval.py then reads the checkpoint and the store from the bucket and writes its JSON there.
"""
import json
import signal
import subprocess
import sys
import time

import jax
import numpy as np
from etils import epath
from gcs_emulator import gcs_bucket  # noqa: F401 (a fixture)
from test_multiprocess import write_config
from test_train import ROOT, final_params, tiny_config

from cla_jax.train.loop import train_and_evaluate


def test_train_kill_resume_eval_on_gcs(tmp_path, corpus_glob, gcs_bucket):  # noqa: F811
    bucket = epath.Path(gcs_bucket)
    for path in sorted(epath.Path(corpus_glob.removeprefix("files:")).parent.glob("*.txt")):
        (bucket / "corpus" / path.name).write_text(path.read_text())
    config = tiny_config(f"files:{gcs_bucket}/corpus/*.txt", steps=12, checkpoint_every=3,
                         eval_every=6)
    config.data.data_dir = f"{gcs_bucket}/data"
    workdir = bucket / "run"

    child = subprocess.Popen(
        [sys.executable, "train.py", f"--config={write_config(config, tmp_path / 'c.py')}",
         f"--workdir={workdir}", f"--cache_dir={tmp_path / 'cache'}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not (workdir / "checkpoints" / "3" / "commit_success.txt").exists():
        assert child.poll() is None, child.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint on gs:// within 240 s"
        time.sleep(0.2)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
    assert list((bucket / "data" / "stores").iterdir())  # the store was built in the bucket

    resumed = train_and_evaluate(config, str(workdir), tmp_path / "cache")
    uninterrupted = train_and_evaluate(config, tmp_path / "local", tmp_path / "cache")
    assert resumed == uninterrupted
    for a, b in zip(jax.tree.leaves(final_params(str(workdir), config, 12)),
                    jax.tree.leaves(final_params(tmp_path / "local", config, 12))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"] for r in records if r["kind"] == "train"} >= set(range(4, 13))
    assert list((workdir / "tensorboard").iterdir())

    result = subprocess.run(
        [sys.executable, "eval.py", f"--workdir={workdir}", f"--cache_dir={tmp_path / 'cache'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads((workdir / "eval_validation_12.json").read_text())
    assert written["step"] == 12 and written["tokens"] > 0
