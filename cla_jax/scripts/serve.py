"""An OpenAI-compatible HTTP server over the serving engine: every request, streamed or not,
joins one continuously batched pool. The default engine is paged (KV blocks on demand,
chunked prefill mixed with decode, prefix caching); --engine=slots reserves max_length
positions per sequence instead.

    python serve.py --workdir=workdir/demo                     # http://127.0.0.1:8000/v1
    CLA_API_KEY=... python serve.py --workdir=runs/cla2 --num_slots=64 --host=0.0.0.0
    python serve.py --random_init --config=configs/default.py  # smoke test, no checkpoint

Endpoints: GET /v1/models, POST /v1/completions and /v1/chat/completions (streamed or not),
GET /health, GET /metrics. This module is the command line only: the HTTP app and its
server are `cla_jax.serving.http`. The flags are defined by `run()`, not on import.
"""
from __future__ import annotations

import os

import jax
from absl import flags
from ml_collections import config_flags

from cla_jax import cli
from cla_jax.data.corpus import corpus_tokenizer
from cla_jax.errors import UserError
from cla_jax.serving import Batcher, Engine, PagedBatcher, PagedEngine
from cla_jax.storage import as_path

FLAGS = flags.FLAGS


def api_keys() -> tuple[str, ...]:
    """--api_key, else the environment variable; several keys separated by commas."""
    from cla_jax.serving.http.auth import API_KEY_ENV  # noqa: PLC0415 (server-only imports)
    given = FLAGS.api_key if FLAGS.api_key is not None else os.environ.get(API_KEY_ENV, "")
    return tuple(k.strip() for k in given.split(",") if k.strip())


def limits_from_flags():
    """The server's `Limits` from the flags, each checked to be positive."""
    from cla_jax.serving.http.limits import Limits  # noqa: PLC0415
    limits = Limits(max_body_bytes=FLAGS.max_body_bytes, max_prompts=FLAGS.max_prompts,
                    max_queued_tokens=FLAGS.max_queued_tokens,
                    header_timeout=FLAGS.header_timeout, body_timeout=FLAGS.body_timeout,
                    request_timeout=FLAGS.request_timeout)
    for name in ("max_body_bytes", "max_prompts", "header_timeout", "body_timeout",
                 "request_timeout"):
        if getattr(limits, name) <= 0:
            raise UserError(f"--{name} must be > 0, got {getattr(limits, name)}")
    if limits.max_queued_tokens is not None and limits.max_queued_tokens <= 0:
        raise UserError(f"--max_queued_tokens must be > 0, got {limits.max_queued_tokens}")
    return limits


