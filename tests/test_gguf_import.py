"""GGUF import (cla_jax.gguf_import): tiny GGUF files are written here with gguf.GGUFWriter
from the committed Hugging Face fixtures, laid out as llama.cpp's convert_hf_to_gguf.py writes
them (its tensor names, its q/k row permutation, gpt2 tokenizer metadata). An F32 file gives
PyTorch's logits; a quantised file gives the logits of the fixture whose weights went through
the same quantisation, dequantised by the plain numpy readers of the GGML block layouts below
and imported by hf_import; the tokenizer built from the metadata gives tokenizer.json's ids;
bad files are refused in one line."""
import json
import pathlib

import gguf
import jax
import ml_dtypes
import numpy as np
import pytest
import tokenizers

from cla_jax import checkpoint, gguf_import, hf_export, hf_import
from cla_jax.config import ConfigError, ModelConfig
from cla_jax.data.tokenizer import HFModelTokenizer, load_tokenizer
from test_hf_import import logits_of, restored  # noqa: E402, I001 (tests/ is on sys.path)

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf_llama"
Q = gguf.GGMLQuantizationType
TEXT = """Cross-layer attention shares each key and value projection between adjacent layers,
so that the cache a model keeps while it generates text is half or a third of the size.
Now is the winter of our discontent made glorious summer by this sun of York; 1984 and 2026!"""
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
LAYER_NAMES = {  # transformers' -> llama.cpp's, as convert_hf_to_gguf.py maps them
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


# llama.cpp's side, written out here independently of the code under test.

def llama_cpp_permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: each head's two RoPE halves interleaved."""
    return (rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:])
            .swapaxes(1, 2).reshape(rows.shape))


def gguf_name(hf_name: str) -> str:
    parts = hf_name.removeprefix("model.").removesuffix(".weight").split(".", 2)
    if parts[0] == "layers":
        return f"blk.{parts[1]}.{LAYER_NAMES[parts[2]]}.weight"
    return {"embed_tokens": "token_embd", "norm": "output_norm",
            "lm_head": "output"}[parts[0]] + ".weight"


def f16(raw: np.ndarray) -> np.ndarray:
    return raw.copy().view(np.float16).astype(np.float32)


