"""Continuous batching: requests join the pool's free slots as soon as one frees, and leave it
the step they finish (a stop id, a stop string or max_tokens), so no slot waits for the
slowest sequence of a batch.

    batcher = Batcher(engine, tokenizer.decode)
    handle = batcher.submit(Request(prompt=ids, max_tokens=64, temperature=0.7, stop=("\\n\\n",)))
    batcher.start()                       # a background thread runs the loop (or: run_until_idle)
    for event in handle: print(event.text, end="")   # streamed as tokens come
    completion = handle.result()

Each loop iteration prefills waiting requests into free slots (one prefill per request, its
prompt padded to a bucket), then runs `steps_per_call` decode steps for every active slot in
one device call.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import queue
import secrets
import threading
import time
from typing import Callable, Iterator, Sequence

import jax
import numpy as np
from absl import logging

from cla_jax.errors import UserError
from cla_jax.sampling import Sampling
from cla_jax.serving.engine import Engine, bucket_for

MAX_SEED = 2**63 - 1


class RequestError(UserError):
    """A request argument is bad; `param` names it (the HTTP server reports it)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclasses.dataclass(frozen=True)
class Request:
    """One completion request. temperature 0 = greedy; top_k 0 / top_p 1 = off; seed None =
    a random one. The stop ids end a sequence and stay in its tokens (not in its text); a stop
    string ends it and is cut from its text."""
    prompt: Sequence[int]
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: Sequence[int] = ()
    stop: Sequence[str] = ()
    logprobs: bool = False

    def check(self, vocab_size: int, max_length: int, decodes_text: bool) -> None:
        """One RequestError naming the first bad argument (its `param`)."""
        try:
            Sampling(self.temperature, self.top_k, self.top_p).check_vocab(vocab_size)
        except UserError as error:
            raise RequestError(str(error), str(error).split()[0]) from None
        prompt = list(self.prompt)
        if not prompt:
            raise RequestError("the prompt is empty; give at least one token (e.g. BOS)",
                               "prompt")
        if not all(isinstance(t, (int, np.integer)) and 0 <= t < vocab_size for t in prompt):
            bad = sorted({t for t in prompt
                          if not (isinstance(t, (int, np.integer)) and 0 <= t < vocab_size)},
                         key=repr)
            raise RequestError(f"prompt token ids {bad[:5]} are outside the vocabulary "
                               f"[0, {vocab_size})", "prompt")
        if (not isinstance(self.max_tokens, (int, np.integer)) or isinstance(self.max_tokens, bool)
                or self.max_tokens < 1):
            raise RequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}",
                               "max_tokens")
        if len(prompt) + self.max_tokens > max_length:
            # The prompt is at fault only when it leaves no room at all; else max_tokens is.
            raise RequestError(
                f"the prompt ({len(prompt)} tokens) + max_tokens ({self.max_tokens}) exceeds "
                f"the context length {max_length}; shorten the prompt or ask for at most "
                f"{max(max_length - len(prompt), 0)} tokens",
                "prompt" if len(prompt) >= max_length else "max_tokens")
        if self.seed is not None and (not isinstance(self.seed, (int, np.integer))
                                      or isinstance(self.seed, bool)
                                      or not 0 <= self.seed <= MAX_SEED):
            raise RequestError(f"seed must be an integer in [0, 2^63), got {self.seed!r}",
                               "seed")
        if not all(isinstance(t, (int, np.integer)) and 0 <= t < vocab_size
                   for t in self.stop_ids):
            raise RequestError(f"stop ids must be token ids in [0, {vocab_size}), got "
                               f"{list(self.stop_ids)}", "stop")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise RequestError(f"stop strings must be non-empty strings, got "
                               f"{list(self.stop)!r}", "stop")
        if self.stop and not decodes_text:
            raise RequestError("stop strings need a tokenizer to decode the text; this server "
                               "has none (use stop ids)", "stop")

    @property
    def tokens_to_run(self) -> int:
        """Positions this request may fill: what it costs the pool, at most."""
        return len(self.prompt) + self.max_tokens


@dataclasses.dataclass
class Event:
    """What one step added to a request; the last event has a finish_reason."""
    request_id: int
    tokens: list[int]
    logprobs: list[float]
    text: str
    # "stop" | "length" | "cancelled" | "error" (the loop failed: `Handle.result` raises
    # its error) | None while running
    finish_reason: str | None = None


