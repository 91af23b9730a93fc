"""Hugging Face Llama import: our logits equal PyTorch's on tiny random Llamas (fixtures made by
tests/fixtures/hf_llama/make_fixtures.py with transformers), the import runs end to end into
eval-ready and adaptable checkpoints, and unsupported models are refused in one line."""
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from cla_jax import adapt, checkpoint, hf_import, sharding
from cla_jax.config import ConfigError, ModelConfig
from cla_jax.data.tokenizer import NUM_SPECIAL_IDS, HFTokenizer
from cla_jax.model import Transformer, init_params

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf_llama"


def our_logits(workdir: pathlib.Path, tokens_hf: np.ndarray) -> np.ndarray:
    step, meta = checkpoint.read_meta(workdir / "checkpoints")
    model = ModelConfig.from_dict(meta["config"]["model"])
    params = checkpoint.restore_params_onto(workdir / "checkpoints", step, model,
                                            sharding.single_device_mesh())
    tokens = jnp.asarray(tokens_hf + NUM_SPECIAL_IDS, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    logits, _ = Transformer(model).apply({"params": params}, tokens, positions)
    return np.asarray(logits)


@pytest.mark.parametrize("name", ["mha", "gqa"])
def test_imported_logits_equal_pytorch(name, tmp_path):
    hf_dir = FIXTURES / name
    hf_import.import_checkpoint(hf_dir, tmp_path)
    tokens = np.load(hf_dir / "tokens.npy")
    want = np.load(hf_dir / "logits.npy")
    got = our_logits(tmp_path, tokens)
    assert got.shape[-1] == want.shape[-1] + NUM_SPECIAL_IDS
    np.testing.assert_allclose(got[..., NUM_SPECIAL_IDS:], want, rtol=1e-4, atol=1e-4)
    hf = json.loads((hf_dir / "config.json").read_text())
    for ours, key in ((1, "bos_token_id"), (2, "eos_token_id")):  # our bos/eos are HF's
        np.testing.assert_array_equal(got[..., ours], got[..., hf[key] + NUM_SPECIAL_IDS])
    # The written config.py rebuilds the run's config, and the tokenizer came along.
    step, meta = checkpoint.read_meta(tmp_path / "checkpoints")
    assert step == 0 and meta["imported_from"] == str(hf_dir.absolute())
    namespace = {}
    exec((tmp_path / "config.py").read_text(), namespace)
    assert namespace["get_config"]().to_dict() == meta["config"]
    assert meta["config"]["data"]["tokenizer"] == str(tmp_path / "tokenizer.json")


def test_the_tokenizer_json_encodes_as_the_fixture_did():
    tokenizer = HFTokenizer(FIXTURES / "mha" / "tokenizer.json")
    tokens = np.load(FIXTURES / "mha" / "tokens.npy")
    text = "Cross-layer attention shares each key and value projection between adjacent"
    ids = tokenizer.encode(text)
    np.testing.assert_array_equal(np.array(ids[:10]) - NUM_SPECIAL_IDS, tokens[0, 1:11])
    assert tokenizer.decode(ids) == text


def restored_params(workdir: pathlib.Path):
    step, meta = checkpoint.read_meta(workdir / "checkpoints")
    model = ModelConfig.from_dict(meta["config"]["model"])
    return jax.device_get(checkpoint.restore_params_onto(
        workdir / "checkpoints", step, model, sharding.single_device_mesh()))


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two sets of logits, each centred per position."""
    a, b = (x - x.mean(-1, keepdims=True) for x in (np.float64(a), np.float64(b)))
    return float(np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b)))


def test_imported_gqa_adapts_to_cla1_exactly_and_to_cla2_by_the_recipe(tmp_path):
    hf_import.import_checkpoint(FIXTURES / "gqa", tmp_path / "llama")
    namespace = {}
    exec((tmp_path / "llama" / "config.py").read_text(), namespace)
    tokens = np.load(FIXTURES / "gqa" / "tokens.npy")
    want = np.load(FIXTURES / "gqa" / "logits.npy")
    llama = our_logits(tmp_path / "llama", tokens)

    # Same grouping: the adapted checkpoint is the imported model, so PyTorch's logits.
    adapt.adapt_checkpoint(tmp_path / "llama", None, namespace["get_config"](),
                           tmp_path / "same", "keep")
    same = our_logits(tmp_path / "same", tokens)
    np.testing.assert_array_equal(same, llama)
    np.testing.assert_allclose(same[..., NUM_SPECIAL_IDS:], want, rtol=1e-4, atol=1e-4)

    config = namespace["get_config"]()
    config.model.kv_sharing = 2
    adapt.adapt_checkpoint(tmp_path / "llama", None, config, tmp_path / "cla2", "mean")
    # Through the checkpoints: layer 1 lost its K/V, layer 0 attends with the mean of both
    # layers' K/V projections, normed as layer 0's were; every other weight is the import's.
    old, new = restored_params(tmp_path / "llama"), restored_params(tmp_path / "cla2")
    src = old["stage_0"]["layer_0"]  # 2 groups of 1 layer, stacked
    producer, other = new["stage_0"]["layer_0"], new["stage_0"]["layer_1"]
    for name in ("key", "value"):
        np.testing.assert_allclose(producer[name]["kernel"][0], src[name]["kernel"].mean(0),
                                   rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(producer["kv_norm"]["scale"][0], src["attn_norm"]["scale"][0])
    assert set(other) == set(src) - {"key", "value"}
    for i, layer in enumerate((producer, other)):
        for name in set(layer) - {"key", "value", "kv_norm"}:
            jax.tree_util.tree_map(lambda a, b, i=i: np.testing.assert_array_equal(a[0], b[i]),
                                   layer[name], src[name])
    assert set(new) == set(old)
    for name in set(old) - {"stage_0"}:
        jax.tree_util.tree_map(np.testing.assert_array_equal, new[name], old[name])

    # A CLA2 model is another model: not PyTorch's logits, but still correlated with them,
    # unlike a fresh model's (measured: 0.21 and 0.01; the fixture is random, not trained).
    cla2 = our_logits(tmp_path / "cla2", tokens)[..., NUM_SPECIAL_IDS:]
    assert not np.allclose(cla2, want, atol=0.1)
    model = ModelConfig.from_dict(config.model)
    fresh_params = nn.meta.unbox(init_params(model, jax.random.key(0)))
    ids = jnp.asarray(tokens + NUM_SPECIAL_IDS, jnp.int32)
    fresh, _ = Transformer(model).apply({"params": fresh_params}, ids,
                                        jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape))
    assert correlation(cla2, want) > 0.15 > 0.05 > abs(
        correlation(np.asarray(fresh)[..., NUM_SPECIAL_IDS:], want))


def write_hf_dir(tmp_path, **changes) -> pathlib.Path:
    hf_dir = tmp_path / "hf"
    shutil.copytree(FIXTURES / "mha", hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(changes)
    (hf_dir / "config.json").write_text(json.dumps(config))
    return hf_dir


@pytest.mark.parametrize("changes, message", [
    (dict(model_type="gpt2"), "model_type 'gpt2'"),
    (dict(attention_bias=True), "biases"),
    (dict(rope_parameters=dict(rope_type="llama3", rope_theta=5e5)), "RoPE scaling 'llama3'"),
    (dict(num_hidden_layers=3), "no tensor 'layers.2.input_layernorm.weight'"),
    (dict(num_hidden_layers=1), "does not map: ['layers.1."),
])
def test_unsupported_or_inconsistent_models_are_refused(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        hf_import.import_checkpoint(write_hf_dir(tmp_path, **changes), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_missing_directory_or_weights_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="has no config.json"):
        hf_import.import_checkpoint(tmp_path / "nowhere", tmp_path / "run")
    hf_dir = write_hf_dir(tmp_path)
    (hf_dir / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="no \\*.safetensors"):
        hf_import.import_checkpoint(hf_dir, tmp_path / "run")


def test_bfloat16_safetensors_are_read(tmp_path):
    import ml_dtypes
    values = np.arange(6, dtype=np.float32).reshape(2, 3) / 4
    raw = values.astype(ml_dtypes.bfloat16).tobytes()
    header = json.dumps({"w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, len(raw)]}})
    path = tmp_path / "x.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header.encode() + raw)
    np.testing.assert_array_equal(np.asarray(hf_import.read_safetensors(path)["w"], np.float32),
                                  values)
