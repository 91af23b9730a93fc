"""The training loop: data -> jitted steps -> metrics, periodic eval, checkpoints, resume."""
from __future__ import annotations

import math
import signal
import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from cla_jax import checkpoint, evaluation, sharding
from cla_jax.config import (
    ConfigError,
    ModelConfig,
    kv_bytes_per_token,
    num_params,
    train_flops_per_token,
)
from cla_jax.data import eval_batches, train_batches
from cla_jax.data.corpus import Corpus, prepare_corpus
from cla_jax.errors import UserError
from cla_jax.model import abstract_params
from cla_jax.storage import as_path
from cla_jax.train.metrics import MetricsWriter, peak_flops
from cla_jax.train.optimizer import check_settings, learning_rate_schedule, make_optimizer
from cla_jax.train.state import abstract_state, init_state
from cla_jax.train.step import make_train_step


class NonFiniteLossError(UserError, FloatingPointError):
    """Training diverged. Rerunning the same settings diverges again, so it is reported like
    bad input (one line, exit 2): the message says which step and what to change."""


def say(message: str) -> None:
    """A progress line on process 0 (absl runs at WARNING: orbax is chatty at INFO)."""
    if jax.process_index() == 0:
        tqdm.write(message)


def _after_divergence(last_saved: int | None) -> str:
    """What a diverged run leaves behind, and what to do next."""
    advice = "lower train.learning_rate or raise train.warmup_fraction"
    if last_saved is None:
        return f"the run has no checkpoint yet: {advice}, then start it again"
    return (f"its newest checkpoint is step {last_saved} (nothing later was saved): {advice}, "
            "then run again with the same --workdir to resume from it")


def check_train_config(train, model: ModelConfig, mesh) -> None:
    """Everything that can be refused before data is built or anything compiles."""
    if train.steps <= 0:
        raise ConfigError(f"train.steps must be > 0, got {train.steps}")
    check_settings(train)
    if train.grad_accum_steps <= 0 or train.batch_size % train.grad_accum_steps:
        raise ConfigError(
            f"train.batch_size ({train.batch_size}) must be divisible by train.grad_accum_steps "
            f"({train.grad_accum_steps})")
    sharding.check_batch(train.batch_size // train.grad_accum_steps, mesh,
                         "the micro batch, train.batch_size / train.grad_accum_steps,")
    sharding.param_shardings(abstract_params(model), mesh)  # every split axis divides
    if train.seq_len > model.max_seq_len:
        raise ConfigError(f"train.seq_len ({train.seq_len}) exceeds model.max_seq_len "
                          f"({model.max_seq_len})")


class _StopOnSigterm:
    """SIGTERM (preemption, Ctrl-C from a scheduler) asks the loop to checkpoint and exit.

    With several processes, JAX's preemption sync point (set up by jax.distributed) makes every
    process stop at the same step, whichever of them got the signal.
    """

    def __init__(self):
        self.requested = False
        self._multiprocess = jax.process_count() > 1
        if not self._multiprocess:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM: saving a checkpoint and stopping")
        self.requested = True

    def at(self, step: int) -> bool:
        if self._multiprocess:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def restore(self):
        if not self._multiprocess:
            signal.signal(signal.SIGTERM, self._previous)


def validation_metrics(eval_step, params, corpus: Corpus, train, mesh,
                       max_batches: int | None):
    """Evaluates `params` on the corpus's validation split (at most `max_batches` batches)
    and returns its metrics (`evaluation.evaluate`)."""
    batches = eval_batches(corpus.validation, train.seq_len, train.batch_size,
                           *sharding.data_share(mesh), **corpus.special_ids)
    if max_batches:
        batches = (b for _, b in zip(range(max_batches), batches))
    return evaluation.evaluate(eval_step, params,
                               (sharding.global_batch(b, mesh) for b in batches), progress=False)


def data_order(train, corpus: Corpus) -> dict:
    """What a saved data position means: in another token store, or with another batch size,
    sequence length or seed, the same position is another batch."""
    return {"store": corpus.store.meta["key"], "batch_size": train.batch_size,
            "seq_len": train.seq_len, "seed": train.seed}


