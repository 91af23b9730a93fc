"""From a run's `config.data` to its tokenizer and token store (train and validation streams).

config.data (defaults in DATA_DEFAULTS; a run saved before a field existed gets its default):
  source                  "shakespeare", "files:<glob>" or "tfds:<name>" (see sources.py)
  validation_source       optional files:<glob> of validation documents (files: sources only);
                          without it, validation_fraction of the documents, by identity hash
  text_field              the JSON field / parquet column / TFDS feature holding the text
  train_split, validation_split   TFDS split names ("" validation_split = hold out by hash)
  tokenizer               "bpe:<vocab>" (trained on a sample of the train split), "byte", or a
                          SentencePiece .model / Hugging Face tokenizer.json path
  tokenizer_sample_bytes  text the BPE trains on, drawn evenly across the corpus
  name                    a label: the store's and tokenizer's directories start with it
                          ("" = named after the source: shakespeare, the TFDS name, or the
                          folder of a files: glob)
  data_dir                stores, trained tokenizers and TFDS data (default
                          <cache_dir>/datasets); a local path or gs://
  prepare_workers         tokenizing processes per host (0 = one per CPU core)

Every host plans the same shards, builds its share (see store.py) and reads the result: the
store is built once and reused by every later run, eval and host that sees the same data_dir.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np
from etils import epath

from cla_jax.data import sources
from cla_jax.data.store import TokenStore, TokenStream, build_store, is_complete, store_key
from cla_jax.data.tokenizer import Tokenizer, load_tokenizer
from cla_jax.errors import UserError

DATA_DEFAULTS = dict(
    source="shakespeare", validation_source="", text_field="text", train_split="train",
    validation_split="validation", validation_fraction=0.1, tokenizer="bpe:4096",
    tokenizer_sample_bytes=100_000_000, name="", data_dir="", prepare_workers=0,
)
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class DataConfigError(UserError):
    """A config.data setting is wrong; the message names it."""


@dataclasses.dataclass
class Corpus:
    """A prepared corpus: its tokenizer, its token store and the store's train and validation
    streams."""
    tokenizer: Tokenizer
    store: TokenStore
    train: TokenStream
    validation: TokenStream

    @property
    def special_ids(self) -> dict[str, int]:
        """The tokenizer's bos and pad ids, as the batch builders (data.pipeline) take them:
        a Hugging Face model's own ids need not be 0 and 1."""
        return {"bos_id": self.tokenizer.bos_id, "pad_id": self.tokenizer.pad_id}

    def unigram_perplexity(self, split: str = sources.VALIDATION) -> float:
        """Perplexity on `split` of the train split's add-one smoothed token frequencies (every
        token but the split's first is predicted): the baseline a model must beat to have
        learned anything beyond token counts. From the store's counts: no pass over the data."""
        train = self.store.counts(sources.TRAIN).astype(np.float64) + 1.0
        logp = np.log(train / train.sum())
        targets = self.store.counts(split).astype(np.float64)
        stream = self.train if split == sources.TRAIN else self.validation
        targets[stream[0]] -= 1
        return float(np.exp(-(targets * logp).sum() / targets.sum()))


def settings(data) -> dict:
    """config.data with defaults filled in and unknown fields refused."""
    given = dict(data)
    unknown = sorted(set(given) - set(DATA_DEFAULTS))
    if unknown:
        raise DataConfigError(f"config.data has unknown fields {unknown}; known: "
                              f"{sorted(DATA_DEFAULTS)}")
    merged = {**DATA_DEFAULTS, **given}
    merged["name"] = merged["name"] or name_of_source(merged["source"])
    if not _NAME.match(merged["name"]):
        raise DataConfigError(f"data.name {merged['name']!r} must be letters, digits, '_', '.' "
                              "or '-' (it names a directory)")
    if merged["tokenizer_sample_bytes"] < 1 << 20:
        raise DataConfigError("data.tokenizer_sample_bytes must be at least 1 MiB, got "
                              f"{merged['tokenizer_sample_bytes']}")
    return merged


def name_of_source(source: str) -> str:
    """A label for a source's store: "shakespeare", a TFDS dataset's name, or the last folder
    of a files: glob before any wildcard ("files:/data/fineweb/**/*.zst" -> "fineweb")."""
    kind, _, rest = source.partition(":")
    if kind == "files":
        rest = re.split(r"[*?\[]", rest, maxsplit=1)[0].rstrip("/").rsplit("/", 1)[-1]
    label = re.sub(r"[^A-Za-z0-9_.-]+", "-", rest or kind).strip("-.")
    return label or "corpus"


def _data_dir(s: dict, cache_dir) -> epath.Path:
    return epath.Path(s["data_dir"] or epath.Path(cache_dir).expanduser() / "datasets")