def reference_dequantize(raw: np.ndarray, qtype, shape) -> np.ndarray:
    """The GGML block layouts (ggml-common.h), 32 values a block: Q8_0 = f16 scale d, 32 int8
    q, x = d q; Q4_0 = d, 16 bytes whose low nibbles are values 0-15 and high nibbles 16-31,
    x = d (q - 8); Q4_1 = d, f16 minimum m, the same nibbles, x = d q + m."""
    if qtype == Q.F32:
        return raw.astype(np.float32)
    if qtype == Q.F16:
        return raw.astype(np.float32)
    if qtype == Q.BF16:
        return (raw.copy().view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    blocks = raw.reshape(-1, {Q.Q8_0: 34, Q.Q4_0: 18, Q.Q4_1: 20}[qtype])
    d = f16(blocks[:, 0:2])
    if qtype == Q.Q8_0:
        values = d * blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    else:
        packed = blocks[:, -16:]
        q = np.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(np.float32)
        values = d * (q - 8) if qtype == Q.Q4_0 else d * q + f16(blocks[:, 2:4])
    return values.reshape(shape)


def stored(weight: np.ndarray, qtype) -> np.ndarray:
    """`weight` as a GGUF file stores it in `qtype`: gguf's quantisers."""
    if qtype == Q.F32:
        return weight.astype(np.float32)
    if qtype == Q.F16:
        return weight.astype(np.float16)
    if qtype == Q.BF16:
        return weight.astype(ml_dtypes.bfloat16).view(np.uint8).reshape(weight.shape[0], -1)
    return gguf.quants.quantize(weight, qtype)


def write_gguf(path: pathlib.Path, name: str, qtype=Q.F32, *, arch: str = "llama",
               metadata: dict | None = None, drop: tuple = (), raw: dict | None = None):
    """The fixture `name` as convert_hf_to_gguf.py writes it, every matrix stored as `qtype`;
    `metadata` adds or replaces keys (None removes one), `drop` leaves tensors out and `raw`
    adds tensors as (bytes, shape, type). Returns the weights the file holds, dequantised by
    the reference above, under transformers' names and in its row order."""
    hf = json.loads((FIXTURES / name / "config.json").read_text())
    spec = json.loads((FIXTURES / name / "tokenizer.json").read_text())
    tokens = sorted(spec["model"]["vocab"], key=spec["model"]["vocab"].get)
    specials = {t["id"] for t in spec["added_tokens"] if t["special"]}
    heads, kv_heads = hf["num_attention_heads"], hf["num_key_value_heads"]
    keys = {
        "general.architecture": arch,
        "llama.context_length": hf["max_position_embeddings"],
        "llama.embedding_length": hf["hidden_size"],
        "llama.block_count": hf["num_hidden_layers"],
        "llama.feed_forward_length": hf["intermediate_size"],
        "llama.attention.head_count": heads, "llama.attention.head_count_kv": kv_heads,
        "llama.rope.freq_base": hf["rope_parameters"]["rope_theta"],
        "llama.attention.layer_norm_rms_epsilon": hf["rms_norm_eps"],
        "llama.rope.dimension_count": hf["head_dim"],
        "llama.attention.key_length": hf["head_dim"],
        "llama.attention.value_length": hf["head_dim"],
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if i in specials else 1 for i in range(len(tokens))],
        "tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m)
                                  for m in spec["model"]["merges"]],
        "tokenizer.ggml.bos_token_id": hf["bos_token_id"],
        "tokenizer.ggml.eos_token_id": hf["eos_token_id"],
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.chat_template": CHAT_TEMPLATE,
        **(metadata or {})}
    writer = gguf.GGUFWriter(path, arch)
    writer.kv_data[0].clear()  # the architecture key is written below, with the rest
    for key, value in keys.items():
        if value is None:
            continue
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    weights = {}
    for hf_name, weight in hf_import.read_weights(FIXTURES / name).items():
        weight = np.asarray(weight, np.float32)
        if gguf_name(hf_name) in drop:
            continue
        kind = Q.F32 if weight.ndim == 1 else qtype
        # Blocks run along a row and the permutation moves whole rows: quantising the
        # permuted rows stores the permuted quantised rows.
        weights[hf_name] = reference_dequantize(stored(weight, kind), kind, weight.shape)
        if hf_name.endswith("q_proj.weight"):
            weight = llama_cpp_permute(weight, heads)
        elif hf_name.endswith("k_proj.weight"):
            weight = llama_cpp_permute(weight, kv_heads)
        writer.add_tensor(gguf_name(hf_name), stored(weight, kind),
                          raw_dtype=None if kind in (Q.F32, Q.F16) else kind)
    for tensor_name, (data, shape, kind) in (raw or {}).items():
        writer.add_tensor(tensor_name, data, raw_shape=shape, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


def log_probs(model: ModelConfig, params, tokens: np.ndarray) -> np.ndarray:
    return np.asarray(jax.nn.log_softmax(logits_of(model, params, tokens), axis=-1))


def hf_import_log_probs(name: str, weights: dict, tokens: np.ndarray) -> np.ndarray:
    """The fixture's log-probs with `weights` in place of its own, through hf_import."""
    hf = json.loads((FIXTURES / name / "config.json").read_text())
    model = ModelConfig.from_dict(hf_import.model_config_from_hf(hf))
    return log_probs(model, hf_import.convert_weights(weights, model), tokens)


def import_file(path: pathlib.Path, workdir: pathlib.Path):
    gguf_import.import_gguf(path, workdir)
    return restored(workdir)


@pytest.mark.parametrize("name", ["mha", "gqa"])
def test_an_f32_file_gives_pytorchs_log_probs(name, tmp_path):
    write_gguf(tmp_path / "model.gguf", name)
    model, params = import_file(tmp_path / "model.gguf", tmp_path / "run")
    tokens = np.load(FIXTURES / name / "tokens.npy")
    want = np.asarray(jax.nn.log_softmax(np.load(FIXTURES / name / "logits.npy"), axis=-1))
    np.testing.assert_allclose(log_probs(model, params, tokens), want, rtol=0, atol=1e-5)
    hf = json.loads((FIXTURES / name / "config.json").read_text())
    fields = hf_import.model_config_from_hf(hf)  # the HF import's model, field for field
    assert {k: getattr(model, k) for k in fields} == {**fields, "group_sizes": None}
    # Tied (gqa: no output.weight) or untied (mha) as the fixture is.
    assert model.tie_embeddings == hf["tie_word_embeddings"] == ("unembed" not in params)
    meta = checkpoint.read_meta(tmp_path / "run" / "checkpoints")[1]
    assert meta["imported_from"] == str((tmp_path / "model.gguf").absolute())
    assert meta["config"]["data"]["tokenizer"] == str(tmp_path / "run" / "tokenizer")


@pytest.mark.parametrize("name, qtype", [
    ("mha", "F16"), ("mha", "BF16"), ("gqa", "Q8_0"), ("mha", "Q4_0"), ("gqa", "Q4_0"),
    ("gqa", "Q4_1"),
])
def test_a_quantised_file_gives_the_log_probs_of_its_dequantised_weights(name, qtype, tmp_path):
    qtype = Q[qtype]
    weights = write_gguf(tmp_path / "model.gguf", name, qtype)
    model, params = import_file(tmp_path / "model.gguf", tmp_path / "run")
    reader = gguf.GGUFReader(tmp_path / "model.gguf")
    assert {t.tensor_type for t in reader.tensors} == {Q.F32, qtype}
    tokens = np.load(FIXTURES / name / "tokens.npy")
    got = log_probs(model, params, tokens)
    np.testing.assert_allclose(got, hf_import_log_probs(name, weights, tokens), rtol=0,
                               atol=1e-5)
    # Quantisation moved the weights: a check that the reference is not the original model.
    original = np.asarray(jax.nn.log_softmax(np.load(FIXTURES / name / "logits.npy"), axis=-1))
    assert np.abs(got - original).max() > (1e-4 if qtype in (Q.F16, Q.BF16) else 1e-3)


def test_the_tokenizer_is_built_from_the_metadata(tmp_path):
    write_gguf(tmp_path / "model.gguf", "mha")
    gguf_import.import_gguf(tmp_path / "model.gguf", tmp_path / "run")
    tokenizer = load_tokenizer(str(tmp_path / "run" / "tokenizer"))
    assert isinstance(tokenizer, HFModelTokenizer) and tokenizer.vocab_size == 320
    original = tokenizers.Tokenizer.from_file(str(FIXTURES / "mha" / "tokenizer.json"))
    for text in [TEXT, *TEXT.splitlines(), " leading  spaces\n\n\ttabs", "<|end_of_text|>x"]:
        assert tokenizer.encode(text) == original.encode(text, add_special_tokens=False).ids
    ids = tokenizer.encode(TEXT)
    assert tokenizer.decode([0, *ids, 1]) == TEXT  # the control tokens are special
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.stop_ids) == (0, 1, (1, 0))
    assert tokenizer.token_bytes()[ids].sum() == len(TEXT.encode())
    config = json.loads((tmp_path / "run" / "tokenizer" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE and config["add_bos_token"] is True
    assert (config["bos_token"], config["eos_token"]) == ("<|begin_of_text|>", "<|end_of_text|>")


@pytest.mark.parametrize("add_bos, add_eos", [(True, False), (False, False), (True, True)])
def test_add_bos_and_eos_tokens_act_on_encoding(tmp_path, add_bos, add_eos):
    """tokenizer.ggml.add_bos_token / add_eos_token (true in every Llama 2/3 and Mistral file)
    make transformers' and llama.cpp's encode(text) put bos first / eos last: the imported
    tokenizer.json does the same, so lm-eval's HF conventions see what --model hf sees."""
    write_gguf(tmp_path / "model.gguf", "mha", metadata={
        "tokenizer.ggml.add_bos_token": add_bos, "tokenizer.ggml.add_eos_token": add_eos})
    gguf_import.import_gguf(tmp_path / "model.gguf", tmp_path / "run")
    tokenizer = load_tokenizer(str(tmp_path / "run" / "tokenizer"))
    ids = tokenizer.encode(TEXT)  # the bare ids never change
    assert tokenizer.encode_with_special_tokens(TEXT) == [0] * add_bos + ids + [1] * add_eos


def test_eot_and_eom_end_a_generation_too(tmp_path):
    write_gguf(tmp_path / "model.gguf", "gqa", metadata={"tokenizer.ggml.eot_token_id": 7,
                                                          "tokenizer.ggml.eom_token_id": 9})
    gguf_import.import_gguf(tmp_path / "model.gguf", tmp_path / "run")
    tokenizer = load_tokenizer(str(tmp_path / "run" / "tokenizer"))
    assert (tokenizer.eos_id, tokenizer.stop_ids) == (1, (1, 7, 9, 0))


def test_a_sentencepiece_tokenizer_gives_sentencepieces_ids(tmp_path):
    """tokenizer.ggml.model llama (Llama 1/2, Mistral): pieces, scores and token types of a
    SentencePiece BPE trained here, encoded as sentencepiece itself encodes."""
    import sentencepiece
    model = tmp_path / "spm"
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT.splitlines() * 4), model_prefix=str(model),
        model_type="bpe", vocab_size=300, byte_fallback=True, character_coverage=1.0,
        remove_extra_whitespaces=False, normalization_rule_name="identity", minloglevel=2)
    sp = sentencepiece.SentencePieceProcessor(model_file=f"{model}.model")
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    types = [3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 6 if sp.is_byte(i) else 1
             for i in range(len(pieces))]
    write_gguf(tmp_path / "model.gguf", "mha", metadata={
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": None,
        "tokenizer.ggml.merges": None, "tokenizer.ggml.tokens": pieces,
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(len(pieces))],
        "tokenizer.ggml.token_type": types, "tokenizer.ggml.unknown_token_id": sp.unk_id(),
        "tokenizer.ggml.bos_token_id": sp.bos_id(), "tokenizer.ggml.eos_token_id": sp.eos_id()})
    gguf_import.import_gguf(tmp_path / "model.gguf", tmp_path / "run")
    tokenizer = load_tokenizer(str(tmp_path / "run" / "tokenizer"))
    for text in [TEXT, *TEXT.splitlines(), "  two spaces, ünïcödé ✓ and 12345"]:
        assert tokenizer.encode(text) == sp.encode(text), text
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert (tokenizer.bos_id, tokenizer.eos_id) == (sp.bos_id(), sp.eos_id())