def check_data_order(saved: dict | None, current: dict, where) -> None:
    """Refuses to restore a data position saved for another data order (None: a checkpoint
    from before data orders were saved)."""
    diffs = [f"{k} {saved.get(k)!r} (now {current[k]!r})" for k in current
             if saved is not None and saved.get(k) != current[k]]
    if diffs:
        raise checkpoint.CheckpointError(
            f"{where} was trained with {', '.join(diffs)}: its data position would mean "
            "another batch here. Resume with the settings that made it, or pass "
            "--restart_data to start this data from its first batch")


def check_meta_model(meta: dict, model: ModelConfig, workdir) -> None:
    """Raises unless a checkpoint's saved model config is the run's."""
    saved = ModelConfig.from_dict(meta["config"]["model"]).to_dict()
    checkpoint.check_same_model(saved, model.to_dict(), workdir)


def refuse_another_model(ckpt_dir, model: ModelConfig, workdir) -> None:
    """The model check on the newest step's meta, early: before a corpus is prepared, which
    can take hours. (A damaged meta is left to the restore, which reports and sets it aside.)"""
    steps = checkpoint.committed_steps(ckpt_dir)
    try:
        meta = checkpoint.read_meta(ckpt_dir, steps[-1])[1] if steps else None
    except checkpoint.DamagedCheckpointError:
        meta = None
    if meta is not None:
        check_meta_model(meta, model, workdir)


def restores_data(meta: dict, restart_data: bool) -> bool:
    """Whether a resume takes the saved data position (a run made by cla_jax.adapt has
    none)."""
    return meta.get("data") is not None and not restart_data


def resume_line(resumed: checkpoint.Resumed, ckpt_dir, data_restored: bool) -> str:
    """The line printed on resuming: the step and directory, damaged checkpoints moved aside,
    and whether the data position was restored."""
    moved = [f"checkpoint step {error.step} is damaged ({error.problem}); moved it to "
             f"{target}, every byte kept; " for error, target in resumed.set_aside]
    return ("".join(moved) + f"resumed from step {resumed.step} in {ckpt_dir}" +
            ("" if data_restored else "; the data starts from its first batch"))


