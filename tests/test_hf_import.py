"""Hugging Face Llama import and export: our per-token log-probabilities equal transformers' on
tiny random Llamas (fixtures made by tests/fixtures/hf_llama/make_fixtures.py with
transformers), in the model's own ids; a Llama 3.2-style model (llama3 RoPE scaling, tied
embeddings, three eos ids) generates until each of its eos ids; import -> export gives back
the original tensors and a directory transformers loads; unsupported models are refused in one
line."""
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from cla_jax import adapt, checkpoint, hf_export, hf_import, sharding
from cla_jax.config import ConfigError, ModelConfig
from cla_jax.data.tokenizer import HFModelTokenizer, HFTokenizer, load_tokenizer
from cla_jax.decoding import Sampling, generate
from cla_jax.model import Transformer, init_params
from cla_jax.model.layers import rope_frequencies

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf_llama"
TEXT = "Cross-layer attention shares each key and value projection between adjacent"
# transformers' LlamaRotaryEmbedding.inv_freq for llama32 (printed by make_fixtures.py).
LLAMA32_INV_FREQ = [1.0, 6.7133039e-02, 1.1751885e-03, 2.2789578e-04, 4.4194170e-05,
                    8.5702559e-06, 1.6619674e-06, 3.2229329e-07]


def restored(workdir: pathlib.Path):
    run = checkpoint.restore_model(workdir / "checkpoints", None, sharding.single_device_mesh())
    return run.model, jax.device_get(run.params)


def logits_of(model: ModelConfig, params, tokens: np.ndarray) -> np.ndarray:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    logits, _ = Transformer(model).apply({"params": params}, jnp.asarray(tokens, jnp.int32),
                                         positions)
    return np.asarray(logits)


def our_logits(workdir: pathlib.Path, tokens: np.ndarray) -> np.ndarray:
    return logits_of(*restored(workdir), tokens)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    return np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """name -> (workdir, model, params) of that fixture imported, once per module."""
    runs = {}

    def get(name: str):
        if name not in runs:
            workdir = tmp_path_factory.mktemp(name)
            hf_import.import_checkpoint(FIXTURES / name, workdir)
            runs[name] = (workdir, *restored(workdir))
        return runs[name]
    return get


@pytest.fixture
def llama32(imported):
    return imported("llama32")


@pytest.mark.parametrize("name", ["mha", "gqa"])
def test_imported_log_probs_equal_transformers(name, imported):
    hf_dir = FIXTURES / name
    workdir, model, params = imported(name)
    tokens = np.load(hf_dir / "tokens.npy")
    want = np.load(hf_dir / "logits.npy")
    got = logits_of(model, params, tokens)
    assert got.shape == want.shape  # the model's own vocabulary: no added or duplicated rows
    np.testing.assert_allclose(log_softmax(got), log_softmax(want), rtol=0, atol=1e-5)
    # The written config.py rebuilds the run's config, and the tokenizer came along.
    step, meta = checkpoint.read_meta(workdir / "checkpoints")
    assert step == 0 and meta["imported_from"] == str(hf_dir.absolute())
    namespace = {}
    exec((workdir / "config.py").read_text(), namespace)
    assert namespace["get_config"]().to_dict() == meta["config"]
    assert meta["config"]["data"]["tokenizer"] == str(workdir / "tokenizer")
    tokenizer = load_tokenizer(meta["config"]["data"]["tokenizer"])
    assert (tokenizer.bos_id, tokenizer.stop_ids) == (0, (1, 0))  # config.json's bos and eos


def test_imported_llama32_log_probs_equal_transformers(llama32):
    """Llama 3.2's shape: llama3 RoPE scaling, tied embeddings, specials at the vocab's end."""
    tokens = np.load(FIXTURES / "llama32" / "tokens.npy")
    want = np.load(FIXTURES / "llama32" / "logprobs.npy")
    _, model, params = llama32
    got = log_softmax(logits_of(model, params, tokens))
    assert got.shape == want.shape == (2, 21, 304)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert (model.rope_scaling, model.rope_scaling_factor, model.rope_original_max_len,
            model.tie_embeddings) == ("llama3", 32.0, 64, True)
    assert "unembed" not in params
    hf = hf_import.read_weights(FIXTURES / "llama32")
    np.testing.assert_array_equal(params["embed"]["embedding"], hf["model.embed_tokens.weight"])


