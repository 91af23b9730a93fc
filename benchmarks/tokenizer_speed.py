"""Which encoder should tokenize the token store: SentencePiece or Hugging Face `tokenizers`?

Both train a 4096-token byte-level BPE on the same synthetic Shakespeare sample, then encode the
same documents, cut the way the store cuts them (`text_chunks`): SentencePiece one thread and
all threads (`num_threads`), Hugging Face `encode_batch` (its own thread pool) and one call per
chunk. The store runs one single-threaded encoder per worker process, so the one-thread rates
are what each worker gets.

    PYTHONPATH=. python benchmarks/tokenizer_speed.py [--mb=20]
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))
from benchmarks.common import environment, today, write_results  # noqa: E402
from cla_jax.data import sources  # noqa: E402
from benchmarks.synthetic_corpus import write_corpus  # noqa: E402
from cla_jax.data.tokenizer import SentencePieceTokenizer, text_chunks  # noqa: E402


def rate(fn, chunks, mb: float, repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(chunks)
        best = min(best, time.perf_counter() - start)
    return mb / best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import tokenizers  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_corpus(tmp, int(args.mb * 1e6), "jsonl", 4, seed=1)
        plan = sources.plan(f"files:{tmp}/*.jsonl")
        texts = [p.text for s in plan.shards for p in sources.read_shard(s, "text")]
        sp = SentencePieceTokenizer.train(texts, 4096, pathlib.Path(tmp) / "bpe.model")
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    start = time.perf_counter()
    hf.train_from_iterator(texts, tokenizers.trainers.BpeTrainer(
        vocab_size=4096, show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    hf_train_s = time.perf_counter() - start
    chunks = [c for t in texts for c in text_chunks(t)]
    mb = sum(len(c.encode()) for c in chunks) / 1e6
    processor = sp._processor
    results = {
        "sentencepiece_1_thread": rate(lambda c: processor.encode(c, num_threads=1), chunks, mb),
        f"sentencepiece_{os.cpu_count()}_threads": rate(
            lambda c: processor.encode(c, num_threads=os.cpu_count()), chunks, mb),
        "hf_encode_batch_threads": rate(lambda c: hf.encode_batch(c), chunks, mb),
        "hf_encode_1_call_per_chunk": rate(lambda c: [hf.encode(x) for x in c], chunks, mb),
    }
    report = {"benchmark": "tokenizer_speed", "date": today(), "environment": environment(),
              "text_mb": mb, "chunks": len(chunks), "hf_train_seconds": hf_train_s,
              "encode_mb_per_s": results}
    path = write_results(report, args.out)
    for name, value in results.items():
        print(f"{name:32s} {value:6.2f} MB/s")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
