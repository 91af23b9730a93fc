"""Adapting a non-CLA checkpoint to CLA: both recipes against a numpy rearrangement, the
identity conversion, and uptraining that lowers the loss of the converted model."""
import json
import pathlib

import jax
import numpy as np
import pytest
from test_model import forward, make_config, make_params
from test_train import tiny_config

from cla_jax import adapt, checkpoint
from cla_jax.config import ConfigError, ModelConfig


def test_cla1_to_cla1_is_unchanged():
    config = make_config("cla1", "gqa")
    params = make_params(config)
    converted = adapt.convert_params(params, config, config, "keep")
    jax.tree_util.tree_map(np.testing.assert_array_equal, converted, jax.device_get(params))


@pytest.mark.parametrize("recipe", ["keep", "mean"])
def test_cla1_to_cla2_moves_weights_as_the_recipe_says(recipe):
    source = make_config("cla1", "mqa", num_layers=4)
    target = source.replace(kv_sharing=2)
    params = jax.device_get(make_params(source))
    new = adapt.convert_params(params, source, target, recipe)
    old = params["stage_0"]["layer_0"]  # CLA1: 4 groups of one layer, stacked
    for g in range(2):
        producer, other = (jax.tree_util.tree_map(lambda x: x[g], new["stage_0"][f"layer_{i}"])
                           for i in (0, 1))
        a, b = 2 * g, 2 * g + 1
        for name in ("key", "value"):
            want = old[name]["kernel"][a] if recipe == "keep" else \
                (old[name]["kernel"][a] + old[name]["kernel"][b]) / 2
            np.testing.assert_allclose(producer[name]["kernel"], want, rtol=1e-6)
        assert "key" not in other and "value" not in other and "kv_norm" not in other
        np.testing.assert_array_equal(producer["kv_norm"]["scale"],
                                      old["attn_norm"]["scale"][a])
        np.testing.assert_array_equal(producer["query"]["kernel"], old["query"]["kernel"][a])
        np.testing.assert_array_equal(other["query"]["kernel"], old["query"]["kernel"][b])
        np.testing.assert_array_equal(other["mlp"]["up"]["kernel"],
                                      old["mlp"]["up"]["kernel"][b])
    np.testing.assert_array_equal(new["embed"]["embedding"], params["embed"]["embedding"])
    tokens = np.arange(8)[None] % 61
    logits, _ = forward(target, new, tokens, np.arange(8)[None])  # it runs as a CLA2 model
    assert np.isfinite(np.asarray(logits)).all()


def test_only_the_grouping_may_change():
    source = make_config("cla1", "mqa", num_layers=4)
    with pytest.raises(ConfigError, match="d_model: 32 vs 64"):
        adapt.convert_params(make_params(source), source,
                             source.replace(kv_sharing=2, d_model=64), "keep")


def eval_loss(workdir):
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [r["mean_nll"] for r in map(json.loads, lines) if r["kind"] == "eval"]


def test_adapted_checkpoint_uptrains_with_train_py_loop(tmp_path, corpus_glob):
    from cla_jax import sharding
    from cla_jax.data.corpus import prepare_corpus
    from cla_jax.train.loop import train_and_evaluate, validation_metrics
    from cla_jax.train.step import make_eval_step

    cache = tmp_path / "cache"
    base = tiny_config(corpus_glob, steps=8, eval_every=100, checkpoint_every=8)
    base.model.update(num_layers=4, kv_sharing=1)
    train_and_evaluate(base, tmp_path / "mqa", cache)

    cla2 = tiny_config(corpus_glob, steps=6, eval_every=6, checkpoint_every=6, eval_batches=0)
    cla2.model.update(num_layers=4, kv_sharing=2)
    adapt.adapt_checkpoint(tmp_path / "mqa", None, cla2, tmp_path / "cla2", "mean")
    assert checkpoint.good_steps(tmp_path / "cla2" / "checkpoints") == [0]
    _, meta = checkpoint.read_meta(tmp_path / "cla2" / "checkpoints", 0)
    assert meta["adapted_from"]["recipe"] == "mean" and meta["adapted_from"]["step"] == 8

    # Loss of the converted model at step 0, on the whole validation split.
    model = ModelConfig.from_dict(cla2.model)
    mesh = sharding.make_mesh(cla2.mesh)
    corpus = prepare_corpus(cla2.data, cache)
    params = checkpoint.restore_params_onto(tmp_path / "cla2" / "checkpoints", 0, model, mesh)
    before = validation_metrics(make_eval_step(model, corpus.tokenizer.token_bytes(), mesh),
                                params, corpus, cla2.train, mesh, None)["mean_nll"]
    after = train_and_evaluate(cla2, tmp_path / "cla2", cache)["mean_nll"]  # resumes at 0
    assert after < before