def test_llama3_rope_frequencies_are_transformers():
    model = ModelConfig(vocab_size=8, d_model=32, num_layers=1, num_heads=2, num_kv_heads=1,
                        head_dim=16, mlp_dim=8, rope_base=500000.0, rope_scaling="llama3",
                        rope_scaling_factor=32.0, rope_original_max_len=64)
    plain = rope_frequencies(500000.0, 16)
    np.testing.assert_allclose(rope_frequencies(model, 16), LLAMA32_INV_FREQ, rtol=2e-6)
    # The three bands: kept (wave of 6.3 < 64 / 4), blended, divided by the factor.
    assert rope_frequencies(model, 16)[0] == plain[0]
    assert plain[1] / 32 < rope_frequencies(model, 16)[1] < plain[1]
    np.testing.assert_array_equal(rope_frequencies(model, 16)[2:], plain[2:] / 32)
    linear = model.replace(rope_scaling="linear", rope_low_freq_factor=1.0,
                           rope_high_freq_factor=4.0, rope_original_max_len=8192)
    np.testing.assert_array_equal(rope_frequencies(linear, 16), plain / 32)
    default = ModelConfig(**{**linear.to_dict(), "rope_scaling": "default",
                             "rope_scaling_factor": 1.0, "group_sizes": None})
    np.testing.assert_array_equal(rope_frequencies(default, 16), plain)  # bit for bit
    np.testing.assert_array_equal(plain, 500000.0 ** (-jnp.arange(8, dtype=jnp.float32) / 8))


def small(**changes) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=8, d_model=8, num_layers=2, num_heads=2,
                                 num_kv_heads=1, head_dim=4, mlp_dim=8), **changes})


@pytest.mark.parametrize("changes, message", [
    (dict(rope_scaling="yarn"), "model.rope_scaling must be one of ('default', 'linear', "),
    (dict(rope_scaling_factor=8.0), "rope_scaling_factor is 8.0, but it only applies to "
     "model.rope_scaling linear or llama3"),
    (dict(rope_scaling="linear", rope_original_max_len=64), "only applies to model."
     "rope_scaling llama3 (it is 'linear')"),
    (dict(rope_scaling="linear", rope_scaling_factor=0.5), "must be >= 1"),
    (dict(rope_scaling="llama3", rope_scaling_factor=8.0, rope_high_freq_factor=1.0),
     "0 < low < high"),
    (dict(rope_scaling="llama3", rope_scaling_factor=8.0, rope_original_max_len=0),
     "rope_original_max_len"),
])
def test_bad_rope_scaling_is_one_clear_line(changes, message):
    with pytest.raises(ConfigError) as error:
        small(**changes)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_model_tokenizer_keeps_the_models_ids(llama32):
    tokenizer = load_tokenizer(str(llama32[0] / "tokenizer"))
    assert isinstance(tokenizer, HFModelTokenizer) and tokenizer.vocab_size == 304
    # bos from config.json; eos from config.json and generation_config.json; no pad: eos pads.
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (300, 301, 301)
    assert tokenizer.stop_ids == (301, 302, 303, 300)
    ids = tokenizer.encode(TEXT)
    np.testing.assert_array_equal(ids[:10], np.load(FIXTURES / "llama32" / "tokens.npy")[0, 1:11])
    assert tokenizer.decode([300, *ids, 302]) == TEXT
    counts = tokenizer.token_bytes()
    assert counts.shape == (304,) and counts[300:].sum() == 0
    assert counts[ids].sum() == len(TEXT.encode())
    shifted = HFTokenizer(llama32[0] / "tokenizer" / "tokenizer.json")  # a bare .json: shifted
    assert shifted.encode(TEXT) == [i + 3 for i in ids] and shifted.identity != tokenizer.identity


def write_model_dir(tmp_path, config=None, generation=None, tokenizer_config=None):
    directory = tmp_path / "tok"
    directory.mkdir()
    shutil.copy(FIXTURES / "llama32" / "tokenizer.json", directory)
    for name, content in (("config.json", config), ("generation_config.json", generation),
                          ("tokenizer_config.json", tokenizer_config)):
        if content is not None:
            (directory / name).write_text(json.dumps(content))
    return directory


@pytest.mark.parametrize("files, ids", [
    # (config, generation_config, tokenizer_config) -> (bos, eos, pad, stop_ids)
    ((dict(bos_token_id=300, eos_token_id=[302, 303], pad_token_id=5), None, None),
     (300, 302, 5, (302, 303, 300))),
    ((None, dict(bos_token_id=300, eos_token_id=303), None), (300, 303, 303, (303, 300))),
    ((None, None, dict(bos_token="<|begin_of_text|>", eos_token={"content": "<|eot_id|>"})),
     (300, 303, 303, (303, 300))),
    ((dict(eos_token_id=301), None, None), (301, 301, 301, (301,))),  # eos separates docs
])
def test_special_ids_come_from_the_model_files(tmp_path, files, ids):
    tokenizer = load_tokenizer(str(write_model_dir(tmp_path, *files)))
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.stop_ids) == ids


