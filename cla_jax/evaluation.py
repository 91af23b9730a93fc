"""Perplexity and bits per byte over a whole split: no batch dropped, padding weighted out."""
from __future__ import annotations

import math
from typing import Callable, Iterable

import jax
import numpy as np
from tqdm import tqdm


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
            "perplexity": math.exp(mean_nll),
            "bits_per_byte": totals["nll"] / math.log(2) / max(totals["bytes"], 1.0)}
