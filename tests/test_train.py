"""Training end to end on a corpus the test writes: resume, checkpoints, eval, bad input."""
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import linen as nn

from cla_jax import checkpoint
from cla_jax.config import ModelConfig
from cla_jax.data import eval_batches
from cla_jax.data.corpus import prepare_corpus
from cla_jax.evaluation import evaluate
from cla_jax.evaluation import make_eval_step
from cla_jax.model import Transformer, abstract_params, init_params
from cla_jax.storage import as_path
from cla_jax.train.loop import NonFiniteLossError, train_and_evaluate
from configs import default

ROOT = pathlib.Path(__file__).parents[1]


def tiny_config(corpus_glob, **train):
    config = default.get_config()
    config.model.update(vocab_size=260, d_model=32, num_layers=3, num_heads=4, num_kv_heads=1,
                        head_dim=8, mlp_dim=48, kv_sharing=2, max_seq_len=32)
    config.data.update(source=corpus_glob, name="tiny", tokenizer="byte",
                       validation_fraction=0.25)
    config.mesh.update(data=2, fsdp=2, tensor=2)  # all 8 test devices: every run is sharded
    config.train.update({**dict(steps=6, batch_size=8, seq_len=16, log_every=1, eval_every=3,
                                eval_batches=2, checkpoint_every=3, keep_checkpoints=5,
                                learning_rate=1e-2), **train})
    return config


def losses(workdir):
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"}


def final_params(workdir, config, step):
    model = ModelConfig.from_dict(config.model)
    return checkpoint.restore_params(as_path(workdir) / "checkpoints", step,
                                     nn.meta.unbox(abstract_params(model)))


def test_resume_equals_uninterrupted_training_bitwise(tmp_path, corpus_glob):
    cache = tmp_path / "cache"
    config = tiny_config(corpus_glob, grad_accum_steps=2)
    train_and_evaluate(config, tmp_path / "straight", cache)
    train_and_evaluate(config, tmp_path / "resumed", cache, stop_at_step=3)
    assert checkpoint.good_steps(tmp_path / "resumed" / "checkpoints") == [3]
    train_and_evaluate(config, tmp_path / "resumed", cache)

    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(straight) == sorted(resumed) == [1, 2, 3, 4, 5, 6]
    assert straight == resumed  # exact floats: same data order, same state
    assert straight[6] < straight[1]
    a, b = final_params(tmp_path / "straight", config, 6), final_params(tmp_path / "resumed",
                                                                      config, 6)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def _tensorboard_purges(directory) -> list[int]:
    """Steps at which TensorBoard event files ask to purge later events (SessionLog START)."""
    import struct

    from tensorboardX.proto import event_pb2
    steps = []
    for path in sorted(pathlib.Path(directory).glob("events.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == 1:
                steps.append(event.step)
    return steps


def test_a_resume_after_a_crash_keeps_every_step_once_in_the_metrics(tmp_path, corpus_glob):
    import shutil

    config = tiny_config(corpus_glob, steps=6)  # logs every step, evaluates and saves at 3, 6
    train_and_evaluate(config, tmp_path / "run", tmp_path / "cache")
    # A crash after step 6 was logged but before its checkpoint committed, mid-line:
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "6")
    metrics = tmp_path / "run" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 7, "ki')
    train_and_evaluate(config, tmp_path / "run", tmp_path / "cache")  # resumes at step 3
    records = [(r["kind"], r["step"]) for r in map(json.loads, metrics.read_text().splitlines())]
    assert [s for kind, s in records if kind == "train"] == [1, 2, 3, 4, 5, 6]
    assert [s for kind, s in records if kind == "eval"] == [3, 6]
    assert _tensorboard_purges(tmp_path / "run" / "tensorboard") == [4]


def test_resume_refuses_another_data_order_unless_the_data_restarts(tmp_path, corpus_glob):
    from cla_jax.data import train_batches

    train_and_evaluate(tiny_config(corpus_glob, steps=3), tmp_path / "run", tmp_path / "cache")
    ckpts = tmp_path / "run" / "checkpoints"
    for change, name in ((dict(seed=1), "seed 0"), (dict(batch_size=4), "batch_size 8"),
                         (dict(seq_len=8), "seq_len 16")):
        with pytest.raises(checkpoint.CheckpointError, match=f"trained with {name} .*--restart"):
            train_and_evaluate(tiny_config(corpus_glob, steps=6, **change), tmp_path / "run",
                               tmp_path / "cache")
    assert checkpoint.good_steps(ckpts) == [3]  # nothing written by the refused runs
    config = tiny_config(corpus_glob, steps=6, seed=1)
    train_and_evaluate(config, tmp_path / "run", tmp_path / "cache", restart_data=True)
    # Step 6 saved the position of 3 batches of the seed-1 order, counted from its start.
    corpus = prepare_corpus(config.data, tmp_path / "cache")
    fresh = train_batches(corpus.train, 16, 8, seed=1)
    for _ in range(3):
        next(fresh)
    assert checkpoint.read_meta(ckpts, 6)[1]["data"] == fresh.get_state()


def test_interrupted_and_foreign_step_directories_are_skipped(tmp_path, corpus_glob, caplog):
    config = tiny_config(corpus_glob, steps=3)
    train_and_evaluate(config, tmp_path / "run", tmp_path / "cache")
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / "9.orbax-checkpoint-tmp-1234").mkdir()   # a save killed before its rename
    (ckpts / "12").mkdir()                             # empty dir named like a step
    (ckpts / "15" / "params").mkdir(parents=True)      # foreign: not a whole checkpoint
    (ckpts / "15" / "params" / "junk").write_text("x")
    assert checkpoint.good_steps(ckpts) == [3]
    assert "skipping checkpoint step 12" in caplog.text and "interrupted" in caplog.text
    step, meta = checkpoint.read_meta(ckpts)
    assert step == 3 and meta["step"] == 3
    # Training on resumes from step 3 and leaves the foreign directories alone.
    train_and_evaluate(tiny_config(corpus_glob, steps=4), tmp_path / "run", tmp_path / "cache")
    assert 4 in checkpoint.good_steps(ckpts)
    assert (ckpts / "12").is_dir() and (ckpts / "15" / "params" / "junk").exists()


