"""Perplexity and bits/byte of a checkpoint over a whole split; writes a JSON file.

    python eval.py --workdir=workdir/demo            # latest checkpoint, validation split
    python eval.py --workdir=workdir/demo --step=400 --split=train
    python eval.py --workdir=workdir/demo --protocol=strided --stride=64
    python eval.py --workdir=workdir/demo --protocol=documents   # as lm-eval's rolling NLL

Protocols (cla_jax/evaluation.py): windows (disjoint windows of train.seq_len), strided
(sliding windows every --stride tokens, each scoring only its new targets) and documents (each
document from its start, rolling windows inside long ones).
"""
import json

import jax
from absl import flags

from cla_jax import cli
from cla_jax.evaluation import PROTOCOLS, check_protocol, evaluate_checkpoint
from cla_jax.storage import as_path

flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest usable one).")
flags.DEFINE_enum("split", "validation", ["validation", "train"], "Split to evaluate.")
flags.DEFINE_integer("batch_size", None, "Global eval batch size (default: train.batch_size).")
flags.DEFINE_enum("protocol", "windows", list(PROTOCOLS),
                  "windows: disjoint windows; strided: a window every --stride tokens, scoring "
                  "its last --stride targets; documents: each document from its start.")
flags.DEFINE_integer("stride", None, "Tokens between window starts (--protocol=strided only; "
                     "1 to train.seq_len, which equals --protocol=windows).")
flags.DEFINE_string("output", None, "JSON output (default: <workdir>/eval_<split>_<step>.json, "
                    "with _<protocol>[<stride>] before .json for strided and documents).")
cli.define_mesh_flag()
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def default_output(workdir, split: str, step: int, protocol: str, stride) -> str:
    suffix = "" if protocol == "windows" else f"_{protocol}{stride or ''}"
    return str(as_path(workdir) / f"eval_{split}_{step}{suffix}.json")


def main(argv):
    check_protocol(FLAGS.protocol, FLAGS.stride)  # before loading anything
    results = evaluate_checkpoint(FLAGS.workdir, FLAGS.cache_dir, FLAGS.step, FLAGS.split,
                                  FLAGS.batch_size, cli.mesh_spec(), FLAGS.protocol, FLAGS.stride)
    step = results["step"]
    output = as_path(FLAGS.output or default_output(FLAGS.workdir, FLAGS.split, step,
                                                    FLAGS.protocol, FLAGS.stride))
    if jax.process_index() == 0:
        output.write_text(json.dumps(results, indent=2) + "\n")
        how = FLAGS.protocol + (f" stride {FLAGS.stride}" if FLAGS.stride else "")
        print(f"step {step} {FLAGS.split} ({how}, seq_len {results['seq_len']}): "
              f"{results['tokens']:,} tokens, {results['words']:,} words, "
              f"{results['bytes']:,} bytes in {results['documents']:,} documents")
        print(f"perplexity {results['perplexity']:.2f} per token (mean NLL "
              f"{results['mean_nll']:.4f}, unigram baseline {results['unigram_perplexity']:.1f}), "
              f"{results['word_perplexity']:.2f} per word, {results['byte_perplexity']:.4f} per "
              f"byte; bits/byte {results['bits_per_byte']:.4f}")
        print(f"model: {results['params']:,} params, KV cache {results['kv_bytes_per_token']} "
              f"bytes/token at 16 bit; results in {output}")


def run():
    cli.start(main)


if __name__ == "__main__":
    run()
