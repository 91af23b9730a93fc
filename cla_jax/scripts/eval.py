"""Perplexity and bits/byte of a checkpoint over a whole split; writes a JSON file.

    python eval.py --workdir=workdir/demo            # latest checkpoint, validation split
    python eval.py --workdir=workdir/demo --step=400 --split=train
"""
import json

import jax
from absl import flags

from cla_jax import cli
from cla_jax.evaluation import evaluate_checkpoint
from cla_jax.storage import as_path

flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest usable one).")
flags.DEFINE_enum("split", "validation", ["validation", "train"], "Split to evaluate.")
flags.DEFINE_integer("batch_size", None, "Global eval batch size (default: train.batch_size).")
flags.DEFINE_string("output", None, "JSON output (default: <workdir>/eval_<split>_<step>.json).")
cli.define_mesh_flag()
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def main(argv):
    results = evaluate_checkpoint(FLAGS.workdir, FLAGS.cache_dir, FLAGS.step, FLAGS.split,
                                  FLAGS.batch_size, cli.mesh_spec())
    step, workdir = results["step"], as_path(FLAGS.workdir)
    output = as_path(FLAGS.output or workdir / f"eval_{FLAGS.split}_{step}.json")
    if jax.process_index() == 0:
        output.write_text(json.dumps(results, indent=2) + "\n")
        print(f"step {step} {FLAGS.split}: {results['tokens']:,} tokens, "
              f"mean NLL {results['mean_nll']:.4f}, perplexity {results['perplexity']:.2f} "
              f"(unigram baseline {results['unigram_perplexity']:.1f}), "
              f"bits/byte {results['bits_per_byte']:.4f}")
        print(f"model: {results['params']:,} params, KV cache {results['kv_bytes_per_token']} "
              f"bytes/token at 16 bit; results in {output}")


def run():
    cli.start(main)


if __name__ == "__main__":
    run()
