"""AdamW with the paper's schedule: linear warmup, cosine decay to a fraction of the peak."""
from __future__ import annotations

import math

import jax
import optax

from cla_jax.config import ConfigError


def check_settings(train) -> None:
    """Refuses optimizer settings that cannot train, before anything is built or written."""
    def number(name):
        value = train[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
                value):
            raise ConfigError(f"train.{name} must be a finite number, got {value!r}")
        return value

    rules = [("learning_rate", lambda v: v > 0, "> 0"),
             ("warmup_fraction", lambda v: 0 <= v < 1, "in [0, 1)"),
             ("final_lr_fraction", lambda v: 0 <= v <= 1, "in [0, 1]"),
             ("b1", lambda v: 0 <= v < 1, "in [0, 1)"),
             ("b2", lambda v: 0 <= v < 1, "in [0, 1)"),
             ("weight_decay", lambda v: v >= 0, ">= 0"),
             ("grad_clip", lambda v: v > 0, "> 0 (clipping by global norm)")]
    for name, ok, wanted in rules:
        if not ok(number(name)):
            raise ConfigError(f"train.{name} must be {wanted}, got {train[name]!r}; set "
                              f"--config.train.{name}=...")


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
    """AdamW on the warm-up/decay schedule, after global-norm gradient clipping; no weight
    decay on norms (`weight_decay_mask`)."""
    return optax.chain(
        optax.clip_by_global_norm(train.grad_clip),
        optax.adamw(learning_rate_schedule(train), b1=train.b1, b2=train.b2,
                    weight_decay=train.weight_decay, mask=weight_decay_mask))