@dataclasses.dataclass
class Completion:
    """A finished request: its tokens, their logprobs, the decoded text, why it stopped
    (finish_reason) and when each token reached the host."""
    request_id: int
    prompt_tokens: int
    tokens: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
    submitted_at: float
    token_times: list[float]  # time.perf_counter() when each token reached the host

    @property
    def time_to_first_token(self) -> float | None:
        return self.token_times[0] - self.submitted_at if self.token_times else None

    @property
    def time_per_output_token(self) -> float | None:
        if len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)


class Handle:
    """A submitted request: iterate it for its events as they come, or wait for `result()`."""

    def __init__(self, request_id: int):
        self.request_id = request_id
        self._events: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._completion: Completion | None = None
        self._error: BaseException | None = None

    def __iter__(self) -> Iterator[Event]:
        while True:
            event = self._events.get()
            if isinstance(event, BaseException):
                raise event
            yield event
            if event.finish_reason is not None:
                return

    def result(self, timeout: float | None = None) -> Completion:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish in {timeout} s")
        if self._error is not None:
            raise self._error
        return self._completion

    def done(self) -> bool:
        return self._done.is_set()


@dataclasses.dataclass
class _Running:
    request: Request
    handle: Handle
    on_event: Callable[[Event], None] | None
    submitted_at: float
    length: int = 0                   # cache positions filled (a host copy of cache.lengths)
    tokens: list = dataclasses.field(default_factory=list)
    logprobs: list = dataclasses.field(default_factory=list)
    token_times: list = dataclasses.field(default_factory=list)
    sent_tokens: int = 0
    sent_text: int = 0
    # The paged loop's bookkeeping (cla_jax.serving.scheduler): the blocks held, positions
    # computed, prefix keys of the full blocks, how many are in the prefix cache, admission
    # order.
    blocks: list = dataclasses.field(default_factory=list)
    computed: int = 0
    keys: list = dataclasses.field(default_factory=list)
    registered: int = 0
    admission: int = 0
    key_data: np.ndarray | None = None


