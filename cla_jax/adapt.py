"""Adapt a trained checkpoint to another KV map (the paper's uptraining experiment).

    python -m cla_jax.adapt --from_workdir=runs/mqa --config=configs/my_cla2.py \
        --workdir=runs/mqa_to_cla2 --recipe=keep
    python train.py --config=configs/my_cla2.py --workdir=runs/mqa_to_cla2   # uptrain

Every weight but K/V is copied layer by layer. Each new producer gets K/V weights by one of
the two recipes seen in the field:
  keep   the K/V the producer layer attended with (its own, or its old producer's)
  mean   the mean of those of every layer that will use its K/V
and, when other layers use its K/V, a K/V norm initialised from the norm that fed those K/V
before. Layer types (global, local) may change too: they change masks, not weights. The
result is a step-0 checkpoint with a fresh optimizer state in a new workdir, which train.py
then trains as a new run.
"""
from __future__ import annotations

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import linen as nn

from cla_jax import checkpoint, sharding
from cla_jax.config import ConfigError, ModelConfig
from cla_jax.storage import as_path
from cla_jax.train.optimizer import make_optimizer
from cla_jax.train.state import init_state

RECIPES = ("keep", "mean")
KV = ("key", "value")


def layer_params(params, config: ModelConfig) -> list[dict]:
    """The per-layer param dicts of a scanned model, in depth order (stage, step, layer)."""
    layers = []
    for s, stage in enumerate(config.plan):
        tree = params[f"stage_{s}"]
        for g in range(stage.steps):
            layers += [jax.tree_util.tree_map(lambda x, g=g: np.asarray(x[g]), tree[f"layer_{i}"])
                       for i in range(len(stage.layers))]
    return layers


def stack_layers(layers: list[dict], config: ModelConfig) -> dict:
    """The inverse of `layer_params`: stages of stacked steps."""
    stages = {}
    for s, stage in enumerate(config.plan):
        size = len(stage.layers)
        steps = [layers[stage.first + g * size:stage.first + (g + 1) * size]
                 for g in range(stage.steps)]
        stages[f"stage_{s}"] = {
            f"layer_{i}": jax.tree_util.tree_map(lambda *xs: np.stack(xs),
                                                 *[step[i] for step in steps])
            for i in range(size)}
    return stages


def _effective_kv(layers: list[dict], config: ModelConfig) -> list[dict]:
    """For every layer, the K/V weights and the norm feeding them that it attends with."""
    kv = []
    for source in config.kv_source_of:
        producer = layers[source]
        norm = producer["kv_norm"] if "kv_norm" in producer else producer["attn_norm"]
        kv.append({"key": producer["key"], "value": producer["value"], "norm": norm})
    return kv


# What adapting may change: the KV map (which layers produce K/V, which reuse whose, and
# each layer's attention type): every weight keeps its shape.
MAP_FIELDS = ("kv_sharing", "group_sizes", "kv_sources", "layer_types", "local_window")


def check_adaptable(source: ModelConfig, target: ModelConfig) -> None:
    """Raises ConfigError unless `target` differs from `source` only in the KV map
    (`MAP_FIELDS`): the one change adapting to CLA (or to local layers) makes."""
    diffs = [f"{k}: {v!r} vs {target.to_dict()[k]!r}" for k, v in source.to_dict().items()
             if k not in MAP_FIELDS and target.to_dict()[k] != v]
    if diffs:
        raise ConfigError(f"only the KV map ({', '.join(MAP_FIELDS)}) may change when "
                          f"adapting a checkpoint; these differ: {'; '.join(diffs)}")


def convert_params(params, source: ModelConfig, target: ModelConfig, recipe: str = "keep"):
    """`params` of model `source` rearranged for `target` (same model but the KV map)."""
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; use one of {RECIPES}")
    check_adaptable(source, target)
    old = layer_params(params, source)
    old_kv = _effective_kv(old, source)
    sources = target.kv_source_of
    new = []
    for layer, producer in enumerate(sources):
        weights = {k: v for k, v in old[layer].items() if k not in KV + ("kv_norm",)}
        if producer == layer:
            members = [m for m, s in enumerate(sources) if s == layer]
            for name in KV:
                if recipe == "keep":
                    weights[name] = old_kv[layer][name]
                else:
                    weights[name] = jax.tree_util.tree_map(
                        lambda *xs: np.mean(xs, axis=0).astype(xs[0].dtype),
                        *[old_kv[m][name] for m in members])
            if len(members) > 1:
                weights["kv_norm"] = jax.tree_util.tree_map(np.copy, old_kv[layer]["norm"])
        new.append(weights)
    top = {k: v for k, v in params.items() if not k.startswith("stage_")}
    return {**jax.device_get(top), **stack_layers(new, target)}


