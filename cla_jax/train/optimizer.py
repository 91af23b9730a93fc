"""AdamW with the paper's schedule: linear warmup, cosine decay to a fraction of the peak."""
from __future__ import annotations

import jax
import optax


def learning_rate_schedule(train) -> optax.Schedule:
    """`train`: a ConfigDict with learning_rate, steps, warmup_fraction, final_lr_fraction."""
    warmup = max(1, int(train.warmup_fraction * train.steps))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=train.learning_rate, warmup_steps=warmup,
        decay_steps=max(train.steps, warmup + 1),
        end_value=train.learning_rate * train.final_lr_fraction)


def weight_decay_mask(params):
    """Decay matrices (kernels, embeddings), not norm scales: a scale is not a 'weight'."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) in ("kernel", "embedding"), params)


def make_optimizer(train) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(train.grad_clip),
        optax.adamw(learning_rate_schedule(train), b1=train.b1, b2=train.b2,
                    weight_decay=train.weight_decay, mask=weight_decay_mask))
