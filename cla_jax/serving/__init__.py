"""Serving: the paged engine (`PagedEngine`: a block pool over the grouped KV cache, chunked
prefill mixed with decode, prefix caching) kept busy by `PagedBatcher`, and the slot engine
(`Engine`: one max_length region per sequence) kept full by `Batcher`. `cla_jax.serving.http`
puts an OpenAI-compatible HTTP API on top (imported only on its own: it needs the `serve`
extra)."""
from cla_jax.serving.batcher import Batcher, Completion, Event, Handle, Request, RequestError
from cla_jax.serving.engine import Engine
from cla_jax.serving.paged_engine import PagedEngine
from cla_jax.serving.scheduler import PagedBatcher

__all__ = ["Batcher", "Completion", "Engine", "Event", "Handle", "PagedBatcher", "PagedEngine",
           "Request", "RequestError"]
