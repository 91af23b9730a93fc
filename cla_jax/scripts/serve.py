"""An OpenAI-compatible HTTP server over the serving engine: every request, streamed or not,
joins one continuously batched pool of slots.

    python serve.py --workdir=workdir/demo                     # http://127.0.0.1:8000/v1
    python serve.py --workdir=runs/cla2 --num_slots=64 --cache_dtype=int8 --host=0.0.0.0
    python serve.py --random_init --config=configs/default.py  # smoke test, no checkpoint

Endpoints: GET /v1/models, POST /v1/completions (OpenAI's legacy completions API: prompt as a
string, a list of strings, a list of token ids or a list of those; max_tokens, temperature,
top_p, seed, stop, stream, logprobs 0/1, plus `top_k`), GET /health. Bad requests get HTTP 400
with OpenAI's error body.

The ASGI app (`make_app`) is separate from loading, so tests build it over any Batcher; the
flags are defined by `run()`, not on import.
"""
from __future__ import annotations

import asyncio
import json
import math
import socket
import time
import uuid
from typing import AsyncIterator, Callable, Sequence

import jax
import uvicorn
from absl import flags, logging
from ml_collections import config_flags
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from cla_jax import cli, sharding
from cla_jax.data.corpus import corpus_tokenizer
from cla_jax.errors import UserError
from cla_jax.serving import Batcher, Engine, Event, Request
from cla_jax.storage import as_path

FLAGS = flags.FLAGS

MAX_STOP_STRINGS = 4  # as OpenAI


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param


def error_response(message: str, param: str | None = None, status: int = 400,
                   kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                   "code": None}}, status_code=status)


# --- the request body -> engine requests ---------------------------------------------------

def _typed(body: dict, name: str, default, types: tuple, what: str):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise BadRequest(f"{name} must be {what}, got {value!r}", name)
    return value


def _is_token_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                           for t in value)


def _prompts(body: dict, encode: Callable[[str], list[int]]) -> list[list[int]]:
    """OpenAI's four prompt forms as token lists; a text gets BOS in front (the document
    separator the model was trained with), token ids are taken as they are."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [encode(prompt)]
    if _is_token_list(prompt) and prompt:
        return [list(prompt)]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return [encode(p) for p in prompt]
        if all(_is_token_list(p) for p in prompt):
            return [list(p) for p in prompt]
    if prompt is None:
        raise BadRequest("prompt is required (a string, a list of strings, a list of token "
                         "ids, or a list of such lists)", "prompt")
    if prompt == [] or prompt == [[]]:
        raise BadRequest("the prompt is empty; give a string (\"\" = from the start of a "
                         "document) or at least one token id", "prompt")
    raise BadRequest("prompt must be a string, a list of strings, a list of token ids, or a "
                     f"list of such lists, got {json.dumps(prompt)[:80]}", "prompt")


def _refuse_unsupported(body: dict) -> None:
    """Fields we cannot honour are refused, not ignored: a client relying on them would
    otherwise get silently different results."""
    neutral = {"n": 1, "best_of": 1, "echo": False, "suffix": None, "frequency_penalty": 0,
               "presence_penalty": 0, "logit_bias": {}}
    for name, value in neutral.items():
        given = body.get(name)
        if given is not None and (given != value
                                  or isinstance(given, bool) != isinstance(value, bool)):
            raise BadRequest(f"{name}={json.dumps(given)} is not supported by this server "
                             f"(only {json.dumps(value)})", name)


def _param_of(message: str) -> str | None:
    """The field a UserError of Request.check is about (its messages start with it)."""
    if message.startswith(("the prompt", "prompt")):
        return "prompt"
    for name in ("temperature", "top_k", "top_p", "max_tokens", "seed", "stop"):
        if message.startswith(name):
            return name
    return None


def parse_completion_request(body, model_name: str, encode: Callable[[str], list[int]],
                             stop_ids: Sequence[int]) -> tuple[list[Request], dict]:
    """The engine requests (one per prompt) of a /v1/completions body, and the response
    options {stream, include_usage, logprobs}. BadRequest names the first bad field."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if model != model_name:
        raise BadRequest(f"the model {model!r} does not exist; this server serves "
                         f"{model_name!r} (see GET /v1/models)", "model")
    _refuse_unsupported(body)
    prompts = _prompts(body, encode)
    max_tokens = _typed(body, "max_tokens", 16, (int,), "an integer")
    temperature = _typed(body, "temperature", 1.0, (int, float), "a number")
    top_p = _typed(body, "top_p", 1.0, (int, float), "a number")
    top_k = _typed(body, "top_k", 0, (int,), "an integer (0 = off)")
    seed = _typed(body, "seed", None, (int,), "an integer")
    stream = _typed(body, "stream", False, (bool,), "true or false")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest(f"stop must be a non-empty string or a list of them, got "
                         f"{json.dumps(body.get('stop'))[:80]}", "stop")
    if len(stop) > MAX_STOP_STRINGS:
        raise BadRequest(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}",
                         "stop")
    logprobs = _typed(body, "logprobs", None, (int,), "an integer")
    if logprobs is not None and not 0 <= logprobs <= 1:
        raise BadRequest(f"logprobs={logprobs} is not supported: this server returns the "
                         "chosen token's logprob only (logprobs 0 or 1), no alternatives",
                         "logprobs")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise BadRequest("stream_options must be an object", "stream_options")
    include_usage = stream_options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise BadRequest("stream_options.include_usage must be true or false", "stream_options")
    requests = [Request(prompt=p, max_tokens=max_tokens, temperature=float(temperature),
                        top_k=top_k, top_p=float(top_p), seed=seed, stop_ids=tuple(stop_ids),
                        stop=tuple(stop), logprobs=logprobs is not None) for p in prompts]
    return requests, dict(stream=stream, include_usage=include_usage,
                          logprobs=logprobs is not None)