def test_eval_nll_matches_an_independent_numpy_loop(tmp_path, corpus_glob):
    config = tiny_config(corpus_glob)
    corpus = prepare_corpus(config.data, tmp_path / "cache")
    model = ModelConfig.from_dict(config.model)
    params = nn.meta.unbox(init_params(model, jax.random.key(7)))
    stream = np.asarray(corpus.validation)
    seq_len, batch = 16, 3  # batch 3 leaves a partly padded last batch
    results = evaluate(make_eval_step(model, corpus.tokenizer.token_bytes()), params,
                       eval_batches(stream, seq_len, batch), progress=False)

    total_nll, count = 0.0, 0
    apply = jax.jit(lambda x, p, s: Transformer(model).apply({"params": params}, x, p, s)[0])
    for start in range(0, len(stream) - 1, seq_len):
        window = stream[start:start + seq_len + 1]
        inputs, targets = window[:-1], window[1:]
        segments = np.cumsum(inputs == corpus.tokenizer.bos_id) + 1
        positions = np.array([i - max([j for j in range(i + 1) if j == 0 or inputs[j] ==
                                       corpus.tokenizer.bos_id]) for i in range(len(inputs))])
        logits = np.asarray(apply(inputs[None], positions[None], segments[None])[0], np.float64)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        total_nll += float(np.sum(logz - logits[np.arange(len(targets)), targets]))
        count += len(targets)
    assert count == len(stream) - 1 == results["tokens"]
    np.testing.assert_allclose(results["mean_nll"], total_nll / count, rtol=1e-5)
    # Byte tokenizer: every non-special target is one byte of text; separators count none.
    text_bytes = int(np.sum(stream[1:] >= 3))
    np.testing.assert_allclose(results["bits_per_byte"], total_nll / np.log(2) / text_bytes,
                               rtol=1e-5)


@pytest.mark.parametrize("bad_step, saved, says", [
    (6, [4], "its newest checkpoint is step 4 (nothing later was saved)"),
    (3, [], "the run has no checkpoint yet"),  # once claimed a checkpoint "after step 2"
])
def test_non_finite_loss_names_its_step_among_several_pending(tmp_path, corpus_glob,
                                                              monkeypatch, bad_step, saved, says):
    """Steps 5, 6, 7 run ahead unchecked between the checkpoint at 4 and the one due at 8; the
    loss turns NaN at step 6 (injected into the real step's metrics, on device, without a
    sync): the error must name step 6, not the step at which it was noticed, and the
    checkpoint a resume would start from (or that there is none)."""
    import jax.numpy as jnp

    from cla_jax.train import loop
    real_make_train_step = loop.make_train_step

    def make_poisoned_train_step(*args, **kwargs):
        real_step = real_make_train_step(*args, **kwargs)

        def step(state, batch):
            state, metrics = real_step(state, batch)
            return state, {**metrics, "loss": jnp.where(state.step == bad_step, jnp.nan,
                                                        metrics["loss"])}
        return step

    monkeypatch.setattr(loop, "make_train_step", make_poisoned_train_step)
    config = tiny_config(corpus_glob, steps=12, log_every=100, eval_every=100,
                         checkpoint_every=4)
    with pytest.raises(NonFiniteLossError, match=re.escape(f"at step {bad_step}; {says}")):
        train_and_evaluate(config, tmp_path / "run", tmp_path / "cache")
    assert checkpoint.good_steps(tmp_path / "run" / "checkpoints") == saved


