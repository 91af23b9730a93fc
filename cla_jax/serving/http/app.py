"""The ASGI app: OpenAI's completions and chat completions APIs over a running Batcher.

    GET  /v1/models, /v1/models/{id}
    POST /v1/completions, /v1/chat/completions      (stream: server-sent events)
    GET  /health, /metrics

Every engine request of an HTTP request is cancelled when that request ends early: its
client disconnects (streamed or not), or it runs past the deadline.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import AsyncIterator, Callable, Sequence

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from cla_jax.serving import Batcher, Request, RequestError
from cla_jax.serving.http import chat, completions
from cla_jax.serving.http import limits as limits_lib
from cla_jax.serving.http.auth import ApiKeys
from cla_jax.serving.http.errors import (EXCEPTION_HANDLERS, ApiError, UnhandledErrors,
                                         bad_request, log)
from cla_jax.serving.http.limits import ClientGone, Limits
from cla_jax.serving.http.metrics import ServingMetrics
from cla_jax.serving.http.running import Submission, deadline_error, unless_client_leaves


def make_app(batcher: Batcher, tokenizer, model_name: str,
             stop_ids: Sequence[int] | None = None, api_keys: Sequence[str] = (),
             limits: Limits = Limits(), chat_template: chat.ChatTemplate | None = None
             ) -> Starlette:
    """The ASGI app over a running `batcher` (its loop started with batcher.start()).

    tokenizer: encode/decode text and bos_id; a completions text prompt is [bos] +
    encode(text). stop_ids: the ids that end every completion (default: the tokenizer's).
    api_keys: if any, /v1 routes need one as a bearer token. chat_template: what renders
    chat messages (None: /v1/chat/completions answers 400).
    """
    stop_ids = tuple(tokenizer.stop_ids if stop_ids is None else stop_ids)
    engine = batcher.engine
    metrics = ServingMetrics(batcher)
    queue_cap = limits.queued_token_cap(engine.num_slots, engine.max_length)
    model_card = {"id": model_name, "object": "model", "created": int(time.time()),
                  "owned_by": "cla-jax", "max_model_len": engine.max_length}

    def encode_completion(text: str) -> list[int]:
        return [tokenizer.bos_id] + tokenizer.encode(text)

    def parse_completion(body: bytes):
        return completions.parse(limits_lib.parse_json(body), model_name, encode_completion,
                                 stop_ids, lambda n: limits_lib.check_prompt_count(n, limits))

    def parse_chat(body: bytes):
        return chat.parse(limits_lib.parse_json(body), model_name, chat_template,
                          tokenizer.encode)

    def admit(requests: list[Request]) -> None:
        for r in requests:  # all checked before any is queued
            try:
                r.check(engine.config.vocab_size, engine.max_length, True)
            except RequestError as error:
                raise bad_request(str(error), error.param) from None
        limits_lib.check_queue(batcher.queued_tokens(), sum(r.tokens_to_run for r in requests),
                               queue_cap, metrics.tokens_per_second())

    def endpoint(parse: Callable, fmt) -> Callable:
        async def handle(http: HttpRequest) -> Response:
            try:
                body = await limits_lib.read_body(http, limits)
                # JSON parsing and tokenizing take long for big bodies: off the event loop.
                requests, options = await run_in_threadpool(parse, body)
                admit(requests)
            except ClientGone:
                return Response(status_code=499)  # nobody reads it
            header = {"id": f"{fmt.id_prefix}-{uuid.uuid4().hex}",
                      "created": int(time.time()), "model": model_name}
            if options.stream:
                return StreamingResponse(stream(requests, options, header, fmt),
                                         media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
            try:
                return JSONResponse(await unless_client_leaves(
                    whole(requests, options, header, fmt), http))
            except ClientGone:
                return Response(status_code=499)
        return handle

    async def whole(requests: list[Request], options, header: dict, fmt) -> dict:
        try:
            async with asyncio.timeout(limits.request_timeout):
                done = await Submission(batcher, metrics, requests).completions()
        except TimeoutError:
            raise deadline_error(limits.request_timeout) from None
        except RuntimeError as error:  # the serving loop failed: say so, keep serving
            log.exception("a completion failed")
            raise ApiError(500, f"the serving loop failed: {error}") from None
        choices = [fmt.choice(i, c, completions.LogprobsWriter(tokenizer.decode, stop_ids).add(
                       c.tokens, c.logprobs, len(c.text), final=True)
                   if options.logprobs else None) for i, c in enumerate(done)]
        return {**header, "object": fmt.object_name, "choices": choices,
                "usage": usage(sum(len(r.prompt) for r in requests),
                               sum(len(c.tokens) for c in done))}

    async def stream(requests: list[Request], options, header: dict, fmt
                     ) -> AsyncIterator[str]:
        # A client that disconnects closes this generator, and with it the submission's
        # events, which cancels its requests: their slots take the next ones.
        header = {**header, "object": fmt.chunk_object_name}
        extra = {"usage": None} if options.include_usage else {}
        writers = [completions.LogprobsWriter(tokenizer.decode, stop_ids) for _ in requests]
        generated = 0

        def chunk(choices: list[dict]) -> str:
            return f"data: {json.dumps({**header, 'choices': choices, **extra})}\n\n"

        # The deadline guards each wait for an event, not the yields: a timeout must not
        # fire while the response is writing a chunk outside this generator.
        deadline = asyncio.get_running_loop().time() + limits.request_timeout
        try:
            submission = Submission(batcher, metrics, requests)
            events = submission.events()
            try:
                for opening in fmt.opening_chunks(len(requests)):
                    yield chunk([opening])
                while True:
                    try:
                        async with asyncio.timeout_at(deadline):
                            index, event = await anext(events)
                    except StopAsyncIteration:
                        break
                    generated += len(event.tokens)
                    final = event.finish_reason is not None
                    entries = writers[index].add(event.tokens, event.logprobs,
                                                 len(event.text), final) \
                        if options.logprobs else None
                    if event.text or final or entries:
                        yield chunk([fmt.chunk_choice(index, event.text, event.finish_reason,
                                                      entries)])
            finally:
                await events.aclose()
                submission.cancel()  # also when the events never started
        except TimeoutError:
            yield deadline_error(limits.request_timeout).event()
            return
        except Exception as error:  # noqa: BLE001 (headers are sent: the error goes in-band)
            log.exception("a streamed completion failed")
            yield ApiError(500, f"the serving loop failed: {error}").event()
            return
        if options.include_usage:
            last = {**header, "choices": [], "usage": usage(
                sum(len(r.prompt) for r in requests), generated)}
            yield f"data: {json.dumps(last)}\n\n"
        yield "data: [DONE]\n\n"

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async def models(_: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": [model_card]})

    async def model(request: HttpRequest) -> Response:
        if request.path_params["model"] != model_name:
            raise ApiError(404, f"the model {request.path_params['model']!r} does not exist",
                           "model", code="model_not_found")
        return JSONResponse(model_card)

    async def health(_: HttpRequest) -> Response:
        return PlainTextResponse("ok")

    async def prometheus(_: HttpRequest) -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4")

    middleware = [Middleware(UnhandledErrors)]
    if api_keys:
        middleware.append(Middleware(ApiKeys, keys=tuple(api_keys)))
    app = Starlette(routes=[
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", model, methods=["GET"]),
        Route("/v1/completions", endpoint(parse_completion, completions.Format),
              methods=["POST"]),
        Route("/v1/chat/completions", endpoint(parse_chat, chat.Format), methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ], middleware=middleware, exception_handlers=EXCEPTION_HANDLERS)
    app.state.metrics = metrics
    return app
