"""The listening socket and uvicorn over it. uvicorn times out idle keep-alive connections
but not a request whose headers never finish (a client that connects and sends half a
line holds its connection forever), so the protocol here gives each request's headers
`header_timeout` seconds from the connection or the previous response."""
from __future__ import annotations

import asyncio
import socket

import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

from cla_jax.errors import UserError
from cla_jax.serving.http.limits import Limits


def listen(host: str, port: int) -> socket.socket:
    """A listening socket: connections queue from here on, and port 0 gets a free port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as error:
        raise UserError(f"cannot listen on {host}:{port}: {error.strerror or error}; "
                        "pick another --port or --host") from error


def url_of(sock: socket.socket) -> str:
    """The API's base URL on a listening socket: http://host:port/v1."""
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


def header_timeout_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a deadline of `seconds` on each request's headers."""
    class HeaderTimeoutProtocol(H11Protocol):
        """h11 with a deadline on each request's headers."""
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._await_headers()

        def data_received(self, data: bytes) -> None:
            cycle = self.cycle
            super().data_received(data)
            if self.cycle is not cycle:  # a request's headers are in: its cycle started
                self._stop_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._await_headers()  # the next request on this connection

        def connection_lost(self, exc) -> None:
            self._stop_header_timer()
            super().connection_lost(exc)

        def _await_headers(self) -> None:
            self._stop_header_timer()
            self._header_timer = self.loop.call_later(seconds, self._headers_too_slow)

        def _stop_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.cycle is None or self.cycle.response_complete:
                self.transport.close()  # nothing was asked yet: nobody to answer
    return HeaderTimeoutProtocol


def make_server(app: ASGIApp, limits: Limits = Limits()) -> uvicorn.Server:
    """A uvicorn server for `app` with the limits' header and keep-alive timeouts."""
    return uvicorn.Server(uvicorn.Config(
        app, log_level="warning", access_log=False, timeout_graceful_shutdown=5,
        http=header_timeout_protocol(limits.header_timeout),
        timeout_keep_alive=limits.keep_alive_timeout))
