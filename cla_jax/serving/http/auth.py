"""API keys as OpenAI-compatible servers take them: `Authorization: Bearer <key>` on every
/v1 route (a 401 in OpenAI's error shape otherwise); /health and /metrics stay open for load
balancers and Prometheus. A server reachable from other machines must have a key, unless
the operator says explicitly that it need not."""
from __future__ import annotations

import ipaddress
import secrets

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from cla_jax.errors import UserError
from cla_jax.serving.http.errors import ApiError

API_KEY_ENV = "CLA_API_KEY"
PROTECTED_PREFIX = "/v1"


class ApiKeys:
    """ASGI middleware: /v1 requests must carry one of `keys` as a bearer token."""

    def __init__(self, app: ASGIApp, keys: tuple[str, ...]):
        self.app, self.keys = app, tuple(k.encode() for k in keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED_PREFIX):
            refusal = self._refusal(Headers(scope=scope).get("authorization"))
            if refusal is not None:
                await refusal.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, authorization: str | None) -> ApiError | None:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return _unauthorized("no API key given: send it as 'Authorization: Bearer <key>' "
                                 "(the openai client's api_key)")
        given = token.strip().encode()
        # compare_digest of every key: the time taken does not tell how much of a key matched.
        if not any([secrets.compare_digest(given, key) for key in self.keys]):
            return _unauthorized("incorrect API key provided")
        return None


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, message, code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"})


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable only from this machine (localhost, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_exposure(host: str, keys: tuple[str, ...], allow_without_key: bool) -> None:
    """Refuses to listen beyond this machine with no key, unless explicitly allowed."""
    if keys or allow_without_key or is_loopback(host):
        return
    raise UserError(f"--host={host} is reachable from other machines and no API key is set: "
                    f"give --api_key (or the {API_KEY_ENV} environment variable), or pass "
                    "--allow_without_api_key to serve anyone who can connect")
