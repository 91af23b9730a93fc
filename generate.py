"""Sample continuations from a trained checkpoint through the grouped KV cache.

    python generate.py --workdir=workdir/demo --prompt="ROMEO:" --max_new_tokens=100
    python generate.py --workdir=workdir/demo --prompt_file=prompts.txt --temperature=0
"""
import pathlib
import time

import jax
import ml_collections
import numpy as np
from absl import flags, logging
from flax import linen as nn

from cla_jax import checkpoint, cli
from cla_jax.cache import kv_bytes
from cla_jax.config import ModelConfig, kv_bytes_per_token
from cla_jax.data.corpus import prepare_corpus
from cla_jax.decoding import Sampling, generate
from cla_jax.model import abstract_params

flags.DEFINE_multi_string("prompt", [], "A prompt (repeat the flag for a batch).")
flags.DEFINE_string("prompt_file", None, "A file with one prompt per line.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest usable one).")
flags.DEFINE_integer("max_new_tokens", 100, "Tokens to generate per prompt.")
flags.DEFINE_float("temperature", 0.8, "0 = greedy.")
flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).")
flags.DEFINE_float("top_p", 0.95, "Nucleus sampling mass (1.0 = off).")
flags.DEFINE_integer("seed", 0, "Sampling seed: the same seed gives the same text.")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def main(argv):
    logging.set_verbosity(logging.WARNING)
    texts = list(FLAGS.prompt)
    if FLAGS.prompt_file:
        texts += [line.rstrip("\n") for line in
                  pathlib.Path(FLAGS.prompt_file).read_text(encoding="utf-8").splitlines()]
    if not texts or any(not t for t in texts):
        raise ValueError("give at least one non-empty --prompt or a --prompt_file")
    ckpt_dir = pathlib.Path(FLAGS.workdir).expanduser() / "checkpoints"
    step, meta = checkpoint.read_meta(ckpt_dir, FLAGS.step)
    config = ml_collections.ConfigDict(meta["config"])
    model = ModelConfig.from_dict(config.model)
    tokenizer = prepare_corpus(config.data, FLAGS.cache_dir).tokenizer
    params = checkpoint.restore_params(ckpt_dir, step, nn.meta.unbox(abstract_params(model)))
    prompts = [[tokenizer.bos_id] + tokenizer.encode(t) for t in texts]
    sampling = Sampling(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
    rng = jax.random.key(FLAGS.seed)

    start = time.perf_counter()  # The first call compiles; time the second.
    jax.block_until_ready(generate(model, params, prompts, FLAGS.max_new_tokens, sampling, rng,
                                   tokenizer.bos_id))
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    tokens, cache = jax.block_until_ready(generate(
        model, params, prompts, FLAGS.max_new_tokens, sampling, rng, tokenizer.bos_id))
    seconds = time.perf_counter() - start
    tokens = np.asarray(tokens)
    for text, row in zip(texts, tokens):
        end = np.flatnonzero(row == tokenizer.bos_id)
        row = row[:end[0]] if len(end) else row
        print(f"--- {text!r} (step {step})\n{text}{tokenizer.decode(row.tolist())}\n")
    generated = int((tokens != 0).sum())
    print(f"{generated} tokens in {seconds:.2f} s ({generated / seconds:.0f} tokens/s, first "
          f"call with compilation {compile_s:.1f} s); KV cache {kv_bytes(cache):,} bytes for "
          f"{len(prompts)} x {cache.max_length} positions = {kv_bytes_per_token(model, 4)} "
          f"bytes/token at float32 ({model.num_kv_layers} of {model.num_layers} layers cache "
          "K/V)")


if __name__ == "__main__":
    cli.start(main)