def test_a_model_tokenizer_without_eos_or_with_bad_ids_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no eos id in config.json"):
        load_tokenizer(str(write_model_dir(tmp_path, dict(bos_token_id=300))))
    shutil.rmtree(tmp_path / "tok")
    with pytest.raises(ValueError, match=r"special ids \[304\] are outside"):
        load_tokenizer(str(write_model_dir(tmp_path, dict(eos_token_id=304))))
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        load_tokenizer(str(tmp_path))


def test_generation_stops_at_each_eos_id(llama32):
    """Three prompts whose greedy continuations (transformers') end at the three eos ids: each
    row stops there, so a decoder honouring only the first eos runs on in the other two."""
    workdir, model, params = llama32
    tokenizer = load_tokenizer(str(workdir / "tokenizer"))
    cases = json.loads((FIXTURES / "llama32" / "greedy.json").read_text())
    assert [c["continuation"][-1] for c in cases] == [301, 302, 303]
    out, _ = generate(model, params, [c["prompt"] for c in cases], 10, Sampling(temperature=0),
                      eos_id=tokenizer.stop_ids)
    for row, case in zip(np.asarray(out).tolist(), cases):
        stop = len(case["continuation"])
        assert row[:stop] == case["continuation"] and row[stop:] == [0] * (10 - stop)


