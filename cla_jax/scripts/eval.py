"""Perplexity and bits/byte of a checkpoint over a whole split; writes a JSON file.

    python eval.py --workdir=workdir/demo            # latest checkpoint, validation split
    python eval.py --workdir=workdir/demo --step=400 --split=train
    python eval.py --workdir=workdir/demo --protocol=strided --stride=64
    python eval.py --workdir=workdir/demo --protocol=documents   # as lm-eval's rolling NLL
    python eval.py --workdir=runs/llama --source='files:texts/*.jsonl' --seq_lens=512,1024,2048

Protocols (cla_jax/evaluation.py): windows (disjoint windows of train.seq_len), strided
(sliding windows every --stride tokens, each scoring only its new targets) and documents (each
document from its start, rolling windows inside long ones).

Data: the run's own (its data.source, validation split) unless --source names another corpus,
which is tokenized with the run's tokenizer into a token store of its own, built once and
reused. --seq_lens evaluates several window lengths in one run (one result per length).
"""
import json
import re

import jax
from absl import flags

from cla_jax import cli
from cla_jax.data.corpus import name_of_source
from cla_jax.evaluation import PROTOCOLS, check_protocol, evaluate_lengths, parse_seq_lens
from cla_jax.storage import as_path

flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest usable one).")
flags.DEFINE_string("source", None,
                    "Corpus to evaluate (default: the run's data.source): files:<glob> of .txt "
                    "(a document per file), .jsonl[.gz|.zst] or .parquet files (a document "
                    "per record), tfds:<name>, or shakespeare. Tokenized with the run's "
                    "tokenizer, once: later calls reuse its token store.")
flags.DEFINE_string("text_field", None, "JSON field / parquet column / TFDS feature holding "
                    "the text (default: the run's data.text_field, i.e. text).")
flags.DEFINE_string("split", None,
                    "Split to evaluate. validation (default) or train: held out as training "
                    "holds them out; all: every document of the source (the default for a "
                    "files: or shakespeare --source other than the run's); with "
                    "--source=tfds:<name>, a TFDS split name (default validation), read whole.")
flags.DEFINE_string("seq_lens", None, "Window lengths in tokens, comma-separated, each "
                    "evaluated over the whole split, e.g. 512,1024,2048 (default: the run's "
                    "train.seq_len; at most model.max_seq_len).")
flags.DEFINE_alias("seq_len", "seq_lens")
flags.DEFINE_integer("batch_size", None, "Global eval batch size (default: train.batch_size).")
flags.DEFINE_enum("protocol", "windows", list(PROTOCOLS),
                  "windows: disjoint windows; strided: a window every --stride tokens, scoring "
                  "its last --stride targets; documents: each document from its start.")
flags.DEFINE_integer("stride", None, "Tokens between window starts (--protocol=strided only; "
                     "1 to the shortest length, where it equals --protocol=windows).")
flags.DEFINE_string("output", None, "JSON output (default: <workdir>/eval_[<source>-]<split>_"
                    "<step>[_<protocol><stride>][_seq<lengths>].json: the source's name when "
                    "--source is given, the lengths when --seq_lens is).")
cli.define_mesh_flag()
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def default_output(workdir, split: str, step: int, protocol: str, stride, source=None,
                   seq_lens=None) -> str:
    """<workdir>/eval_[<source>-]<split>_<step>[_<protocol><stride>][_seq<a>-<b>...].json."""
    suffix = "" if protocol == "windows" else f"_{protocol}{stride or ''}"
    if seq_lens:
        suffix += "_seq" + "-".join(map(str, seq_lens))
    prefix = f"{name_of_source(source)}-" if source else ""
    split = re.sub(r"[^A-Za-z0-9_.-]+", "-", split)  # a TFDS split may be named test[50%]
    return str(as_path(workdir) / f"eval_{prefix}{split}_{step}{suffix}.json")


def summary(results: list[dict]) -> dict:
    """The JSON of a run: one length's results as they are, several under "results"."""
    if len(results) == 1:
        return results[0]
    first = results[0]
    shared = {k: first[k] for k in ("step", "split", "source", "text_field", "protocol",
                                    "documents", "tokens", "words", "bytes")}
    return {**shared, "seq_lens": [r["seq_len"] for r in results], "results": results}


def main(argv):
    """cla-eval's work once its flags are parsed: evaluates the checkpoint and prints the
    metrics."""
    check_protocol(FLAGS.protocol, FLAGS.stride)  # before loading anything
    seq_lens = parse_seq_lens(FLAGS.seq_lens) if FLAGS.seq_lens is not None else None
    every = evaluate_lengths(FLAGS.workdir, FLAGS.cache_dir, FLAGS.step, FLAGS.split,
                             FLAGS.batch_size, cli.mesh_spec(), FLAGS.protocol, FLAGS.stride,
                             source=FLAGS.source, text_field=FLAGS.text_field, seq_lens=seq_lens)
    first = every[0]
    output = as_path(FLAGS.output or default_output(
        FLAGS.workdir, first["split"], first["step"], FLAGS.protocol, FLAGS.stride,
        FLAGS.source, seq_lens))
    if jax.process_index() != 0:
        return
    output.write_text(json.dumps(summary(every), indent=2) + "\n")
    how = FLAGS.protocol + (f" stride {FLAGS.stride}" if FLAGS.stride else "")
    what = f" of {first['source']}" if FLAGS.source else ""
    lengths = ", ".join(str(r["seq_len"]) for r in every)
    print(f"step {first['step']} {first['split']}{what} ({how}, seq_len {lengths}): "
          f"{first['tokens']:,} tokens, {first['words']:,} words, "
          f"{first['bytes']:,} bytes in {first['documents']:,} documents")
    unigram = first["unigram_perplexity"]
    baseline = f", unigram baseline {unigram:.1f}" if unigram is not None else ""
    for results in every:
        at = f"seq_len {results['seq_len']}: " if len(every) > 1 else ""
        print(f"{at}perplexity {results['perplexity']:.2f} per token (mean NLL "
              f"{results['mean_nll']:.4f}{baseline}), {results['word_perplexity']:.2f} per "
              f"word, {results['byte_perplexity']:.4f} per byte; bits/byte "
              f"{results['bits_per_byte']:.4f}")
    print(f"model: {first['params']:,} params, KV cache {first['kv_bytes_per_token']} "
          f"bytes/token at 16 bit; results in {output}")


def run():
    """The cla-eval console script (and `python eval.py`): parses the flags, then runs `main`."""
    cli.start(main)


if __name__ == "__main__":
    run()
