"""Import a llama.cpp GGUF Llama as a CLA1 cla-jax run, without transformers or torch.

    python -m cla_jax.hf_import --gguf=SmolLM2-135M.Q4_1.gguf --workdir=runs/smollm2

The `gguf` package (`pip install gguf`, or cla-jax[gguf]) reads the file and dequantises each
tensor to float32: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants and the IQ types
(everything `gguf.quants.dequantize` implements; another type is refused, named). The file then
becomes what a Hugging Face directory holds, and cla_jax.hf_import writes the run from that:

- tensors: llama.cpp's names (token_embd, blk.N.attn_q, ..., output_norm, output) renamed to
  transformers' Llama names, and the rows of attn_q and attn_k put back in transformers' order
  (llama.cpp's converter permutes each head's rows so that the two RoPE halves interleave);
- config.json from the llama.* metadata: context_length is max_seq_len, and the embeddings are
  tied when the file has no output.weight. A rope_freqs.weight tensor (how llama.cpp stores
  Llama 3.1/3.2's llama3 RoPE scaling) is read back as those scaling fields;
- the tokenizer, from the tokenizer.ggml.* metadata: a `tokenizers` tokenizer.json (byte-level
  BPE for tokenizer.ggml.model gpt2, with the pre-tokenizer tokenizer.ggml.pre names; a
  SentencePiece-style BPE with byte fallback for llama), and config.json,
  generation_config.json (eos, then eot and eom: every id llama.cpp ends a generation at) and
  tokenizer_config.json (the tokens' texts, add_bos_token, the chat template), so the run's
  tokenizer loads exactly as an HF import's does.

Only general.architecture llama is imported (Llama 1-3, Mistral 7B, SmolLM and the like are
written as llama); mixture-of-experts files, partial RoPE and unknown pre-tokenizers are
refused in one line.
"""
from __future__ import annotations

import json
import pathlib
import tempfile

import numpy as np

from cla_jax import hf_import
from cla_jax.config import ConfigError
from cla_jax.errors import InstallError

