"""Every error the server gives, in OpenAI's JSON shape:

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

`ApiError` is raised by handlers; starlette's own 404/405 and any unhandled exception are
turned into the same shape here, so a client (the openai library) always gets a readable
error and a keep-alive connection is not reset by a plain-text 500.
"""
from __future__ import annotations

import json
import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("cla_jax.serving.http")

# OpenAI's `type` per status.
KINDS = {400: "invalid_request_error", 401: "invalid_request_error",
         404: "invalid_request_error", 405: "invalid_request_error",
         408: "invalid_request_error", 413: "invalid_request_error",
         429: "rate_limit_error", 500: "server_error", 503: "server_error",
         504: "server_error"}


class ApiError(Exception):
    """An error response: HTTP status, OpenAI's error fields, extra headers."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": KINDS.get(self.status, "error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def event(self) -> str:
        """The error as a server-sent event: a stream whose headers are sent reports in-band."""
        return f"data: {json.dumps(self.body())}\n\n"


def bad_request(message: str, param: str | None = None) -> ApiError:
    """A 400 ApiError, naming the request field at fault."""
    return ApiError(400, message, param)


async def _api_error(_: Request, error: ApiError) -> JSONResponse:
    return error.response()


async def _http_exception(request: Request, error: HTTPException) -> JSONResponse:
    if error.status_code == 404:
        message = (f"no such endpoint: {request.method} {request.url.path}; this server has "
                   "/v1/models, /v1/completions, /v1/chat/completions, /health and /metrics")
    elif error.status_code == 405:
        allowed = (error.headers or {}).get("Allow", "")
        message = f"{request.method} is not allowed on {request.url.path} (allowed: {allowed})"
    else:
        message = str(error.detail)
    return ApiError(error.status_code, message, headers=error.headers).response()


EXCEPTION_HANDLERS = {ApiError: _api_error, HTTPException: _http_exception}


class UnhandledErrors:
    """ASGI middleware: an exception no handler caught becomes a JSON 500, logged once with
    its traceback and not re-raised, so uvicorn neither logs it again nor drops the
    keep-alive connection. (A stream reports its own errors in-band: running.py.)"""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as error:  # noqa: BLE001 (the last resort: answer, do not crash)
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if not started:
                failure = ApiError(500, f"internal server error: {type(error).__name__}: "
                                        f"{error}"[:500])
                await failure.response()(scope, receive, send)