def adapt_checkpoint(from_workdir, step: int | None, config: ml_collections.ConfigDict,
                     workdir, recipe: str = "keep") -> epath.Path:
    """Writes step 0 of a new run in `workdir`: `config`'s model with params converted from
    the checkpoint in `from_workdir`, and a fresh optimizer state. Returns its directory."""
    source_dir = checkpoint.checkpoints_of(from_workdir)
    target_dir = as_path(workdir) / "checkpoints"
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; use one of {RECIPES}")
    try:
        run = checkpoint.restore_model(source_dir, step, sharding.single_device_mesh())
    except checkpoint.CheckpointError as error:
        raise checkpoint.CheckpointError(f"--from_workdir: {error}") from error
    target = ModelConfig.from_dict(config.model)
    check_adaptable(run.model, target)
    return write_first_step(target_dir, config,
                            convert_params(run.params, run.model, target, recipe),
                            {"adapted_from": {"workdir": str(source_dir.parent),
                                              "step": run.step, "recipe": recipe}})


def _layout(tree) -> dict:
    return {jax.tree_util.keystr(path): (tuple(x.shape), np.dtype(x.dtype).name)
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def write_first_step(target_dir: epath.Path, config: ml_collections.ConfigDict, params,
                     provenance: dict) -> epath.Path:
    """Saves `params` (unboxed numpy tree) as step 0 of a new run of `config`, with a fresh
    optimizer state and no data position; refuses a directory that already holds a run."""
    if checkpoint.good_steps(target_dir):
        raise checkpoint.CheckpointError(f"{target_dir} already holds checkpoints; give a new "
                                         "--workdir")
    model = ModelConfig.from_dict(config.model)
    mesh = sharding.single_device_mesh()
    optimizer = make_optimizer(config.train)
    state = init_state(model, optimizer, config.train.seed, mesh)
    shardings = jax.tree_util.tree_map(lambda x: x.sharding, state.params)
    params = nn.meta.unbox(params)
    if _layout(params) != _layout(state.params):
        raise ConfigError(f"the converted params do not fit {model}; this is a bug in the "
                          f"conversion, please report it with: {_layout(params)}")
    params = jax.device_put(params, shardings)
    state = state.replace(params=params, opt_state=optimizer.init(params))
    saver = checkpoint.Checkpointer(target_dir, keep=config.train.keep_checkpoints)
    saver.save(0, state, {"data": None, "config": config.to_dict(), **provenance})
    saver.wait()
    saver.close()
    return target_dir


def main(argv):
    """cla-adapt's work once its flags are parsed: adapts the checkpoint and prints the next
    command."""
    from absl import flags, logging  # noqa: PLC0415
    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    target = adapt_checkpoint(f.from_workdir, f.step, f.config, f.workdir, f.recipe)
    print(f"wrote step 0 of the adapted model ({f.recipe} recipe) to {target}; train it with: "
          f"python train.py --config=<the same config> --workdir={f.workdir}")


def run():
    """The command line (cla-adapt); its flags are defined here, so importing the module
    defines none."""
    from absl import flags
    from ml_collections import config_flags

    from cla_jax import cli

    flags.DEFINE_string("from_workdir", None, "The run whose checkpoint to adapt.")
    flags.DEFINE_integer("step", None, "Its step (default: the latest usable one).")
    flags.DEFINE_enum("recipe", "keep", list(RECIPES), "keep: the producer's K/V; mean: the "
                      "mean over each group.")
    config_flags.DEFINE_config_file("config", None, "The target config (the CLA twin).")
    flags.mark_flags_as_required(["from_workdir", "config", "workdir"])
    cli.start(main)


if __name__ == "__main__":
    run()