def _plan(s: dict, cache_dir, whole: bool = False) -> sources.Plan:
    if whole:
        return sources.plan_whole(s["source"], text_field=s["text_field"],
                                  tfds_split=s["validation_split"],
                                  data_dir=_data_dir(s, cache_dir), cache_dir=cache_dir)
    return sources.plan(
        s["source"], text_field=s["text_field"], validation_fraction=s["validation_fraction"],
        validation_source=s["validation_source"], data_dir=_data_dir(s, cache_dir),
        train_split=s["train_split"], validation_split=s["validation_split"],
        cache_dir=cache_dir)


def _read_kwargs(s: dict, cache_dir) -> dict:
    return {"cache_dir": str(cache_dir), "data_dir": str(_data_dir(s, cache_dir))}


def _check_vocab(vocab_size: int, max_vocab_size: int | None, spec: str) -> None:
    if max_vocab_size is not None and vocab_size > max_vocab_size:
        raise DataConfigError(
            f"the tokenizer {spec!r} has {vocab_size} tokens but model.vocab_size is "
            f"{max_vocab_size}; raise model.vocab_size or use a smaller tokenizer")


def corpus_tokenizer(data, cache_dir, plan: sources.Plan | None = None,
                     max_vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer `data` names; a BPE is trained once on a bounded sample of the train split
    and kept under data_dir, named by the source's fingerprint and the sample size."""
    s = settings(data)
    spec = s["tokenizer"]
    if match := re.fullmatch(r"bpe:(\d+)", spec):
        _check_vocab(int(match.group(1)), max_vocab_size, spec)  # before training anything
        plan = plan or _plan(s, cache_dir)
        sample = s["tokenizer_sample_bytes"]
        where = _data_dir(s, cache_dir) / "tokenizers" / f"{s['name']}-{plan.fingerprint[:16]}-" \
            f"sample{sample}"

        def training_texts():
            sources.check_inputs(plan)
            return sources.training_sample(plan, sample, **_read_kwargs(s, cache_dir))

        tokenizer = load_tokenizer(spec, cache_dir=where, training_texts=training_texts)
    else:
        tokenizer = load_tokenizer(spec)
    _check_vocab(tokenizer.vocab_size, max_vocab_size, spec)
    return tokenizer


def prepare_corpus(data, cache_dir, max_vocab_size: int | None = None, *,
                   tokenizer_data=None, whole: bool = False) -> Corpus:
    """Plans the source, trains or loads the tokenizer and builds (once) or opens the store.

    With several processes, process 0 trains the tokenizer while the others wait; then every
    process tokenizes its share of the shards. Nothing is written before the source, its text
    field and the tokenizer's size (against `max_vocab_size`) have been checked.

    tokenizer_data: the config.data whose tokenizer to use (default `data`'s own): a run's, to
        evaluate it on another source with its own vocabulary (nothing is trained on `data`).
    whole: every document of the source in the validation split, none in train
        (`sources.plan_whole`; of a tfds: source, its TFDS split data.validation_split).
    """
    import jax  # noqa: PLC0415 (the rest of the data package runs without jax)
    s = settings(data)
    plan = _plan(s, cache_dir, whole)
    index, count = jax.process_index(), jax.process_count()

    def barrier(name: str) -> None:
        if count > 1:
            from jax.experimental import multihost_utils  # noqa: PLC0415
            multihost_utils.sync_global_devices(f"cla_jax: {name}")

    def tokenizer_of_run() -> Tokenizer:
        if tokenizer_data is None:
            return corpus_tokenizer(data, cache_dir, plan, max_vocab_size)
        return corpus_tokenizer(tokenizer_data, cache_dir, max_vocab_size=max_vocab_size)

    tokenizer = tokenizer_of_run() if index == 0 else None
    barrier("tokenizer ready")
    tokenizer = tokenizer or tokenizer_of_run()
    key = store_key(plan, tokenizer)
    directory = _data_dir(s, cache_dir) / "stores" / f"{s['name']}-{key}"
    if not is_complete(directory, key):
        sources.check_inputs(plan)  # before any shard is written
    store = build_store(directory, plan, tokenizer, workers=s["prepare_workers"],
                        process_index=index, process_count=count,
                        barrier=lambda: barrier("token store shards built"),
                        read_kwargs=_read_kwargs(s, cache_dir), progress=index == 0)
    for split, info in store.meta["splits"].items():
        if whole and split == sources.TRAIN:
            continue  # empty by design
        if whole and info["tokens"] < 2:
            raise DataConfigError(f"{s['source']!r} holds {info['documents']} documents "
                                  f"({info['tokens']} tokens): nothing to evaluate")
        if info["tokens"] < 2:
            raise DataConfigError(
                f"the {split} split of {s['source']!r} holds {info['documents']} documents "
                f"({info['tokens']} tokens); give more documents, or change "
                "data.validation_fraction / data.validation_source (eval.py: --split=all reads "
                "a corpus whole)")
    return Corpus(tokenizer, store, store.split(sources.TRAIN), store.split(sources.VALIDATION))