def test_checkpoint_of_another_model_is_refused_and_left_untouched(tmp_path, corpus_glob):
    config = tiny_config(corpus_glob, steps=3)
    train_and_evaluate(config, tmp_path / "run", tmp_path / "cache")
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")}
    other = tiny_config(corpus_glob, steps=6)
    other.model.num_layers = 4
    with pytest.raises(checkpoint.CheckpointError, match="num_layers: saved 3 vs now 4"):
        train_and_evaluate(other, tmp_path / "run", tmp_path / "other_cache")
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")} == before
    assert not (tmp_path / "other_cache").exists()  # refused before its corpus was prepared


def test_missing_corpus_is_one_clear_error(tmp_path, corpus_glob):
    config = tiny_config(f"files:{tmp_path}/nothing/*.txt")
    with pytest.raises(ValueError, match="matches no file"):
        train_and_evaluate(config, tmp_path / "run", tmp_path / "cache")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,fragment", [
    (["--config.train.stepz=3"], "Did you mean \"steps\""),
    (["--config.model.num_heads=3", "--config.model.num_kv_heads=2"], "multiple of"),
])
def test_train_script_bad_flags_print_one_error_line(tmp_path, args, fragment):
    result = subprocess.run(
        [sys.executable, "train.py", "--config=configs/default.py",
         f"--workdir={tmp_path / 'w'}", f"--cache_dir={tmp_path}", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0]
    assert not (tmp_path / "w").exists()


def test_generate_script_samples_from_a_checkpoint_and_reports_the_cache(tmp_path, corpus_glob):
    config = tiny_config(corpus_glob, steps=2)
    train_and_evaluate(config, tmp_path / "run", tmp_path / "cache")

    def generate_py(*args):
        return subprocess.run(
            [sys.executable, "generate.py", f"--workdir={tmp_path / 'run'}",
             f"--cache_dir={tmp_path / 'cache'}", *args], cwd=ROOT, capture_output=True,
            text=True, timeout=180, env={**os.environ, "JAX_PLATFORMS": "cpu"})

    ok = generate_py("--prompt=SPEAKER 1:", "--prompt=the", "--max_new_tokens=5",
                     "--temperature=0")
    assert ok.returncode == 0, ok.stderr[-500:]
    assert "SPEAKER 1:" in ok.stdout and "'the'" in ok.stdout
    # 3 layers in groups (2, 1): 2 K/V layers x (K, V) x 1 head x 8 dims x 4 bytes (float32).
    assert "= 128 bytes/token at float32 (2 of 3 layers cache K/V)" in ok.stdout
    too_long = generate_py("--prompt=the", "--max_new_tokens=40")
    assert too_long.returncode == 2
    assert [ln for ln in too_long.stderr.splitlines() if ln.startswith("error:")] == [
        "error: prompt (4 tokens) + max_new_tokens (40) exceeds the model's max_seq_len (32)"]


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path, corpus_glob):
    import signal
    import threading
    import time

    config = tiny_config(corpus_glob, steps=100_000, checkpoint_every=100_000, eval_every=100_000)
    metrics = tmp_path / "run" / "metrics.jsonl"

    def preempt():  # as a scheduler would, once training is under way
        while not metrics.exists() or not metrics.read_text():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    def sentinel(signum, frame):  # the process's own handler, from before training
        raise AssertionError("SIGTERM reached the handler installed before training")

    threading.Thread(target=preempt, daemon=True).start()
    previous = signal.signal(signal.SIGTERM, sentinel)
    try:
        train_and_evaluate(config, tmp_path / "run", tmp_path / "cache")
        after = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert after is sentinel  # training put the previous handler back
    steps = checkpoint.good_steps(tmp_path / "run" / "checkpoints")
    assert len(steps) == 1 and 1 <= steps[0] < 100_000
    step, meta = checkpoint.read_meta(tmp_path / "run" / "checkpoints")
    assert meta["data"] and meta["step"] == step