def test_import_then_export_gives_back_the_transformers_directory(llama32, tmp_path):
    workdir, model, params = llama32
    out = hf_export.export_checkpoint(workdir, tmp_path / "hf")
    original, exported = FIXTURES / "llama32", pathlib.Path(out)
    # The exact tensors (tied: no lm_head), and the files this exporter wrote when
    # make_fixtures.py loaded its export with transformers.
    want, got = hf_import.read_weights(original), hf_import.read_weights(exported)
    assert sorted(got) == sorted(want) and "lm_head.weight" not in got
    for name in want:
        assert got[name].dtype == want[name].dtype
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    for name in ("config.json", "generation_config.json"):
        assert json.loads((exported / name).read_text()) == json.loads(
            (original / "export" / name).read_text()), name
    assert (exported / "tokenizer.json").read_bytes() == (original / "tokenizer.json").read_bytes()
    # The same model by hf_import's reading, and transformers' log-probs of that export.
    hf_config = json.loads((original / "config.json").read_text())
    assert hf_import.model_config_from_hf(json.loads((exported / "config.json").read_text())) \
        == hf_import.model_config_from_hf(hf_config)
    tokens = np.load(original / "tokens.npy")
    np.testing.assert_allclose(log_softmax(logits_of(model, params, tokens)),
                               np.load(original / "export" / "logprobs.npy"), rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="is not an empty directory"):
        hf_export.export_checkpoint(workdir, out)
    with pytest.raises(checkpoint.CheckpointError, match="--workdir: no usable checkpoint"):
        hf_export.export_checkpoint(tmp_path / "nowhere", tmp_path / "hf2")


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two sets of logits, each centred per position."""
    a, b = (x - x.mean(-1, keepdims=True) for x in (np.float64(a), np.float64(b)))
    return float(np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b)))


def test_imported_gqa_adapts_to_cla1_exactly_and_to_cla2_by_the_recipe(imported, tmp_path):
    workdir, model, old = imported("gqa")
    namespace = {}
    exec((workdir / "config.py").read_text(), namespace)
    tokens = np.load(FIXTURES / "gqa" / "tokens.npy")
    want = np.load(FIXTURES / "gqa" / "logits.npy")
    llama = logits_of(model, old, tokens)

    # Same grouping: the adapted checkpoint is the imported model, so PyTorch's logits.
    adapt.adapt_checkpoint(workdir, None, namespace["get_config"](), tmp_path / "same", "keep")
    same = our_logits(tmp_path / "same", tokens)
    np.testing.assert_array_equal(same, llama)
    np.testing.assert_allclose(same, want, rtol=1e-4, atol=1e-4)

    config = namespace["get_config"]()
    config.model.kv_sharing = 2
    adapt.adapt_checkpoint(workdir, None, config, tmp_path / "cla2", "mean")
    # Through the checkpoints: layer 1 lost its K/V, layer 0 attends with the mean of both
    # layers' K/V projections, normed as layer 0's were; every other weight is the import's.
    cla2_model, new = restored(tmp_path / "cla2")
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
    cla2 = logits_of(cla2_model, new, tokens)
    assert not np.allclose(cla2, want, atol=0.1)
    fresh = logits_of(cla2_model, nn.meta.unbox(init_params(cla2_model, jax.random.key(0))),
                      tokens)
    assert correlation(cla2, want) > 0.15 > 0.05 > abs(correlation(fresh, want))
    # ... and one transformers' Llama cannot express.
    with pytest.raises(ConfigError, match="shares K/V across layers .* only CLA1 models"):
        hf_export.export_checkpoint(tmp_path / "cla2", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


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
    (dict(rope_parameters=dict(rope_type="yarn", rope_theta=5e5, factor=4.0)),
     "RoPE scaling 'yarn' is not supported (default, linear and llama3 are)"),
    # transformers 4's form: rope_theta and rope_scaling.
    (dict(rope_parameters=None, rope_theta=1e4, rope_scaling=dict(type="dynamic", factor=2.0)),
     "RoPE scaling 'dynamic'"),
    (dict(rope_parameters=None, rope_scaling=dict(rope_type="llama3", factor=8.0)),
     "without its 'low_freq_factor'"),
    (dict(num_hidden_layers=3), "no tensor 'layers.2.input_layernorm.weight'"),
    (dict(num_hidden_layers=1), "does not map: ['layers.1."),
    (dict(vocab_size=300), "tokenizer.json has 320 ids but the model only 300"),
])
def test_unsupported_or_inconsistent_models_are_refused(tmp_path, changes, message):
    with pytest.raises(ConfigError) as error:
        hf_import.import_checkpoint(write_hf_dir(tmp_path, **changes), tmp_path / "run")
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_linear_rope_scaling_is_imported():
    hf = json.loads((FIXTURES / "mha" / "config.json").read_text())
    hf.update(rope_parameters=None, rope_theta=5e5, rope_scaling={"type": "linear", "factor": 4})
    fields = hf_import.model_config_from_hf(hf)
    assert (fields["rope_scaling"], fields["rope_scaling_factor"], fields["rope_base"]) == (
        "linear", 4.0, 5e5)
    ModelConfig.from_dict(fields)  # valid


def test_bfloat16_safetensors_are_read(tmp_path):
    import ml_dtypes
    values = np.arange(6, dtype=np.float32).reshape(2, 3) / 4
    raw = values.astype(ml_dtypes.bfloat16).tobytes()
    header = json.dumps({"w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, len(raw)]}})
    path = tmp_path / "x.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header.encode() + raw)
    np.testing.assert_array_equal(np.asarray(hf_import.read_safetensors(path)["w"], np.float32),
                                  values)


def test_a_missing_directory_or_weights_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="has no config.json"):
        hf_import.import_checkpoint(tmp_path / "nowhere", tmp_path / "run")
    hf_dir = write_hf_dir(tmp_path)
    (hf_dir / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="no \\*.safetensors"):
        hf_import.import_checkpoint(hf_dir, tmp_path / "run")


def test_safetensors_written_here_read_back_in_every_dtype(tmp_path):
    import ml_dtypes
    values = np.arange(6, dtype=np.float32).reshape(2, 3) / 4
    for dtype in hf_export.EXPORT_DTYPES:
        path = tmp_path / f"{dtype}.safetensors"
        hf_export.write_safetensors(path, {"w": values, "b": values[0]}, dtype)
        header_size = int.from_bytes(path.read_bytes()[:8], "little")
        assert header_size % 8 == 0
        read = hf_import.read_safetensors(path)
        want_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
        assert read["w"].dtype == want_dtype
        np.testing.assert_array_equal(np.asarray(read["w"], np.float32), values)
        np.testing.assert_array_equal(np.asarray(read["b"], np.float32), values[0])


def test_an_imported_run_set_to_a_files_source_names_its_corpus_after_it(imported, tmp_path):
    """The imported config once kept the demo's data.name, so a files: corpus was stored
    as shakespeare-<key>; an unset name now follows the source."""
    from cla_jax.data.corpus import prepare_corpus
    workdir, model, _ = imported("mha")
    namespace = {}
    exec((workdir / "config.py").read_text(), namespace)
    config = namespace["get_config"]()
    (tmp_path / "my_texts").mkdir()
    (tmp_path / "my_texts" / "a.txt").write_text("To be, or not to be.\n" * 50)
    (tmp_path / "my_texts" / "b.txt").write_text("All the world's a stage.\n" * 50)
    config.data.source = f"files:{tmp_path}/my_texts/*.txt"  # as --config.data.source=... does
    corpus = prepare_corpus(config.data, tmp_path / "cache", max_vocab_size=model.vocab_size)
    assert corpus.store.directory.name.startswith("my_texts-"), corpus.store.directory