# llama.cpp's tensor names -> transformers' (blk.N. -> model.layers.N.).
LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
MODEL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                 "output": "lm_head"}
ROPE_FREQS = "rope_freqs.weight"
# llama.cpp's token types (gguf.TokenType).
CONTROL, USER_DEFINED = 3, 4
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> (the pre-tokenizer of the model's own tokenizer.json, ignore_merges):
# what llama.cpp's regexes for that name do.
PRE_TOKENIZERS = {
    "gpt-2": ("gpt2", False),
    "smollm": ("digits+gpt2", False),
    # Llama 3 and Falcon 3: Llama 3's split, and a word the vocabulary has is one token.
    "llama-bpe": ("llama3", True), "llama3": ("llama3", True), "llama-v3": ("llama3", True),
    "falcon3": ("llama3", True),
}


def import_gguf(path, workdir, dtype: str = "float32", source: str = "shakespeare"):
    """Writes step 0 of a CLA1 run converted from the GGUF file `path`; returns its
    checkpoint directory."""
    path = pathlib.Path(path).expanduser()
    reader = open_gguf(path)
    metadata = read_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    hf = hf_config(metadata, tensors, path)
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        tokenizer_dir = pathlib.Path(tokenizer_dir)
        for name, content in tokenizer_files(metadata, hf, path).items():
            (tokenizer_dir / name).write_text(content)
        return hf_import.write_run(
            hf, lambda: hf_weights(tensors, hf, path), tokenizer_dir, workdir, dtype=dtype,
            source=source, origin=str(path), imported_from=path)


def open_gguf(path: pathlib.Path):
    """A gguf.GGUFReader of `path`; a missing file, another format or a file gguf cannot
    parse is one line."""
    try:
        import gguf  # noqa: PLC0415  (optional: only this import needs it)
    except ImportError as error:
        raise InstallError("--gguf", error) from None
    if not path.is_file():
        raise ConfigError(f"--gguf: {path} does not exist; give the path of a .gguf file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ConfigError(f"--gguf: {path} is not a GGUF file (it starts with {magic!r}, not "
                          "b'GGUF'); for a Hugging Face directory use --hf_dir")
    try:
        return gguf.GGUFReader(path)
    except ValueError as error:  # e.g. a tensor type newer than this gguf knows
        raise ConfigError(f"--gguf: {path}: gguf {package_version()} cannot read it ({error});"
                          " pip install -U gguf") from None


def package_version() -> str:
    from importlib.metadata import version  # noqa: PLC0415
    return version("gguf")


def read_metadata(reader) -> dict:
    """Every key of the file's metadata -> its value (str, number, bool or list); a float32
    as the shortest decimal that is that float32 (1e-05, not 9.999999747378752e-06)."""
    import gguf  # noqa: PLC0415
    metadata = {}
    for name, field in reader.fields.items():
        if not name.startswith("GGUF."):
            value = field.contents()
            if field.types == [gguf.GGUFValueType.FLOAT32]:
                value = float(str(np.float32(value)))
            metadata[name] = value
    return metadata


def hf_config(metadata: dict, tensors: dict, path: pathlib.Path) -> dict:
    """A transformers Llama config.json for the llama.* metadata; refuses what is no Llama."""
    def refuse(what: str):
        raise ConfigError(f"{path}: {what}; cla-jax imports Llama-architecture GGUF files "
                          "(general.architecture llama, dense, RoPE on whole heads)")
    arch = metadata.get("general.architecture")
    if arch != "llama":
        refuse(f"architecture {arch!r} is not supported")

    def value(key: str, default=None):
        found = metadata.get(f"llama.{key}", default)
        if isinstance(found, list):  # per-layer sizes (other architectures)
            if len(set(found)) != 1:
                refuse(f"llama.{key} differs between layers ({found[:4]}...)")
            found = found[0]
        if found is None:
            refuse(f"the metadata has no llama.{key}")
        return found
    if metadata.get("llama.expert_count"):
        refuse(f"a mixture of {metadata['llama.expert_count']} experts is not supported")
    heads, width = value("attention.head_count"), value("embedding_length")
    head_dim = value("attention.key_length", width // heads)
    if value("attention.value_length", head_dim) != head_dim:
        refuse("keys and values have different head sizes")
    if value("rope.dimension_count", head_dim) != head_dim:
        refuse(f"RoPE on {value('rope.dimension_count')} of each head's {head_dim} dimensions "
               "is not supported")
    if "token_embd.weight" not in tensors:
        refuse("the file has no token_embd.weight")
    hf = dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu",
        vocab_size=int(tensors["token_embd.weight"].shape[1]), hidden_size=width,
        num_hidden_layers=value("block_count"), num_attention_heads=heads,
        num_key_value_heads=value("attention.head_count_kv", heads), head_dim=head_dim,
        intermediate_size=value("feed_forward_length"),
        rms_norm_eps=value("attention.layer_norm_rms_epsilon"),
        max_position_embeddings=value("context_length"),
        rope_theta=float(value("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling(metadata, tensors, head_dim, path),
        tie_word_embeddings="output.weight" not in tensors)
    for key, name in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        token = metadata.get(f"tokenizer.ggml.{name}_token_id")
        if token is not None:
            hf[f"{key}_token_id"] = token
    return hf


def rope_scaling(metadata: dict, tensors: dict, head_dim: int, path: pathlib.Path):
    """config.json's rope_scaling: llama.rope.scaling.* (linear, or a type hf_import refuses
    by name), or Llama 3's, read back from the frequency factors in rope_freqs.weight."""
    kind = metadata.get("llama.rope.scaling.type", "none")
    if ROPE_FREQS in tensors:
        return llama3_scaling(dequantize(tensors[ROPE_FREQS], path),
                              float(metadata.get("llama.rope.freq_base", 10000.0)), head_dim,
                              metadata.get("llama.rope.scaling.original_context_length"), path)
    if kind == "none":
        return None
    factor = metadata.get("llama.rope.scaling.factor")
    return dict(rope_type=kind, **({} if factor is None else {"factor": factor}))


def llama3_rope_factors(base: float, head_dim: int, factor: float, low: float, high: float,
                        original: int) -> np.ndarray:
    """What llama.cpp's converter writes to rope_freqs.weight for llama3 RoPE scaling: the
    divisor of each frequency."""
    freqs = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / freqs
    smooth = (original / wavelen - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0,
                    np.where(wavelen > original / low, factor, blended))


def llama3_scaling(factors: np.ndarray, base: float, head_dim: int, original: int | None,
                   path: pathlib.Path) -> dict:
    """The llama3 rope_scaling whose factors are `factors`: Llama 3.1/3.2's low 1 and high 4
    and the original length the metadata names (llama.cpp's converter assumes 8192)."""
    scaling = dict(rope_type="llama3", factor=float(factors.max()), low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=int(original or 8192))
    want = llama3_rope_factors(base, head_dim, scaling["factor"], 1.0, 4.0,
                               scaling["original_max_position_embeddings"])
    if factors.shape != want.shape or not np.allclose(factors, want, rtol=1e-5):
        raise ConfigError(f"{path}: {ROPE_FREQS} holds RoPE frequency factors that are not "
                          f"llama3 scaling with {scaling}; such RoPE is not supported")
    return scaling


def dequantize(tensor, path: pathlib.Path) -> np.ndarray:
    """A tensor of the file as float32, in numpy's order ([out, in] for a matrix)."""
    import gguf  # noqa: PLC0415
    try:
        return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
    except NotImplementedError:
        raise ConfigError(
            f"{path}: tensor {tensor.name} is {tensor.tensor_type.name}, which gguf "
            f"{package_version()} cannot dequantise; convert the model to F16, BF16, Q8_0 or "
            "Q4_K_M with llama.cpp's llama-quantize (or upgrade gguf)") from None


def unpermute(rows: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's convert_hf_to_gguf `permute` of attn_q/attn_k rows: within each head
    it stored row pairs (i, half + i) next to each other; transformers keeps the halves apart."""
    out = rows.shape[0]
    return (rows.reshape(heads, out // heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2)
            .reshape(rows.shape))


def hf_name(name: str) -> str:
    """transformers' name of a llama.cpp tensor; an unknown name is kept (hf_import refuses
    it as a tensor it does not map)."""
    parts = name.split(".")
    if len(parts) == 2 and parts[0] in MODEL_TENSORS and parts[1] == "weight":
        return f"{MODEL_TENSORS[parts[0]]}.weight"
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in LAYER_TENSORS \
            and parts[3] == "weight":
        return f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}.weight"
    return name


def hf_weights(tensors: dict, hf: dict, path: pathlib.Path) -> dict[str, np.ndarray]:
    """Every tensor but rope_freqs, dequantised, under transformers' names and row order."""
    weights = {}
    for name, tensor in tensors.items():
        if name == ROPE_FREQS:
            continue
        weight = dequantize(tensor, path)
        if name.endswith(".attn_q.weight"):
            weight = unpermute(weight, hf["num_attention_heads"])
        elif name.endswith(".attn_k.weight"):
            weight = unpermute(weight, hf["num_key_value_heads"])
        weights[hf_name(name)] = weight
    return weights


# The tokenizer.


def tokenizer_files(metadata: dict, hf: dict, path: pathlib.Path) -> dict[str, str]:
    """tokenizer.json and the files naming its special ids (name -> text), from the
    tokenizer.ggml.* metadata."""
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ConfigError(f"{path}: the file has no tokenizer (tokenizer.ggml.tokens); import "
                          "the model's Hugging Face directory with --hf_dir instead")
    kind = metadata.get("tokenizer.ggml.model")
    if kind == "gpt2":
        tokenizer = byte_level_bpe(metadata, tokens, path)
    elif kind == "llama":
        tokenizer = sentencepiece_bpe(metadata, tokens)
    else:
        raise ConfigError(f"{path}: tokenizer.ggml.model {kind!r} is not supported (gpt2 and "
                          "llama are); import the model's Hugging Face directory with --hf_dir")
    add_special_tokens(tokenizer, tokens, metadata)

    def text(key: str):
        i = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None
    tokenizer.post_processor = bos_eos_template(
        metadata, text("bos") if metadata.get("tokenizer.ggml.add_bos_token") else None,
        text("eos") if metadata.get("tokenizer.ggml.add_eos_token") else None)
    eos = hf.get("eos_token_id")
    stops = [i for i in (eos, metadata.get("tokenizer.ggml.eot_token_id"),
                         metadata.get("tokenizer.ggml.eom_token_id")) if i is not None]
    generation = dict(bos_token_id=hf.get("bos_token_id"),
                      eos_token_id=list(dict.fromkeys(stops)) if len(set(stops)) > 1 else eos)
    tokenizer_config = dict(
        tokenizer_class="PreTrainedTokenizerFast", clean_up_tokenization_spaces=False,
        model_max_length=hf["max_position_embeddings"],
        bos_token=text("bos"), eos_token=text("eos"), pad_token=text("padding"),
        unk_token=text("unknown"),
        add_bos_token=metadata.get("tokenizer.ggml.add_bos_token"),
        add_eos_token=metadata.get("tokenizer.ggml.add_eos_token"),
        chat_template=metadata.get("tokenizer.chat_template"))

    def dump(content: dict) -> str:
        return json.dumps({k: v for k, v in content.items() if v is not None}, indent=2) + "\n"
    return {"tokenizer.json": tokenizer.to_str(), "config.json": dump(hf),
            "generation_config.json": dump(generation),
            "tokenizer_config.json": dump(tokenizer_config)}


def bos_eos_template(metadata: dict, bos: str | None, eos: str | None):
    """The post-processor that adds what the file's add_bos_token / add_eos_token say (as
    transformers' LlamaTokenizerFast builds it from the same flags), or None: so that
    `encode(text)` gives what llama.cpp and transformers give (Llama 2 and 3: bos first)."""
    if bos is None and eos is None:
        return None
    from tokenizers import processors  # noqa: PLC0415
    ids = {t: metadata[f"tokenizer.ggml.{k}_token_id"] for k, t in (("bos", bos), ("eos", eos))
           if t is not None}
    first, last = ([f"{bos}:0"] if bos else []), ([f"{eos}:0"] if eos else [])
    pair_first, pair_last = ([f"{bos}:1"] if bos else []), ([f"{eos}:1"] if eos else [])
    return processors.TemplateProcessing(
        single=[*first, "$A:0", *last], pair=[*first, "$A:0", *last, *pair_first, "$B:1",
                                             *pair_last],
        special_tokens=list(ids.items()))


def byte_level_bpe(metadata: dict, tokens: list[str], path: pathlib.Path):
    """tokenizer.ggml.model gpt2: byte-level BPE with the file's merges and the pre-tokenizer
    tokenizer.ggml.pre names."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers  # noqa: PLC0415
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ConfigError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported "
                          f"({', '.join(PRE_TOKENIZERS)} are); import the model's Hugging Face "
                          "directory with --hf_dir instead")
    split, ignore_merges = PRE_TOKENIZERS[pre]
    merges = [merge_pair(m) for m in metadata.get("tokenizer.ggml.merges", [])]
    tokenizer = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges,
                                     ignore_merges=ignore_merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split != "llama3")
    tokenizer.pre_tokenizer = {
        "gpt2": byte_level,
        "digits+gpt2": pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True), byte_level]),
        "llama3": pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"), byte_level]),
    }[split]
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def merge_pair(merge: str) -> tuple[str, str]:
    """A tokenizer.ggml.merges entry "left right" as llama.cpp splits it (at the first space
    after the first character)."""
    cut = merge.find(" ", 1)
    return merge[:cut], merge[cut + 1:]


def sentencepiece_bpe(metadata: dict, tokens: list[str]):
    """tokenizer.ggml.model llama: a SentencePiece BPE (pieces with scores, "▁" for space,
    <0xNN> byte pieces) as transformers' converter writes one: merges ranked by the merged
    piece's score, byte fallback, and a "▁" put in front of the text when
    tokenizer.ggml.add_space_prefix (default) says so."""
    from tokenizers import Tokenizer, decoders, models, normalizers  # noqa: PLC0415
    scores = metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []  # (-score, the merged piece's id, left id, right id, left, right)
    for i, (piece, score) in enumerate(zip(tokens, scores)):
        pairs = [(piece[:cut], piece[cut:]) for cut in range(1, len(piece))
                 if piece[:cut] in vocab and piece[cut:] in vocab]
        merges += [(-score, i, vocab[left], vocab[right], left, right) for left, right in pairs]
    merges.sort()
    unk = metadata.get("tokenizer.ggml.unknown_token_id")
    tokenizer = Tokenizer(models.BPE(vocab, [m[4:] for m in merges],
                                     unk_token=tokens[unk] if unk is not None else None,
                                     fuse_unk=True, byte_fallback=True))
    prefix = metadata.get("tokenizer.ggml.add_space_prefix", True)
    replace = normalizers.Replace(" ", "\u2581")
    tokenizer.normalizer = (normalizers.Sequence([normalizers.Prepend("\u2581"), replace])
                            if prefix else replace)
    tokenizer.decoder = decoders.Sequence([
        decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
        *([decoders.Strip(" ", 1, 0)] if prefix else [])])
    return tokenizer


def add_special_tokens(tokenizer, tokens: list[str], metadata: dict) -> None:
    """The control tokens (special: skipped when decoding) and user-defined ones, matched
    whole before the model splits the text, as llama.cpp and transformers do."""
    from tokenizers import AddedToken  # noqa: PLC0415
    types = metadata.get("tokenizer.ggml.token_type") or []
    special = [tokens[i] for i, kind in enumerate(types) if kind == CONTROL]
    added = [tokens[i] for i, kind in enumerate(types) if kind == USER_DEFINED]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t in special])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
