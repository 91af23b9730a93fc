"""Tokenizers behind one small interface: bytes, SentencePiece BPE, Hugging Face `tokenizer.json`.

The tokenizers for models trained here use the same three special ids, so the packing code
and the model never need to ask which tokenizer they got:

    0 = pad (never a real token; loss weight 0)
    1 = bos, the document separator put in front of every document
    2 = eos (reserved; the packed stream uses bos only)

A Hugging Face model directory's tokenizer (`HFModelTokenizer`, for imported models) keeps
the model's own ids instead, and its pad/bos/eos are the model's: code that needs a special id
reads the tokenizer's `pad_id`, `bos_id` and `stop_ids`, never the constants above.

`token_bytes()` gives the number of UTF-8 bytes each id stands for, so that
bits/byte = sum(nll) / ln(2) / sum(token_bytes[targets]) compares tokenizers fairly. The special
ids count 0 bytes: predicting a document boundary is charged to the text's bytes, which sum to
exactly the UTF-8 length of the text for the byte and SentencePiece (byte_fallback) tokenizers.
"""
from __future__ import annotations

import abc
import functools
import hashlib
import io
import json
import os
import re
from collections.abc import Callable, Iterable

import numpy as np
from etils import epath

from cla_jax.errors import UserError

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
NUM_SPECIAL_IDS = 3


class Tokenizer(abc.ABC):
    """Text <-> int ids, with a pad id, a document separator (bos), the ids that end a
    generation and per-token byte counts."""

    pad_id: int = PAD_ID
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abc.abstractmethod
    def identity(self) -> str:
        """A short string that changes whenever the id mapping could: names caches."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of `text`, without any special id."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of each text."""
        return [self.encode(text) for text in texts]

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special ids are skipped."""

    @abc.abstractmethod
    def token_bytes(self) -> np.ndarray:
        """int64 [vocab_size]: UTF-8 bytes each id stands for (0 for special ids)."""

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end a generation: bos (a model trained on packed documents predicts the
        separator after a document) and eos."""
        return (self.bos_id, self.eos_id)

    def token_text(self, i: int) -> str | None:
        """The text of a (special) token as a chat template writes it; None if it has none."""
        return None

    def token_id(self, text: str | None) -> int | None:
        """The id of a (special) token's text; None if no single token is that text."""
        return None


class ByteTokenizer(Tokenizer):
    """One id per UTF-8 byte (id = byte + 3); no training, exact round trip."""

    @property
    def vocab_size(self) -> int:
        return 256 + NUM_SPECIAL_IDS

    @property
    def identity(self) -> str:
        return "byte"

    def encode(self, text: str) -> list[int]:
        data = np.frombuffer(text.encode("utf-8"), np.uint8)
        return (data.astype(np.int64) + NUM_SPECIAL_IDS).tolist()

    def decode(self, ids: Iterable[int]) -> str:
        data = bytes(i - NUM_SPECIAL_IDS for i in ids if NUM_SPECIAL_IDS <= i < self.vocab_size)
        return data.decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        counts = np.ones(self.vocab_size, np.int64)
        counts[:NUM_SPECIAL_IDS] = 0
        return counts


def _short_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


MAX_CHUNK_CHARS = 8192
_PARAGRAPH_END = re.compile(r"(?<=\n\n)")


def text_chunks(text: str) -> list[str]:
    """`text` cut after each blank line, and anything longer than MAX_CHUNK_CHARS after its last
    newline within the limit (else at the limit).

    Training and encoding cut text the same way: no learned piece spans a cut, so encoding the
    chunks equals encoding the whole, and texts without blank lines (one sentence per line) or
    with huge lines still train (SentencePiece drops any "sentence" over its length limit).
    """
    chunks = []
    for paragraph in _PARAGRAPH_END.split(text):
        while len(paragraph) > MAX_CHUNK_CHARS:
            cut = paragraph.rfind("\n", 0, MAX_CHUNK_CHARS) + 1 or MAX_CHUNK_CHARS
            chunks.append(paragraph[:cut])
            paragraph = paragraph[cut:]
        if paragraph:
            chunks.append(paragraph)
    return chunks


def _training_chunks(texts: Iterable[str]) -> Iterable[str]:
    for text in texts:
        yield from text_chunks(text)


