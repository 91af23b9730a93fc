"""What one client may ask of the server, and the standard answers when it asks too much:

    body over max_body_bytes            413 (refused from Content-Length, before reading)
    body slower than body_timeout       408
    more prompts than max_prompts       400 (it can never fit: retrying would not help)
    queue over max_queued_tokens        429 with Retry-After (it fits once the queue drains)
    request past request_timeout        504, its engine requests cancelled

Headers slower than header_timeout are cut by the listener (listener.py); an idle keep-alive
connection closes after keep_alive_timeout (uvicorn's own).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import math

from starlette.requests import ClientDisconnect
from starlette.requests import Request as HttpRequest

from cla_jax.serving.http.errors import ApiError, bad_request


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one client may ask of the server: body size, prompts per request, queued tokens
    and the time limits (see the flags of cla-serve)."""
    max_body_bytes: int = 4 << 20
    max_prompts: int = 32
    max_queued_tokens: int | None = None   # None: (4 x slots, or max_prompts) x max_length
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    request_timeout: float = 600.0
    keep_alive_timeout: float = 5.0

    def queued_token_cap(self, num_slots: int, max_length: int) -> int:
        if self.max_queued_tokens is not None:
            return self.max_queued_tokens
        return max(4 * num_slots, self.max_prompts) * max_length


class ClientGone(Exception):
    """The client closed its connection: nobody is left to answer."""


async def read_body(http: HttpRequest, limits: Limits) -> bytes:
    """The request body, refused (413) past max_body_bytes and (408) when it does not
    arrive within body_timeout."""
    declared = http.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise _too_large(limits, f"Content-Length is {int(declared):,} bytes")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(limits.body_timeout):
            async for chunk in http.stream():
                size += len(chunk)
                if size > limits.max_body_bytes:
                    raise _too_large(limits, "the body ran past it")
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {limits.body_timeout:g} s "
                            "(--body_timeout)", headers={"Connection": "close"}) from None
    except ClientDisconnect:
        raise ClientGone() from None
    return b"".join(chunks)


def _too_large(limits: Limits, what: str) -> ApiError:
    # Connection: close, so the server need not read (and discard) the rest of the body.
    return ApiError(413, f"the request body is over the limit of {limits.max_body_bytes:,} "
                         f"bytes ({what}); send less, or raise --max_body_bytes",
                    headers={"Connection": "close"})


def parse_json(body: bytes):
    """The body as JSON; a clear 400 for what is not (run off the event loop: json.loads of
    megabytes takes a while)."""
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise bad_request(f"the request body is not valid JSON: {error}") from None
    except RecursionError:
        raise bad_request("the request body nests JSON too deeply") from None


def check_prompt_count(count: int, limits: Limits) -> None:
    """A 400 when a request holds more prompts than --max_prompts."""
    if count > limits.max_prompts:
        raise bad_request(f"{count} prompts in one request; this server takes at most "
                          f"{limits.max_prompts} (--max_prompts): split them over several "
                          "requests", "prompt")


def check_queue(queued: int, asked: int, cap: int, tokens_per_second: float) -> None:
    """Refuses work that would take the queue past `cap` tokens (prompt + max_tokens of every
    waiting request): 400 if it never fits, else 429 with the seconds until it may."""
    if asked > cap:
        raise bad_request(f"this request needs up to {asked:,} tokens (prompts + max_tokens), "
                          f"more than the queue holds ({cap:,}, --max_queued_tokens); ask for "
                          "fewer tokens or prompts", "max_tokens")
    if queued + asked > cap:
        wait = (queued + asked - cap) / tokens_per_second if tokens_per_second > 0 else 1.0
        seconds = min(60, max(1, math.ceil(wait)))
        raise ApiError(429, f"the server is busy: {queued:,} tokens are queued (at most "
                            f"{cap:,}); retry in {seconds} s", code="rate_limit_exceeded",
                       headers={"Retry-After": str(seconds)})