# --- logprobs in OpenAI's shape ------------------------------------------------------------

class LogprobsWriter:
    """tokens / token_logprobs / text_offset of one choice, a few tokens at a time (the offsets
    are into the choice's text: the length of the text of the tokens before)."""

    def __init__(self, decode: Callable[[list[int]], str], stop_ids: Sequence[int]):
        self.decode, self.stop_ids = decode, set(stop_ids)
        self.tokens: list[int] = []

    def add(self, tokens: list[int], logprobs: list[float], text_end: int | None = None
            ) -> dict:
        """text_end: the final text's length, to drop the tokens of a stop string cut off
        it (None while streaming, when it is not known yet)."""
        out = {"tokens": [], "token_logprobs": [], "text_offset": [], "top_logprobs": None}
        for token, logprob in zip(tokens, logprobs):
            offset = len(self.decode(self.tokens))
            self.tokens.append(token)
            if token in self.stop_ids or text_end is not None and offset >= text_end:
                continue
            out["tokens"].append(self.decode([token]))
            out["token_logprobs"].append(logprob if math.isfinite(logprob) else None)
            out["text_offset"].append(offset)
        return out


# --- the app -------------------------------------------------------------------------------

def make_app(batcher: Batcher, tokenizer, model_name: str,
             stop_ids: Sequence[int] | None = None) -> Starlette:
    """The ASGI app over a running `batcher` (its loop started with batcher.start()).

    tokenizer: encode/decode text and bos_id; a text prompt is [bos] + encode(text).
    stop_ids: the ids that end every request (default: the tokenizer's bos and eos, the
    document separators; cla_jax/data/tokenizer.py).
    """
    if stop_ids is None:
        stop_ids = tokenizer.stop_ids
    engine = batcher.engine
    created = int(time.time())
    model_card = {"id": model_name, "object": "model", "created": created,
                  "owned_by": "cla-jax", "max_model_len": engine.max_length}

    def encode(text: str) -> list[int]:
        return [tokenizer.bos_id] + tokenizer.encode(text)

    def submit(requests: list[Request]):
        """The requests' handles, and an async iterator of (choice index, event) as the
        batcher's thread makes them."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def feeder(index):
            def on_event(event):
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, (index, event))
                except RuntimeError:  # the event loop has closed (shutdown): nobody listens
                    pass
            return on_event

        handles = [batcher.submit(r, on_event=feeder(i)) for i, r in enumerate(requests)]

        async def events() -> AsyncIterator[tuple[int, Event]]:
            running = len(handles)
            try:
                while running:
                    index, event = await queue.get()
                    if event.finish_reason == "error":
                        handles[index].result(0)  # raises the serving loop's error
                    running -= event.finish_reason is not None
                    yield index, event
            finally:  # the client went away (or the loop failed): free the slots now
                for handle in handles:
                    batcher.cancel(handle)
        return handles, events()

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async def models(_: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": [model_card]})

    async def model(request: HttpRequest) -> Response:
        if request.path_params["model"] != model_name:
            return error_response(f"the model {request.path_params['model']!r} does not "
                                  f"exist", "model", status=404)
        return JSONResponse(model_card)

    async def health(_: HttpRequest) -> Response:
        return PlainTextResponse("ok")

    async def completions(http: HttpRequest) -> Response:
        try:
            body = json.loads(await http.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return error_response(f"the request body is not valid JSON: {error}")
        try:
            requests, options = parse_completion_request(body, model_name, encode, stop_ids)
            for r in requests:  # all checked before any is queued
                r.check(engine.config.vocab_size, engine.max_length, True)
        except BadRequest as error:
            return error_response(error.message, error.param)
        except UserError as error:
            return error_response(str(error), _param_of(str(error)))
        header = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                  "created": int(time.time()), "model": model_name}
        prompt_tokens = sum(len(r.prompt) for r in requests)
        if options["stream"]:
            return StreamingResponse(stream(requests, options, header, prompt_tokens),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            handles, events = submit(requests)
            async for _ in events:
                pass
            completions = [handle.result(0) for handle in handles]
        except Exception as error:  # noqa: BLE001 (the device failed: say so, keep serving)
            logging.exception("a completion failed")
            return error_response(f"the serving loop failed: {error}", status=500,
                                  kind="server_error")
        choices = [{"text": c.text, "index": i, "finish_reason": c.finish_reason,
                    "logprobs": LogprobsWriter(tokenizer.decode, stop_ids).add(
                        c.tokens, c.logprobs, len(c.text)) if options["logprobs"] else None}
                   for i, c in enumerate(completions)]
        return JSONResponse({**header, "choices": choices, "usage": usage(
            prompt_tokens, sum(len(c.tokens) for c in completions))})

    async def stream(requests, options, header, prompt_tokens) -> AsyncIterator[str]:
        # A client that disconnects closes this generator, and with it `events`, which
        # cancels its requests: their slots take the next ones.
        writers = [LogprobsWriter(tokenizer.decode, stop_ids) for _ in requests]
        completion_tokens = 0
        extra = {"usage": None} if options["include_usage"] else {}
        try:
            _, events = submit(requests)
            async for index, event in events:
                completion_tokens += len(event.tokens)
                if not event.text and event.finish_reason is None and not options["logprobs"]:
                    continue  # tokens whose text is held back (a possible stop string)
                choice = {"text": event.text, "index": index,
                          "finish_reason": event.finish_reason,
                          "logprobs": writers[index].add(event.tokens, event.logprobs)
                          if options["logprobs"] else None}
                yield f"data: {json.dumps({**header, 'choices': [choice], **extra})}\n\n"
        except Exception as error:  # noqa: BLE001 (headers are sent: the error goes in-band)
            logging.exception("a streamed completion failed")
            payload = {"error": {"message": f"the serving loop failed: {error}",
                                 "type": "server_error", "param": None, "code": None}}
            yield f"data: {json.dumps(payload)}\n\n"
            return
        if options["include_usage"]:
            last = {**header, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}
            yield f"data: {json.dumps(last)}\n\n"
        yield "data: [DONE]\n\n"

    return Starlette(routes=[
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", model, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
    ])


def listen(host: str, port: int) -> socket.socket:
    """A listening socket: connections queue from here on, and port 0 gets a free port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as error:
        raise UserError(f"cannot listen on {host}:{port}: {error.strerror or error}; "
                        "pick another --port or --host") from error