def make_batcher(model, params, cache_dtype: str, mesh, decode) -> Batcher:
    """The engine the flags ask for, and its loop. The paged pool defaults to the slot
    engine's memory: num_slots x max_length positions (+ the null block)."""
    max_length = FLAGS.max_length or model.max_seq_len
    if FLAGS.num_slots < 1:
        raise UserError(f"--num_slots must be >= 1, got {FLAGS.num_slots}")
    if FLAGS.engine == "slots":
        return Batcher(Engine(model, params, FLAGS.num_slots, max_length, cache_dtype, mesh),
                       decode=decode, steps_per_call=FLAGS.steps_per_call)
    num_blocks = FLAGS.num_blocks or -(-FLAGS.num_slots * max_length // FLAGS.block_size) + 1
    engine = PagedEngine(model, params, num_blocks, FLAGS.block_size, max_length,
                         max_seqs=FLAGS.max_seqs or 4 * FLAGS.num_slots, cache_dtype=cache_dtype,
                         mesh=mesh, chunk_tokens=FLAGS.chunk_tokens)
    return PagedBatcher(engine, decode=decode, steps_per_call=FLAGS.steps_per_call,
                        prefix_caching=FLAGS.prefix_caching, overcommit=FLAGS.overcommit)


def main(argv):
    """The flags -> a model, its engine and batcher -> `cla_jax.serving.http.server.serve`."""
    from cla_jax.serving.http.auth import check_exposure  # noqa: PLC0415 (starlette etc.)
    from cla_jax.serving.http.chat import ChatTemplate  # noqa: PLC0415
    from cla_jax.serving.http.server import serve  # noqa: PLC0415
    if jax.process_count() > 1:
        raise UserError("serve.py runs in one process (one host, any number of its devices); "
                        "drop --distributed")
    keys, limits = api_keys(), limits_from_flags()
    check_exposure(FLAGS.host, keys, FLAGS.allow_without_api_key)  # before loading anything
    step, config, model, mesh, params = cli.load_model(FLAGS.workdir, FLAGS.step,
                                                       FLAGS.random_init, FLAGS.config,
                                                       FLAGS.seed)
    name = FLAGS.model_name or (as_path(FLAGS.workdir).name if FLAGS.workdir
                                and not FLAGS.random_init else "random-init")
    tokenizer = corpus_tokenizer(config.data, FLAGS.cache_dir, max_vocab_size=model.vocab_size)
    template = ChatTemplate.of_tokenizer(tokenizer, FLAGS.chat_template)
    cache_dtype = FLAGS.cache_dtype or ("float32" if jax.default_backend() == "cpu"
                                        else "bfloat16")
    batcher = make_batcher(model, params, cache_dtype, mesh, tokenizer.decode)
    serve(batcher, tokenizer, name, host=FLAGS.host, port=FLAGS.port, api_keys=keys,
          limits=limits, chat_template=template, warm_up_everything=FLAGS.warm_up == "all",
          description=f"(step {step})")


def define_flags() -> None:
    """The command's flags; defined by `run`, not on import, so that tests (and other
    programs) can import the app without taking the flag names."""
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest usable one).")
    flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0 = every interface).")
    flags.DEFINE_integer("port", 8000, "Port to listen on (0 = any free port; the ready line "
                         "names it).")
    flags.DEFINE_string("model_name", None, "The model's id in the API (default: the workdir's "
                        "name).")
    flags.DEFINE_enum("engine", "paged", ["paged", "slots"], "paged: KV blocks on demand, "
                      "chunked prefill mixed with decode, prefix caching; slots: num_slots "
                      "regions of max_length positions, one prompt prefilled at a time.")
    flags.DEFINE_integer("num_slots", 8, "The KV memory, in sequences of max_length: the slot "
                         "engine's slots, and the paged pool's size unless --num_blocks is "
                         "given.")
    flags.DEFINE_integer("num_blocks", None, "Paged engine: KV blocks in the pool (default: "
                         "num_slots x max_length / block_size, + 1 null block).")
    flags.DEFINE_integer("block_size", 16, "Paged engine: positions per KV block (a power of "
                         "two).")
    flags.DEFINE_integer("max_seqs", None, "Paged engine: most sequences running at once "
                         "(default 4 x num_slots); free blocks usually bound them first.")
    flags.DEFINE_integer("chunk_tokens", 256, "Paged engine: prompt tokens prefilled per step, "
                         "beside the decoding sequences' tokens.")
    flags.DEFINE_bool("prefix_caching", True, "Paged engine: reuse the KV blocks of prompt "
                      "prefixes seen before.")
    flags.DEFINE_bool("overcommit", True, "Paged engine: admit a request when its prompt fits "
                      "(and preempt, recomputing later, when sequences outgrow the pool); "
                      "--noovercommit admits only what can run to max_tokens.")
    flags.DEFINE_integer("max_length", None, "Context length of a slot: prompt + max_tokens "
                         "(default: model.max_seq_len).")
    flags.DEFINE_enum("cache_dtype", None, ["float32", "bfloat16", "float16", "int8"],
                      "KV-cache dtype (default: float32 on CPU, bfloat16 on accelerators).")
    flags.DEFINE_bool("random_init", False, "Serve freshly initialised params from --config "
                      "instead of a checkpoint (smoke tests).")
    flags.DEFINE_integer("seed", 0, "With --random_init: the init seed.")
    config_flags.DEFINE_config_file("config", None, "With --random_init: the config to build.")
    flags.DEFINE_integer("steps_per_call", 4, "Decode steps per device call: more spreads the "
                         "host round trip over more tokens; a finished request holds its slot "
                         "up to this many - 1 steps longer. Streams send one chunk per token, "
                         "in bursts of this many.")
    flags.DEFINE_string("api_key", None, "The key clients must send as 'Authorization: "
                        "Bearer <key>' on /v1 routes (several: comma-separated). Default: the "
                        "CLA_API_KEY environment variable; neither = no key.")
    flags.DEFINE_bool("allow_without_api_key", False, "Serve a --host reachable from other "
                      "machines without an API key (refused otherwise).")
    flags.DEFINE_string("chat_template", None, "A Jinja chat template file for "
                        "/v1/chat/completions (default: the tokenizer directory's "
                        "chat_template.jinja or tokenizer_config.json).")
    flags.DEFINE_integer("max_body_bytes", 4 << 20, "Largest request body (413 above).")
    flags.DEFINE_integer("max_prompts", 32, "Most prompts in one request (400 above).")
    flags.DEFINE_integer("max_queued_tokens", None, "Most tokens (prompt + max_tokens) queued "
                         "for a slot; a request past it gets 429 with Retry-After (default: "
                         "max(4 x num_slots, max_prompts) x max_length).")
    flags.DEFINE_float("header_timeout", 10.0, "Seconds a client has to send a request's "
                       "headers (the connection is closed after).")
    flags.DEFINE_float("body_timeout", 30.0, "Seconds a client has to send a request's body "
                       "(408 after).")
    flags.DEFINE_float("request_timeout", 600.0, "Seconds a request may run, queue included "
                       "(504 after; its generation is cancelled).")
    flags.DEFINE_enum("warm_up", "all", ["all", "smallest"], "Compile every prompt bucket "
                      "and attention window before serving (all), or only the smallest (a "
                      "faster start; larger ones then compile on first use, stalling the batch).")
    cli.define_mesh_flag()


def run():
    """The cla-serve console script (and `python serve.py`): defines the flags, then runs."""
    define_flags()
    cli.start(main)


if __name__ == "__main__":
    run()