_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def _train_sentencepiece(texts: Iterable[str], vocab_size: int, model_writer) -> None:
    import sentencepiece  # noqa: PLC0415
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_chunks(texts)),
        model_writer=model_writer,
        model_type="bpe",
        vocab_size=vocab_size,
        # Exact round trip: no normalisation, no whitespace rewriting, no dummy space in
        # front (that would also add a byte to token_bytes that the text does not have).
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        byte_fallback=True,
        character_coverage=1.0,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=NUM_SPECIAL_IDS,
        max_sentence_length=1 << 16,
        input_sentence_size=2_000_000,
        shuffle_input_sentence=True,
        minloglevel=2,
    )


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model. Models trained here use ids 0/1/2 natively; a foreign model
    (e.g. one without a pad id) has its ids shifted up by 3 so the special ids stay 0/1/2."""

    def __init__(self, model_proto: bytes):
        import sentencepiece

        self._processor = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        sp = self._processor
        native = sp.pad_id() == PAD_ID and sp.bos_id() == BOS_ID and sp.eos_id() == EOS_ID
        self._offset = 0 if native else NUM_SPECIAL_IDS
        self._identity = f"spm{sp.get_piece_size()}-{_short_hash(model_proto)}"
        self._model_proto = model_proto

    def __reduce__(self):  # picklable for the worker processes that build token stores
        return type(self), (self._model_proto,)

    @classmethod
    def load(cls, model_path: epath.PathLike) -> "SentencePieceTokenizer":
        return cls(epath.Path(model_path).read_bytes())

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int, model_path: epath.PathLike
    ) -> "SentencePieceTokenizer":
        """Trains a byte-fallback BPE on `texts` (the train split) unless `model_path` exists."""
        model_path = epath.Path(model_path)
        if model_path.exists():
            return cls.load(model_path)
        model = io.BytesIO()
        try:
            _train_sentencepiece(texts, vocab_size, model)
        except RuntimeError as error:
            if "sentences_.empty()" in str(error):
                raise UserError(f"tokenizer bpe:{vocab_size}: no training text (the train "
                                "split is empty or all whitespace)") from None
            if "Vocabulary size too high" not in str(error):
                raise
            limit = re.search(r"<= (\d+)", str(error))
            raise UserError(
                f"tokenizer bpe:{vocab_size}: its training text only supports "
                f"{limit.group(1) if limit else 'fewer'} tokens; lower the vocabulary size or "
                "train on more text (data.tokenizer_sample_bytes)") from None
        model_path.parent.mkdir(parents=True, exist_ok=True)
        partial = model_path.parent / f"{model_path.name}.partial-{os.getpid()}"
        partial.write_bytes(model.getvalue())
        partial.replace(model_path)  # Atomic: a killed run never leaves half a model.
        return cls(model.getvalue())

    @property
    def vocab_size(self) -> int:
        return self._processor.get_piece_size() + self._offset

    @property
    def identity(self) -> str:
        return self._identity

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        batch = self._processor.encode(texts, num_threads=1)  # parallel: worker processes
        return [[i + self._offset for i in ids] for ids in batch] if self._offset else batch

    def decode(self, ids: Iterable[int]) -> str:
        # A model may have more rows than the tokenizer has pieces (the vocabulary check
        # allows it) and sample one of them: it stands for no text, as a special id does.
        size = self.vocab_size
        return self._processor.decode(
            [i - self._offset for i in ids if NUM_SPECIAL_IDS <= i < size]
        )

    def token_bytes(self) -> np.ndarray:
        sp = self._processor
        counts = np.zeros(self.vocab_size, np.int64)
        for i in range(sp.get_piece_size()):
            if sp.is_byte(i):
                n = 1
            elif sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
                n = 0
            else:
                n = len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
            counts[i + self._offset] = n
        return counts


def _gpt2_unicode_to_byte() -> dict[str, int]:
    # Byte-level BPE spells every byte as a printable character: printable Latin-1 bytes as
    # themselves, the others as chr(256 + k) in byte order.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            mapping[chr(256 + extra)] = b
            extra += 1
    return mapping


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` (needs the optional `tokenizers` package).

    Its ids are shifted up by 3 so that 0/1/2 are pad/bos/eos (for models trained here; an
    imported model keeps its own ids: `HFModelTokenizer`). token_bytes is exact for byte-level
    BPE (GPT-2 style) models. For SentencePiece-style models ("▁" for space, <0xNN> byte
    pieces) it counts each "▁" as one byte, which over-counts the one space a Metaspace
    pre-tokenizer prepends to a text; for WordPiece-like models it misses the spaces the
    decoder inserts between words.
    """

    offset = NUM_SPECIAL_IDS  # HF id i is our id i + offset

    def __init__(self, json_path: epath.PathLike):
        try:
            import tokenizers
        except ImportError:  # a missing package the user can install: one line, exit 2
            raise UserError(
                f"{json_path}: loading a tokenizer.json needs the `tokenizers` package: "
                "pip install tokenizers"
            ) from None
        self._json_path = json_path
        raw = epath.Path(json_path).read_bytes()
        self._tokenizer = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
        self._spec = json.loads(raw)
        self._identity = f"hf{self._tokenizer.get_vocab_size()}-{_short_hash(raw)}"
        self._raw = raw

    def __reduce__(self):
        return type(self), (self._json_path,)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size() + self.offset

    @property
    def identity(self) -> str:
        return self._identity

    @functools.cached_property
    def _special_ids(self) -> frozenset[int]:
        """Our ids that stand for no text."""
        added = {t["id"] + self.offset for t in self._spec.get("added_tokens", [])
                 if t.get("special")}
        return frozenset(added | set(range(self.offset)) | {self.pad_id, self.bos_id,
                                                            *self.stop_ids})

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        batch = self._tokenizer.encode_batch(texts, add_special_tokens=False)
        return [[i + self.offset for i in encoding.ids] for encoding in batch]

    def decode(self, ids: Iterable[int]) -> str:
        special, size = self._special_ids, self.vocab_size
        return self._tokenizer.decode(
            [i - self.offset for i in ids if 0 <= i < size and i not in special],
            skip_special_tokens=True)

    def token_text(self, i: int) -> str | None:
        return self._tokenizer.id_to_token(i - self.offset) if i >= self.offset else None

    def token_id(self, text: str | None) -> int | None:
        i = self._tokenizer.token_to_id(text) if text else None
        return None if i is None else i + self.offset

    def _decoder_types(self) -> set[str]:
        decoder = self._spec.get("decoder") or {}
        return {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", [])}

    def token_bytes(self) -> np.ndarray:
        byte_level = "ByteLevel" in self._decoder_types()
        unicode_to_byte = _gpt2_unicode_to_byte()
        counts = np.zeros(self.vocab_size, np.int64)
        for token, i in self._tokenizer.get_vocab(with_added_tokens=True).items():
            if byte_level and all(c in unicode_to_byte for c in token):
                n = len(token)
            elif _BYTE_PIECE.match(token):
                n = 1
            else:
                n = len(token.removeprefix("##").replace("\u2581", " ").encode("utf-8"))
            counts[i + self.offset] = n
        counts[sorted(self._special_ids)] = 0
        return counts


MODEL_ID_FILES = ("config.json", "generation_config.json", "tokenizer_config.json")


class HFModelTokenizer(HFTokenizer):
    """The tokenizer of a Hugging Face model directory, with the model's own ids (no shift):
    what an imported model was trained with, as AutoTokenizer.from_pretrained(dir) gives.

    The directory holds tokenizer.json and, for the special ids, any of config.json
    (bos/eos/pad_token_id), generation_config.json (eos_token_id: the id, or list of ids, that
    end a generation; Llama 3 has several) and tokenizer_config.json (bos/eos/pad_token as
    text), read in that order of precedence. stop_ids are every eos id of config.json and
    generation_config.json, and bos (a model uptrained here on packed documents predicts the
    next document's bos at a document's end). A model without a bos uses its first eos as the
    document separator; one without a pad pads with its first eos: padding is always weighted
    out, never recognised by its id.
    """

    offset = 0

    def __init__(self, model_dir: epath.PathLike):
        self._model_dir = model_dir
        directory = epath.Path(model_dir)
        super().__init__(directory / "tokenizer.json")
        files = {name: json.loads((directory / name).read_text())
                 for name in MODEL_ID_FILES if (directory / name).is_file()}
        config, generation, tokenizer_config = (files.get(n, {}) for n in MODEL_ID_FILES)

        def ids(key: str) -> list[int]:
            """The ids `key` names: config.json's, else generation_config.json's, else those
            of tokenizer_config.json's token text."""
            for source in (config, generation):
                if source.get(f"{key}_token_id") is not None:
                    return _as_list(source[f"{key}_token_id"])
            token = tokenizer_config.get(f"{key}_token")
            token = token.get("content") if isinstance(token, dict) else token
            i = self._tokenizer.token_to_id(token) if token else None
            return [] if i is None else [i]

        # Both lists of eos ids count: generation_config.json's is what transformers' generate
        # stops at, config.json's what the model declares.
        eos = [i for i in ids("eos") + _as_list(generation.get("eos_token_id")) if i is not None]
        if not eos:
            raise UserError(f"{directory}: no eos id in {', '.join(MODEL_ID_FILES)}; a model "
                            "needs one to end a generation")
        self.eos_id, self.bos_id, self.pad_id = eos[0], (ids("bos") or eos)[0], \
            (ids("pad") or eos)[0]
        self.eos_ids = tuple(dict.fromkeys(eos))
        self._stop_ids = tuple(dict.fromkeys(eos + [self.bos_id]))
        bad = sorted({i for i in (self.pad_id, *self._stop_ids) if not 0 <= i < self.vocab_size})
        if bad:
            raise UserError(f"{directory}: special ids {bad} are outside tokenizer.json's "
                            f"{self.vocab_size} ids")
        ids_text = json.dumps([self.pad_id, self.bos_id, self._stop_ids]).encode()
        self._identity = f"hfmodel{self.vocab_size}-{_short_hash(self._raw + ids_text)}"
        special_map = directory / "special_tokens_map.json"
        self._tokenizer_tokens = {**(json.loads(special_map.read_text())
                                     if special_map.is_file() else {}), **tokenizer_config}

    def __reduce__(self):
        return type(self), (self._model_dir,)

    @property
    def model_dir(self) -> epath.Path:
        """The directory it was read from (its chat template lives there too)."""
        return epath.Path(self._model_dir)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Every eos id of the model, then bos."""
        return self._stop_ids

    def tokenizer_token_id(self, key: str) -> int | None:
        """The id of the tokenizer's own `key` token ("bos", "eos"), as tokenizer_config.json
        and special_tokens_map.json name it: transformers' `tokenizer.bos_token_id`, which can
        differ from the model's config.json (Llama 3.2 Instruct: eos <|eot_id|>, model eos ids
        128001, 128008, 128009), and is None where the tokenizer names none."""
        token = self._tokenizer_tokens.get(f"{key}_token")
        token = token.get("content") if isinstance(token, dict) else token
        return self._tokenizer.token_to_id(token) if token else None

    def decode_with_special_tokens(self, ids: list[int]) -> str:
        """The text of `ids`, special tokens spelled out: transformers' `decode(ids)`."""
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    def encode_with_special_tokens(self, text: str) -> list[int]:
        """The ids with the special tokens tokenizer.json's post-processor adds (Llama 3's
        <|begin_of_text|>, none for GPT-2-style BPE): transformers' `encode(text)` default."""
        return self._tokenizer.encode(text, add_special_tokens=True).ids


