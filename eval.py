"""Perplexity and bits/byte of a checkpoint over a whole split; writes a JSON file.

    python eval.py --workdir=workdir/demo            # latest checkpoint, validation split
    python eval.py --workdir=workdir/demo --step=400 --split=train
"""
import json
import pathlib

import jax
import ml_collections
from absl import flags, logging

from cla_jax import checkpoint, cli, sharding
from cla_jax.config import ModelConfig, kv_bytes_per_token, num_params
from cla_jax.data import eval_batches, num_eval_batches
from cla_jax.data.corpus import prepare_corpus, unigram_perplexity
from cla_jax.evaluation import evaluate
from cla_jax.train.step import make_eval_step

flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest usable one).")
flags.DEFINE_enum("split", "validation", ["validation", "train"], "Split to evaluate.")
flags.DEFINE_integer("batch_size", None, "Global eval batch size (default: train.batch_size).")
flags.DEFINE_string("output", None, "JSON output (default: <workdir>/eval_<split>_<step>.json).")
cli.define_mesh_flag()
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def main(argv):
    logging.set_verbosity(logging.WARNING)
    ckpt_dir = pathlib.Path(FLAGS.workdir).expanduser() / "checkpoints"
    step, meta = checkpoint.read_meta(ckpt_dir, FLAGS.step)
    config = ml_collections.ConfigDict(meta["config"])
    model = ModelConfig.from_dict(config.model)
    mesh = cli.mesh_for(config)
    seq_len, batch = config.train.seq_len, FLAGS.batch_size or config.train.batch_size
    sharding.check_batch(batch, mesh, "the eval batch size (--batch_size)")
    corpus = prepare_corpus(config.data, FLAGS.cache_dir)
    eval_step = make_eval_step(model, corpus.tokenizer.token_bytes(), mesh)
    params = checkpoint.restore_params_onto(ckpt_dir, step, model, mesh)
    stream = corpus.validation if FLAGS.split == "validation" else corpus.train
    batches = eval_batches(stream, seq_len, batch, *sharding.data_share(mesh))
    results = evaluate(eval_step, params, (sharding.global_batch(b, mesh) for b in batches),
                       num_eval_batches(stream, seq_len, batch))
    results.update(step=step, split=FLAGS.split, mesh=dict(mesh.shape), params=num_params(model),
                   kv_bytes_per_token=kv_bytes_per_token(model),
                   unigram_perplexity=unigram_perplexity(corpus.train, stream,
                                                         corpus.tokenizer.vocab_size))
    output = pathlib.Path(FLAGS.output or ckpt_dir.parent / f"eval_{FLAGS.split}_{step}.json")
    if jax.process_index() == 0:
        output.write_text(json.dumps(results, indent=2) + "\n")
        print(f"step {step} {FLAGS.split}: {results['tokens']:,} tokens, "
              f"mean NLL {results['mean_nll']:.4f}, perplexity {results['perplexity']:.2f} "
              f"(unigram baseline {results['unigram_perplexity']:.1f}), "
              f"bits/byte {results['bits_per_byte']:.4f}")
        print(f"model: {results['params']:,} params, KV cache {results['kv_bytes_per_token']} "
              f"bytes/token at 16 bit; results in {output}")


if __name__ == "__main__":
    cli.start(main)
