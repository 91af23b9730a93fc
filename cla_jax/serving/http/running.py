"""One HTTP request's engine requests, from the event loop: their events as the batcher's
thread makes them, and their cancellation whenever the HTTP request ends early (the client
left, the deadline passed, an error), so no slot decodes for nobody."""
from __future__ import annotations

import asyncio
from typing import AsyncIterator, Awaitable, TypeVar

from starlette.requests import Request as HttpRequest

from cla_jax.serving import Batcher, Completion, Event, Handle, Request
from cla_jax.serving.http.errors import ApiError
from cla_jax.serving.http.limits import ClientGone
from cla_jax.serving.http.metrics import ServingMetrics

T = TypeVar("T")


class Submission:
    """The engine requests of one HTTP request, submitted together."""

    def __init__(self, batcher: Batcher, metrics: ServingMetrics, requests: list[Request]):
        self._batcher, self._metrics = batcher, metrics
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self.handles: list[Handle] = []
        try:
            for index, request in enumerate(requests):
                self.handles.append(batcher.submit(request, on_event=self._feeder(index)))
                metrics.on_submit(request)
        except BaseException:
            self.cancel()
            raise

    def _feeder(self, index: int):
        def on_event(event: Event) -> None:  # on the batcher's thread
            try:
                self._loop.call_soon_threadsafe(self._deliver, index, event)
            except RuntimeError:  # the event loop has closed (shutdown): nobody listens
                pass
        return on_event

    def _deliver(self, index: int, event: Event) -> None:
        # Counted even after the client has left: the work was done.
        self._metrics.on_event(event, self.handles[index])
        self._queue.put_nowait((index, event))

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """(choice index, event) as they come, until every request has finished. Leaving
        early (the consumer closes this or is cancelled) cancels those still running."""
        running = len(self.handles)
        try:
            while running:
                index, event = await self._queue.get()
                if event.finish_reason == "error":
                    self.handles[index].result(0)  # raises the request's (or the loop's) error
                running -= event.finish_reason is not None
                yield index, event
        finally:
            self.cancel()

    async def completions(self) -> list[Completion]:
        """Every request's completion, once all have finished."""
        stream = self.events()
        try:
            async for _ in stream:
                pass
        finally:
            await stream.aclose()
        return [handle.result(0) for handle in self.handles]

    def cancel(self) -> None:
        """Frees the slots of the requests still waiting or running (no-op for the rest)."""
        for handle in self.handles:
            self._batcher.cancel(handle)


async def unless_client_leaves(work: Awaitable[T], http: HttpRequest) -> T:
    """`work`, cancelled (ClientGone) if the client closes its connection first. The body has
    been read, so the next ASGI message can only be the disconnect."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(http))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise ClientGone()
    finally:
        for pending in (task, watcher):
            pending.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)


async def _disconnected(http: HttpRequest) -> None:
    while (await http.receive())["type"] != "http.disconnect":
        pass


def deadline_error(seconds: float) -> ApiError:
    """The 504 ApiError of a request cancelled at the server's deadline."""
    return ApiError(504, f"the request ran past the server's deadline of {seconds:g} s "
                         "(--request_timeout) and was cancelled; ask for fewer tokens",
                    code="timeout")