def test_llama3_rope_scaling_is_read_back_from_rope_freqs(tmp_path):
    """Llama 3.1/3.2 files carry llama3 RoPE scaling as rope_freqs.weight, the divisor of each
    frequency (convert_hf_to_gguf.py's formula, written out here)."""
    base, dim, factor, low, high, original = 10000.0, 16, 8.0, 1.0, 4.0, 8192
    freqs = 1.0 / base ** (np.arange(0, dim, 2) / dim)
    factors = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        smooth = (original / wavelen - low) / (high - low)
        factors.append(1.0 if wavelen < original / high else factor if wavelen > original / low
                       else 1 / ((1 - smooth) / factor + smooth))
    assert 1.0 < factors[-2] < factor == factors[-1]  # one blended, one divided by the factor
    rope_freqs = np.asarray(factors, np.float32)
    weights = write_gguf(tmp_path / "model.gguf", "mha", raw={
        "rope_freqs.weight": (rope_freqs, None, None)})
    model, params = import_file(tmp_path / "model.gguf", tmp_path / "run")
    assert (model.rope_scaling, model.rope_scaling_factor, model.rope_low_freq_factor,
            model.rope_high_freq_factor, model.rope_original_max_len) == (
        "llama3", 8.0, 1.0, 4.0, 8192)
    hf = json.loads((FIXTURES / "mha" / "config.json").read_text())
    hf["rope_parameters"] = dict(rope_type="llama3", rope_theta=base, factor=factor,
                                 low_freq_factor=low, high_freq_factor=high,
                                 original_max_position_embeddings=original)
    reference = ModelConfig.from_dict(hf_import.model_config_from_hf(hf))
    tokens = np.tile(np.load(FIXTURES / "mha" / "tokens.npy"), 6)  # 126 positions
    np.testing.assert_allclose(
        log_probs(model, params, tokens),
        log_probs(reference, hf_import.convert_weights(weights, reference), tokens),
        rtol=0, atol=1e-5)
    write_gguf(tmp_path / "odd.gguf", "mha", raw={
        "rope_freqs.weight": (rope_freqs * 1.5, None, None)})
    with pytest.raises(ConfigError, match="rope_freqs.weight holds RoPE frequency factors"):
        gguf_import.import_gguf(tmp_path / "odd.gguf", tmp_path / "odd")


