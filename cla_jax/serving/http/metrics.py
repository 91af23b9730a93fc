"""/metrics in Prometheus' text format (prometheus_client, one registry per app):

    cla_requests_running / cla_requests_waiting      engine requests in a slot / queued
    cla_queued_tokens                                prompt + max_tokens of the queued ones
    cla_slots, cla_slot_usage_ratio                  the pool, and the share in use
    cla_kv_cache_usage_ratio                         KV positions filled / allocated
    cla_requests_total                               engine requests submitted
    cla_prompt_tokens_total, cla_generation_tokens_total
    cla_generation_tokens_per_second                 over the last WINDOW_S seconds
    cla_requests_finished_total{finish_reason}       stop, length, cancelled, error
    cla_time_to_first_token_seconds                  histogram, submit -> first token
    cla_time_per_output_token_seconds                histogram, mean gap after the first
    cla_request_duration_seconds                     histogram, submit -> last token
"""
from __future__ import annotations

import collections
import time

import prometheus_client as prom

from cla_jax.serving import Batcher, Event, Handle, Request

WINDOW_S = 10.0
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class ServingMetrics:
    """Counts what the server does; gauges read the batcher when scraped."""

    def __init__(self, batcher: Batcher):
        self.registry = prom.CollectorRegistry()
        engine, r = batcher.engine, self.registry
        slots, positions = engine.num_slots, engine.cache_positions
        self._recent: collections.deque[tuple[float, int]] = collections.deque()

        def gauge(name: str, doc: str, read) -> None:
            prom.Gauge(name, doc, registry=r).set_function(read)

        gauge("cla_requests_running", "Engine requests in a slot.", batcher.slots_in_use)
        gauge("cla_requests_waiting", "Engine requests queued for a slot.", batcher.waiting)
        gauge("cla_queued_tokens", "Prompt + max_tokens of the queued requests.",
              batcher.queued_tokens)
        gauge("cla_slots", "Slots in the pool.", lambda: slots)
        gauge("cla_slot_usage_ratio", "Share of the slots in use.",
              lambda: batcher.slots_in_use() / slots)
        gauge("cla_kv_cache_usage_ratio", "KV-cache positions held by running requests / "
              "all positions.", lambda: batcher.cache_positions_used() / positions)
        gauge("cla_generation_tokens_per_second",
              f"Tokens generated per second over the last {WINDOW_S:g} s.",
              self.tokens_per_second)
        self._submitted = prom.Counter("cla_requests", "Engine requests submitted (one per "
                                       "prompt or choice).", registry=r)
        self._prompt_tokens = prom.Counter("cla_prompt_tokens", "Prompt tokens submitted.",
                                           registry=r)
        self._generated = prom.Counter("cla_generation_tokens", "Tokens generated.",
                                       registry=r)
        self._finished = prom.Counter("cla_requests_finished", "Engine requests ended.",
                                      ["finish_reason"], registry=r)
        self._ttft = prom.Histogram("cla_time_to_first_token_seconds",
                                    "From submit to the first token.", registry=r,
                                    buckets=TTFT_BUCKETS)
        self._tpot = prom.Histogram("cla_time_per_output_token_seconds",
                                    "Mean time between a request's tokens after the first.",
                                    registry=r, buckets=TPOT_BUCKETS)
        self._duration = prom.Histogram("cla_request_duration_seconds",
                                        "From submit to the last token.", registry=r,
                                        buckets=DURATION_BUCKETS)

    def on_submit(self, request: Request) -> None:
        self._submitted.inc()
        self._prompt_tokens.inc(len(request.prompt))

    def on_event(self, event: Event, handle: Handle) -> None:
        if event.tokens:
            self._generated.inc(len(event.tokens))
            self._recent.append((time.monotonic(), len(event.tokens)))
            self._forget_old()
        if event.finish_reason is None:
            return
        self._finished.labels(event.finish_reason).inc()
        if event.finish_reason == "error":
            return
        completion = handle.result(0)  # the batcher completes a handle before its last event
        if completion.time_to_first_token is not None:
            self._ttft.observe(completion.time_to_first_token)
            self._duration.observe(completion.token_times[-1] - completion.submitted_at)
        if completion.time_per_output_token is not None:
            self._tpot.observe(completion.time_per_output_token)

    def tokens_per_second(self) -> float:
        self._forget_old()
        return sum(n for _, n in self._recent) / WINDOW_S

    def _forget_old(self) -> None:
        cutoff = time.monotonic() - WINDOW_S
        while self._recent and self._recent[0][0] < cutoff:
            self._recent.popleft()

    def exposition(self) -> bytes:
        return prom.generate_latest(self.registry)