class Batcher:
    """The host loop over an Engine's slots. `decode` (token ids -> text) enables text output
    and stop strings. steps_per_call: decode steps per device call (the host reads tokens,
    checks stops and streams once per call; see cla_jax.serving.engine)."""

    def __init__(self, engine: Engine, decode: Callable[[list[int]], str] | None = None,
                 steps_per_call: int = 4):
        if steps_per_call < 1:
            raise UserError(f"steps_per_call must be >= 1, got {steps_per_call}")
        self.engine = engine
        self.steps_per_call = steps_per_call
        self.decode = decode
        self.state = engine.init_state()
        self.slots: list[_Running | None] = [None] * engine.num_slots
        self._waiting: collections.deque[_Running] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._cancelled: set[int] = set()
        self._failure: BaseException | None = None
        self._admitting: _Running | None = None  # between the queue and a slot
        self.steps = 0                # decode steps run
        self.slot_steps = 0           # sum over steps of the slots in use
        self.max_running = 0          # most requests in a slot at once

    # --- submitting ---------------------------------------------------------------------

    def submit(self, request: Request, on_event: Callable[[Event], None] | None = None
               ) -> Handle:
        """Checks the request (RequestError at once if bad) and queues it. on_event, if given,
        is called from the loop's thread with every event (e.g. to feed an asyncio queue)."""
        request.check(self.engine.config.vocab_size, self.engine.max_length,
                      self.decode is not None)
        if request.seed is None:
            request = dataclasses.replace(request, seed=secrets.randbits(63))
        handle = Handle(next(self._ids))
        with self._wake:
            # Under the lock that the failure handler takes to empty the queue: a request is
            # either refused here or failed there, never queued after the queue was emptied.
            if self._failure is not None:
                raise RuntimeError(f"the serving loop stopped after an error: "
                                   f"{self._failure!r}")
            self._waiting.append(_Running(request, handle, on_event, time.perf_counter()))
            self._wake.notify()
        return handle

    def cancel(self, handle: Handle) -> None:
        """Ends a request early (finish_reason "cancelled", tokens so far kept): a waiting one
        never runs, a running one leaves its slot before the next step. Thread-safe."""
        with self._wake:
            if not handle.done():
                self._cancelled.add(handle.request_id)
                self._wake.notify()

    @property
    def busy(self) -> bool:
        return bool(self._waiting) or any(s is not None for s in self.slots)

    def slots_in_use(self) -> int:
        return sum(s is not None for s in self.slots)

    def waiting(self) -> int:
        """Requests queued for a slot (a cancelled one no longer counts)."""
        return len(self._queued())

    def queued_tokens(self) -> int:
        """Prompt + max_tokens of every queued request: the work waiting for a slot."""
        return sum(r.request.tokens_to_run for r in self._queued())

    def _queued(self) -> list[_Running]:
        with self._lock:
            return [r for r in self._waiting if r.handle.request_id not in self._cancelled]

    def cache_positions_used(self) -> int:
        """KV-cache positions the running requests fill (of num_slots x max_length)."""
        return sum(s.length for s in list(self.slots) if s is not None)

    # --- the loop -----------------------------------------------------------------------

    def step_once(self) -> bool:
        """Admits waiting requests into free slots, then runs one device call of
        `steps_per_call` decode steps. Returns whether any request is still waiting or
        running."""
        self._drop_cancelled()
        self._admit()
        self.max_running = max(self.max_running, self.slots_in_use())
        active = [s is not None for s in self.slots]
        if any(active):
            self._decode_step(active)
        return self.busy

    def warm_up(self, prompt_buckets=None, windows=None) -> int:
        """Compiles prefill and insert for each prompt bucket and the step for each window
        (default: all), so no request waits for XLA later. Only while idle; returns the number
        of programs run."""
        if self.busy:
            raise RuntimeError("warm_up runs only while no request is waiting or running")
        engine, count = self.engine, 0
        idle = [False] * engine.num_slots
        for bucket in prompt_buckets or engine.prompt_buckets:
            prefix = engine.prefill([0] * bucket)
            np.asarray(prefix.token), np.asarray(prefix.logprob)
            self.state = engine.insert(self.state, prefix, 0)  # a free slot: harmless
            count += 2
        for window in windows or engine.window_buckets:
            # No slot active: every write is dropped and the tokens are ignored.
            self.state, tokens, _ = engine.step(self.state, idle, window, self.steps_per_call)
            np.asarray(tokens)
            count += 1
        return count

    def run_until_idle(self) -> None:
        while self.step_once():
            pass

    def start(self) -> None:
        """Runs the loop on a background thread until `stop()`."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._serve, name="cla-batcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            with self._wake:
                self._stopping = True
                self._wake.notify()
            self._thread.join()
            self._thread = None

    def _serve(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._stopping and not self.busy:
                        self._wake.wait()
                    if self._stopping:
                        return
                self.step_once()
        except BaseException as error:  # the device failed: every caller hears of it
            logging.exception("the serving loop failed")
            with self._lock:
                self._failure = error
                everyone = list(self._waiting) + [s for s in self.slots if s is not None]
                self._waiting.clear()
            if self._admitting is not None:  # popped from the queue, not yet in a slot
                everyone.append(self._admitting)
            self.slots = [None] * len(self.slots)
            for running in everyone:
                self._fail(running, error)
            raise

    @staticmethod
    def _fail(running: _Running, error: BaseException) -> None:
        """Ends one request with `error`: `Handle.result` and its iterator raise it."""
        if running.handle.done():
            return
        running.handle._error = error
        running.handle._events.put(error)
        running.handle._done.set()
        if running.on_event is not None:
            running.on_event(Event(running.handle.request_id, [], [], "", "error"))

    def _drop_cancelled(self) -> None:
        with self._lock:
            if not self._cancelled:
                return
            cancelled, self._cancelled = self._cancelled, set()
            dropped = [r for r in self._waiting if r.handle.request_id in cancelled]
            for running in dropped:
                self._waiting.remove(running)
        for slot, running in enumerate(self.slots):
            if running is not None and running.handle.request_id in cancelled:
                self._vacate(slot)
                dropped.append(running)
        for running in dropped:
            try:
                self._finish(running, "cancelled", self._text(running, False)[0])
            except Exception as error:  # noqa: BLE001 (e.g. decode): this request's, not all
                self._fail(running, error)

    def _vacate(self, slot: int) -> None:
        """Frees a slot (the paged loop also returns its sequence's blocks)."""
        self.slots[slot] = None

    def _admit(self) -> None:
        for slot, occupant in enumerate(self.slots):
            if occupant is not None:
                continue
            with self._lock:
                if not self._waiting:
                    return
                running = self._admitting = self._waiting.popleft()
            try:
                self._prefill_into(slot, running)
            except Exception as error:  # noqa: BLE001 (that request's failure, not the pool's)
                if self._state_lost():
                    # The pool's cache went with it: the loop fails, and its handler fails
                    # everyone, this request (still `_admitting`) included.
                    raise
                logging.exception("request %d failed to start", running.handle.request_id)
                self._vacate(slot)
                self._fail(running, error)
            self._admitting = None

    def _prefill_into(self, slot: int, running: _Running) -> None:
        r = running.request
        prefix = self.engine.prefill(list(r.prompt), r.temperature, r.top_k, r.top_p, r.seed)
        token, logprob = int(np.asarray(prefix.token)[0]), float(np.asarray(prefix.logprob)[0])
        running.length = len(r.prompt)
        if not self._add_token(running, token, logprob):
            self.state = self.engine.insert(self.state, prefix, slot)
            self.slots[slot] = running

    def _state_lost(self) -> bool:
        """Whether the pool state was consumed (insert donates it) by a call that failed."""
        return any(getattr(leaf, "is_deleted", lambda: False)()
                   for leaf in jax.tree_util.tree_leaves(self.state))

    def _decode_step(self, active: list[bool]) -> None:
        k = self.steps_per_call
        longest = max(s.length for s in self.slots if s is not None)
        # Positions up to longest + k - 1 are written; past max_length they are dropped, and
        # only requests already done (by max_tokens) reach there.
        window = bucket_for(min(longest + k, self.engine.max_length),
                            self.engine.window_buckets)
        self.state, tokens, logprobs = self.engine.step(self.state, active, window, k)
        tokens, logprobs = np.asarray(tokens), np.asarray(logprobs)
        self.steps += k
        self.slot_steps += k * sum(active)
        for slot, running in enumerate(self.slots):
            if running is None:
                continue
            try:
                for i in range(k):
                    running.length += 1
                    if self._add_token(running, int(tokens[i, slot]), float(logprobs[i, slot])):
                        self._vacate(slot)  # evicted: the slot takes the next request
                        break
            except Exception as error:  # noqa: BLE001 (e.g. decode): this request's, not all
                logging.exception("request %d failed", running.handle.request_id)
                self._vacate(slot)
                self._fail(running, error)

    # --- one token of one request --------------------------------------------------------

    def _add_token(self, running: _Running, token: int, logprob: float) -> bool:
        """Records the token, sends what is ready, and returns whether the request is done."""
        r = running.request
        running.tokens.append(token)
        running.logprobs.append(logprob)
        running.token_times.append(time.perf_counter())
        finish = None
        if token in r.stop_ids:
            finish = "stop"
        text, cut = self._text(running, stopped_by_id=finish is not None)
        if cut:
            finish = "stop"
        if finish is None and len(running.tokens) >= r.max_tokens:
            finish = "length"
        # While running, hold back what could still become a stop string, and a trailing
        # partial UTF-8 character.
        ready = len(text)
        if finish is None:
            ready -= max((len(s) for s in r.stop), default=1) - 1
            while ready > running.sent_text and text[ready - 1] == "\ufffd":
                ready -= 1
        ready = max(ready, running.sent_text)
        event = Event(running.handle.request_id, running.tokens[running.sent_tokens:],
                      running.logprobs[running.sent_tokens:] if r.logprobs else [],
                      text[running.sent_text:ready], finish)
        running.sent_tokens, running.sent_text = len(running.tokens), ready
        if finish is not None:
            self._finish(running, finish, text, event)
        elif event.tokens or event.text:
            self._send(running, event)
        return finish is not None

    def _finish(self, running: _Running, reason: str, text: str,
                last: Event | None = None) -> None:
        """Completes the handle, then sends the last event (default: the rest of the text):
        whoever gets that event finds `result()` ready."""
        r = running.request
        running.handle._completion = Completion(
            running.handle.request_id, len(r.prompt), running.tokens,
            running.logprobs if r.logprobs else [], text, reason, running.submitted_at,
            running.token_times)
        running.handle._done.set()
        self._send(running, last or Event(running.handle.request_id, [], [],
                                          text[running.sent_text:], reason))

    def _text(self, running: _Running, stopped_by_id: bool) -> tuple[str, bool]:
        """The request's text so far (a stop id excluded), cut at the first stop string;
        and whether one was found."""
        if self.decode is None:
            return "", False
        tokens = running.tokens[:-1] if stopped_by_id else running.tokens
        text = self.decode(tokens)
        r = running.request
        if r.stop:
            start = max(0, running.sent_text - max(len(s) for s in r.stop))
            hits = [i for i in (text.find(s, start) for s in r.stop) if i >= 0]
            if hits:
                return text[:min(hits)], True
        return text, False

    @staticmethod
    def _send(running: _Running, event: Event) -> None:
        running.handle._events.put(event)
        if running.on_event is not None:
            running.on_event(event)