def test_linear_rope_scaling_comes_from_the_metadata(tmp_path):
    write_gguf(tmp_path / "model.gguf", "gqa", metadata={"llama.rope.scaling.type": "linear",
                                                          "llama.rope.scaling.factor": 4.0})
    model, _ = import_file(tmp_path / "model.gguf", tmp_path / "run")
    assert (model.rope_scaling, model.rope_scaling_factor, model.rope_base) == (
        "linear", 4.0, 500000.0)


def q8_1_bytes(rows: int, columns: int) -> tuple:
    """A Q8_1 tensor (a ggml type for activations, which gguf cannot dequantise)."""
    block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    return np.zeros((rows, columns // block * size), np.uint8), None, Q.Q8_1


@pytest.mark.parametrize("write, message", [
    (lambda p: p.write_text("not a model"),
     "is not a GGUF file (it starts with b'not ', not b'GGUF')"),
    (lambda p: write_gguf(p, "mha", arch="qwen2"), "architecture 'qwen2' is not supported"),
    (lambda p: write_gguf(p, "mha", metadata={"llama.expert_count": 8}),
     "a mixture of 8 experts is not supported"),
    (lambda p: write_gguf(p, "mha", metadata={"llama.rope.dimension_count": 8}),
     "RoPE on 8 of each head's 16 dimensions is not supported"),
    (lambda p: write_gguf(p, "mha", drop=("blk.0.ffn_up.weight",),
                          raw={"blk.0.ffn_up.weight": q8_1_bytes(96, 64)}),
     "tensor blk.0.ffn_up.weight is Q8_1, which gguf"),
    (lambda p: write_gguf(p, "mha", metadata={"tokenizer.ggml.pre": "qwen2"}),
     "tokenizer.ggml.pre 'qwen2' is not supported (gpt-2, smollm, llama-bpe"),
    (lambda p: write_gguf(p, "mha", metadata={"llama.rope.scaling.type": "yarn",
                                              "llama.rope.scaling.factor": 4.0}),
     "RoPE scaling 'yarn' is not supported"),
    (lambda p: write_gguf(p, "mha", drop=("blk.1.attn_q.weight",)),
     "no tensor 'layers.1.self_attn.q_proj.weight'"),
    (lambda p: write_gguf(p, "mha", raw={"blk.0.attn_q.bias": (np.zeros(64, np.float32),
                                                                None, None)}),
     "does not map: ['blk.0.attn_q.bias']"),
])
def test_a_bad_file_is_one_line_naming_what_is_wrong(tmp_path, write, message):
    path = tmp_path / "model.gguf"
    write(path)
    with pytest.raises(ConfigError) as error:
        gguf_import.import_gguf(path, tmp_path / "run")
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_missing_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"--gguf: .*nowhere.gguf does not exist"):
        gguf_import.import_gguf(tmp_path / "nowhere.gguf", tmp_path / "run")


def test_the_permutation_is_undone():
    rows = np.arange(4 * 8 * 3).reshape(32, 3).astype(np.float32)
    for heads in (1, 2, 4):
        permuted = llama_cpp_permute(rows, heads)
        assert not np.array_equal(permuted, rows)
        np.testing.assert_array_equal(gguf_import.unpermute(permuted, heads), rows)


def test_hf_export_of_an_imported_gguf_gives_back_the_fixture(tmp_path):
    """The run is an ordinary imported run: export gives the fixture's tensors again."""
    write_gguf(tmp_path / "model.gguf", "gqa")
    gguf_import.import_gguf(tmp_path / "model.gguf", tmp_path / "run")
    out = pathlib.Path(hf_export.export_checkpoint(tmp_path / "run", tmp_path / "hf"))
    want, got = hf_import.read_weights(FIXTURES / "gqa"), hf_import.read_weights(out)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