def make_server(app: Starlette) -> uvicorn.Server:
    return uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                         timeout_graceful_shutdown=5))


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


def warm_up(batcher: Batcher, everything: bool = True) -> int:
    """Compiles prefill, insert and step before the server takes requests: for every prompt
    bucket and attention window (or only the smallest), so no request waits for XLA while
    the others stall behind it. Returns the number of programs."""
    engine = batcher.engine
    if everything:
        return batcher.warm_up()
    return batcher.warm_up(engine.prompt_buckets[:1], engine.window_buckets[:1])


# --- the command ---------------------------------------------------------------------------

def main(argv):
    if jax.process_count() > 1:
        raise UserError("serve.py runs in one process (one host, any number of its devices); "
                        "drop --distributed")
    step, config, model, mesh, params = cli.load_model(FLAGS.workdir, FLAGS.step,
                                                       FLAGS.random_init, FLAGS.config,
                                                       FLAGS.seed)
    name = FLAGS.model_name or (as_path(FLAGS.workdir).name if FLAGS.workdir
                                and not FLAGS.random_init else "random-init")
    tokenizer = corpus_tokenizer(config.data, FLAGS.cache_dir, max_vocab_size=model.vocab_size)
    cache_dtype = FLAGS.cache_dtype or ("float32" if jax.default_backend() == "cpu"
                                        else "bfloat16")
    engine = Engine(model, params, FLAGS.num_slots, FLAGS.max_length or model.max_seq_len,
                    cache_dtype, mesh)
    batcher = Batcher(engine, decode=tokenizer.decode, steps_per_call=FLAGS.steps_per_call)
    sock = listen(FLAGS.host, FLAGS.port)  # before compiling: a taken port fails at once
    start = time.perf_counter()
    programs = warm_up(batcher, FLAGS.warm_up == "all")
    logging.info("compiled %d programs in %.1f s", programs, time.perf_counter() - start)
    batcher.start()
    print(f"serving {name} (step {step}) at {url_of(sock)}: {engine.num_slots} slots x "
          f"{engine.max_length} tokens, {cache_dtype} KV cache, mesh "
          f"{sharding.describe(mesh)}", flush=True)
    try:
        make_server(make_app(batcher, tokenizer, name)).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down gracefully first, then re-raised Ctrl+C
        pass
    finally:
        batcher.stop()


def define_flags() -> None:
    """The command's flags; defined by `run`, not on import, so that tests (and other
    programs) can import the app without taking the flag names."""
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest usable one).")
    flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0 = every interface).")
    flags.DEFINE_integer("port", 8000, "Port to listen on (0 = any free port; the ready line "
                         "names it).")
    flags.DEFINE_string("model_name", None, "The model's id in the API (default: the workdir's "
                        "name).")
    flags.DEFINE_integer("num_slots", 8, "Sequences decoded together (the KV cache holds "
                         "num_slots x max_length positions).")
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
                         "up to this many - 1 steps longer, and streams come in pieces of it.")
    flags.DEFINE_enum("warm_up", "all", ["all", "smallest"], "Compile every prompt bucket "
                      "and attention window before serving (all), or only the smallest (a "
                      "faster start; larger ones then compile on first use, stalling the batch).")
    cli.define_mesh_flag()


def run():
    define_flags()
    cli.start(main)


if __name__ == "__main__":
    run()