def _as_list(value) -> list:
    return list(value) if isinstance(value, list) else [value]


def load_tokenizer(
    spec: str,
    *,
    cache_dir: epath.PathLike | None = None,
    training_texts: Callable[[], Iterable[str]] | None = None,
) -> Tokenizer:
    """Builds a tokenizer from a string spec.

    "byte"             ByteTokenizer
    "bpe:<vocab_size>" SentencePiece BPE cached as `cache_dir/bpe<vocab_size>.model`, trained on
                       `training_texts()` (the train split) the first time
    "<path>.model"     an existing SentencePiece model
    "<path>.json"      a Hugging Face tokenizer.json, ids shifted by 3 (needs `tokenizers`)
    "<directory>"      a Hugging Face model's tokenizer.json and id files, with the model's own
                       ids (HFModelTokenizer; what hf_import writes for an imported model)
    """
    if spec == "byte":
        return ByteTokenizer()
    if match := re.fullmatch(r"bpe:(\d+)", spec):
        vocab_size = int(match.group(1))
        if cache_dir is None:
            raise UserError(f"tokenizer {spec!r} needs a cache_dir to keep the trained model in")
        model_path = epath.Path(cache_dir) / f"bpe{vocab_size}.model"
        if not model_path.exists() and training_texts is None:
            raise UserError(
                f"tokenizer {spec!r}: {model_path} does not exist and no training texts were given"
            )
        texts = training_texts() if not model_path.exists() else ()
        return SentencePieceTokenizer.train(texts, vocab_size, model_path)
    if spec.endswith((".model", ".json")):
        path = epath.Path(spec).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        return SentencePieceTokenizer.load(path) if spec.endswith(".model") else HFTokenizer(path)
    path = epath.Path(spec).expanduser()
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"tokenizer directory {path} has no tokenizer.json")
        return HFModelTokenizer(path)
    raise UserError(
        f"unknown tokenizer spec {spec!r}: use 'byte', 'bpe:<vocab_size>', a .model or a .json "
        "path, or a Hugging Face model directory holding tokenizer.json"
    )