def train_and_evaluate(config, workdir, cache_dir,
                       stop_at_step: int | None = None, devices=None,
                       restart_data: bool = False):
    """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the last
    validation metrics (on `train.eval_batches` batches).

    stop_at_step: checkpoint and return there, as a preemption would; the schedule still
    follows train.steps, so a later call continues the same run.
    devices: the devices of the mesh `config.mesh` (default: all of them).
    restart_data: resume params and optimizer but start the data from its first batch (needed
    for a checkpoint trained on other data, batch size, sequence length or seed).
    """
    workdir = as_path(workdir)  # a local directory or gs://
    model = ModelConfig.from_dict(config.model)
    train = config.train
    mesh = sharding.make_mesh(config.get("mesh"), devices)
    ckpt_dir = workdir / "checkpoints"
    check_train_config(train, model, mesh)
    refuse_another_model(ckpt_dir, model, workdir)
    corpus = prepare_corpus(config.data, cache_dir, max_vocab_size=model.vocab_size)
    order = data_order(train, corpus)
    optimizer = make_optimizer(train)
    train_step = make_train_step(model, optimizer, train.grad_accum_steps, mesh)  # checks mesh
    eval_step = evaluation.make_eval_step(model, corpus.tokenizer.token_bytes(), mesh)

    def check_resumable(step: int, meta: dict) -> None:
        """Refuses another run's checkpoint, on the meta of the step about to be restored,
        before anything is written into the workdir."""
        check_meta_model(meta, model, workdir)
        if restores_data(meta, restart_data):
            check_data_order(meta.get("data_order"), order, f"{ckpt_dir} step {step}")

    # Onto this mesh, whatever mesh saved it; damaged steps are set aside, never deleted.
    resumed = checkpoint.restore_newest_state(ckpt_dir, abstract_state(model, optimizer, mesh),
                                              check_resumable)
    data = train_batches(corpus.train, train.seq_len, train.batch_size, train.seed,
                         *sharding.data_share(mesh), **corpus.special_ids)
    if resumed:
        state = resumed.state
        if restores_data(resumed.meta, restart_data):
            data.set_state(resumed.meta["data"])
        say(resume_line(resumed, ckpt_dir, restores_data(resumed.meta, restart_data)))
    else:
        state = init_state(model, optimizer, train.seed, mesh)
    workdir.mkdir(parents=True, exist_ok=True)
    # Made after any set-aside: orbax lists the steps it may garbage-collect when it starts.
    checkpointer = checkpoint.Checkpointer(ckpt_dir, keep=train.keep_checkpoints)

    schedule = learning_rate_schedule(train)
    writer = MetricsWriter(workdir, resumed_step=resumed.step if resumed else None)
    flops_per_token, peak = train_flops_per_token(model, train.seq_len), peak_flops(mesh.size)
    say(f"model: {num_params(model):,} params, layer groups {list(model.groups)}, KV cache "
        f"{kv_bytes_per_token(model)} bytes/token at 16 bit; corpus: {len(corpus.train):,} train "
        f"/ {len(corpus.validation):,} validation tokens; mesh {sharding.describe(mesh)}")

    step = int(state.step)
    if step >= train.steps:
        say(f"nothing to train: {ckpt_dir} is at step {step} of train.steps={train.steps}; "
            "raise --config.train.steps to continue, or use another --workdir")
    stop = _StopOnSigterm()
    last_step = min(train.steps, stop_at_step or train.steps)
    pending, interval_start, last_eval = [], time.perf_counter(), None
    last_saved = resumed.step if resumed else None
    bar = tqdm(total=train.steps, initial=step, desc="train", unit="step",
               disable=jax.process_index() != 0)
    try:
        while step < last_step:
            state, metrics = train_step(state, sharding.global_batch(next(data), mesh))
            step += 1
            pending.append(metrics)
            stopping = stop.at(step)  # read once: a signal landing later waits for next step
            save = step % train.checkpoint_every == 0 or step == last_step or stopping
            evaluate = step % train.eval_every == 0 or step == train.steps
            if not (save or evaluate or step % train.log_every == 0):
                continue
            # One host sync per interval: the steps in between run ahead asynchronously.
            fetched = jax.device_get(pending)
            seconds = time.perf_counter() - interval_start
            for offset, m in enumerate(fetched):
                if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
                    bad = step - len(fetched) + offset + 1
                    raise NonFiniteLossError(
                        f"loss became {m['loss']} (grad norm {m['grad_norm']}) at step {bad}; "
                        + _after_divergence(last_saved))
            tokens = sum(float(m["tokens"]) for m in fetched)
            record = {"loss": float(np.mean([m["loss"] for m in fetched])),
                      "grad_norm": float(fetched[-1]["grad_norm"]),
                      "learning_rate": float(schedule(step - 1)),
                      "tokens_per_s": tokens / seconds}
            record["ppl"] = evaluation.safe_exp(record["loss"])
            if peak:
                record["mfu"] = record["tokens_per_s"] * flops_per_token / peak
            writer.write(step, "train", record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(len(fetched))
            if evaluate:
                last_eval = validation_metrics(eval_step, state.params, corpus, train, mesh,
                                               train.eval_batches)
                writer.write(step, "eval", last_eval)
                say(f"step {step}: train loss {record['loss']:.3f}, validation loss "
                          f"{last_eval['mean_nll']:.3f} ppl {last_eval['perplexity']:.2f} "
                          f"bits/byte {last_eval['bits_per_byte']:.3f}")
            if save:
                checkpointer.save(step, state, {"data": data.get_state(), "data_order": order,
                                                "config": config.to_dict()})
                last_saved = step
            pending, interval_start = [], time.perf_counter()
            if stopping:
                break
    finally:
        bar.close()
        stop.restore()
        checkpointer.wait()
        checkpointer.close()
        writer.close()
    return last_eval
