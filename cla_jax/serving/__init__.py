"""Serving: a pool of slots over the grouped KV cache (`Engine`) kept full by continuous
batching (`Batcher`). `cla_jax.serving.http` puts an OpenAI-compatible HTTP API on top
(imported only on its own: it needs the `serve` extra)."""
from cla_jax.serving.batcher import Batcher, Completion, Event, Handle, Request, RequestError
from cla_jax.serving.engine import Engine

__all__ = ["Batcher", "Completion", "Engine", "Event", "Handle", "Request", "RequestError"]
