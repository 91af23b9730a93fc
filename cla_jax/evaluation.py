"""Perplexity and bits per byte over a whole split: no batch dropped, padding weighted out."""
from __future__ import annotations

import math
from typing import Callable, Iterable

import jax
import numpy as np
from tqdm import tqdm

from cla_jax import checkpoint, sharding
from cla_jax.config import kv_bytes_per_token, num_params
from cla_jax.data import eval_batches, num_eval_batches
from cla_jax.data.corpus import prepare_corpus
from cla_jax.storage import as_path
from cla_jax.train.step import make_eval_step


def safe_exp(x: float) -> float:
    """exp(x), inf where it overflows (a diverged loss): perplexity is reported, not raised."""
    return math.exp(x) if x < math.log(np.finfo(np.float64).max) else math.inf


def evaluate(eval_step: Callable, params, batches: Iterable[dict], num_batches: int | None = None,
             progress: bool = True) -> dict[str, float]:
    """Streams `batches` through `eval_step` (see train.step.make_eval_step) and sums."""
    totals = None
    for batch in tqdm(batches, total=num_batches, desc="eval", unit="batch",
                      disable=not progress, leave=False):
        sums = eval_step(params, batch)
        totals = sums if totals is None else jax.tree_util.tree_map(np.add, totals, sums)
    if totals is None:
        raise ValueError("evaluation got no batches")
    totals = {k: float(v) for k, v in jax.device_get(totals).items()}
    mean_nll = totals["nll"] / max(totals["tokens"], 1.0)
    return {"tokens": int(totals["tokens"]), "mean_nll": mean_nll,
            "perplexity": safe_exp(mean_nll),
            "bits_per_byte": totals["nll"] / math.log(2) / max(totals["bytes"], 1.0)}


def evaluate_checkpoint(workdir, cache_dir, step: int | None = None, split: str = "validation",
                        batch_size: int | None = None, mesh_spec=None) -> dict:
    """eval.py's work: a run's checkpoint (default: latest) over a whole split, with the
    model's size, KV bytes/token and the split's unigram perplexity. mesh_spec None = the
    run's config.mesh."""
    run = checkpoint.restore_model(as_path(workdir) / "checkpoints", step, mesh_spec)
    step, config, model, mesh = run.step, run.config, run.model, run.mesh
    seq_len, batch = config.train.seq_len, batch_size or config.train.batch_size
    sharding.check_batch(batch, mesh, "the eval batch size (--batch_size)")
    corpus = prepare_corpus(config.data, cache_dir, max_vocab_size=model.vocab_size)
    eval_step = make_eval_step(model, corpus.tokenizer.token_bytes(), mesh)
    stream = corpus.validation if split == "validation" else corpus.train
    batches = eval_batches(stream, seq_len, batch, *sharding.data_share(mesh))
    results = evaluate(eval_step, run.params, (sharding.global_batch(b, mesh) for b in batches),
                       num_eval_batches(stream, seq_len, batch))
    results.update(step=step, split=split, mesh=dict(mesh.shape), params=num_params(model),
                   kv_bytes_per_token=kv_bytes_per_token(model),
                   unigram_perplexity=corpus.unigram_perplexity(split))
    return results
