"""Sample continuations from a trained checkpoint through the grouped KV cache.

    python generate.py --workdir=workdir/demo --prompt="ROMEO:" --max_new_tokens=100
    python generate.py --workdir=workdir/demo --prompt_file=prompts.txt --temperature=0
    python generate.py --random_init --config=configs/default.py --prompt="x"   # smoke test
"""
import time

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from cla_jax import cli
from cla_jax.cache import kv_bytes
from cla_jax.data.corpus import corpus_tokenizer
from cla_jax.decoding import Sampling, generate
from cla_jax.errors import UserError
from cla_jax.sampling import seed_key
from cla_jax.storage import as_path

flags.DEFINE_multi_string("prompt", [], "A prompt (repeat the flag for a batch).")
flags.DEFINE_string("prompt_file", None, "A file with one prompt per line.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest usable one).")
flags.DEFINE_integer("max_new_tokens", 100, "Tokens to generate per prompt.")
flags.DEFINE_float("temperature", 0.8, "0 = greedy.")
flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).")
flags.DEFINE_float("top_p", 0.95, "Nucleus sampling mass (1.0 = off).")
flags.DEFINE_integer("seed", 0, "Sampling seed: the same seed gives the same text.")
flags.DEFINE_enum("cache_dtype", None, ["float32", "bfloat16", "float16", "int8"],
                  "KV-cache dtype (default: float32 on CPU, bfloat16 on accelerators; int8: "
                  "quantised K/V with per-token, per-head bfloat16 scales).")
flags.DEFINE_bool("random_init", False, "Use freshly initialised params from --config instead "
                  "of a checkpoint (smoke tests).")
config_flags.DEFINE_config_file("config", None, "With --random_init: the config to build.")
cli.define_mesh_flag()
FLAGS = flags.FLAGS


def main(argv):
    """cla-generate's work once its flags are parsed: samples a continuation of each prompt."""
    texts = list(FLAGS.prompt)
    if FLAGS.prompt_file:
        texts += [line.rstrip("\n") for line in
                  as_path(FLAGS.prompt_file).read_text(encoding="utf-8").splitlines()]
    if not texts or any(not t for t in texts):
        raise UserError("give at least one non-empty --prompt or a --prompt_file")
    sampling = Sampling(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)  # checked at once
    step, config, model, mesh, params = cli.load_model(FLAGS.workdir, FLAGS.step,
                                                       FLAGS.random_init, FLAGS.config,
                                                       FLAGS.seed)
    tokenizer = corpus_tokenizer(config.data, FLAGS.cache_dir, max_vocab_size=model.vocab_size)
    prompts = [[tokenizer.bos_id] + tokenizer.encode(t) for t in texts]
    rng = seed_key(FLAGS.seed)

    def run(new_tokens):
        start = time.perf_counter()
        out = jax.block_until_ready(generate(model, params, prompts, new_tokens, sampling, rng,
                                             tokenizer.stop_ids, FLAGS.cache_dtype, mesh))
        return out, time.perf_counter() - start

    _, compile_s = run(FLAGS.max_new_tokens)  # the first call compiles; time the second
    (tokens, cache), seconds = run(FLAGS.max_new_tokens)
    run(1)
    _, prefill_s = run(1)
    if jax.process_index() != 0:
        return  # every process computed all the tokens; one prints them
    generated = 0
    for text, row in zip(texts, np.asarray(tokens)):
        # A row ends at its first stop id (what follows is filler, whose id 0 may be a real
        # token of an imported model); the stop id counts as generated.
        stops = np.flatnonzero(np.isin(row, tokenizer.stop_ids))
        generated += int(stops[0]) + 1 if len(stops) else len(row)
        row = row[:stops[0]] if len(stops) else row
        print(f"--- {text!r} (step {step})\n{text}{tokenizer.decode(row.tolist())}\n")
    per_token = kv_bytes(cache) // (len(prompts) * cache.max_length)  # scales included
    print(f"{generated} tokens in {seconds:.2f} s ({generated / seconds:.0f} tokens/s; prefill "
          f"{prefill_s * 1e3:.0f} ms; first call with compilation {compile_s:.1f} s); KV cache "
          f"{kv_bytes(cache):,} bytes for {len(prompts)} x {cache.max_length} positions = "
          f"{per_token} bytes/token at {cache.stages[0].key.dtype} "
          f"({model.num_kv_layers} of {model.num_layers} layers cache K/V)")


def run():
    """The cla-generate console script (and `python generate.py`): parses the flags, then
    runs `main`."""
    cli.start(main)


if __name__ == "__main__":
    run()
