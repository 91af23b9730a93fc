"""Continuous batching over a paged pool: admission by free blocks, chunked prefill mixed
with decode, prefix reuse and preemption.

    batcher = PagedBatcher(PagedEngine(config, params, num_blocks=1024), tokenizer.decode)
    handle = batcher.submit(Request(prompt=ids, max_tokens=64))   # as with `Batcher`
    batcher.start()

Each loop iteration:
1. admits waiting requests while a row is free and the pool has the blocks for the whole
   prompt (less its cached prefix) and a small reserve: a request reuses the longest run of
   cached full blocks its tokens start with, always leaving at least one token to compute;
2. gives every decoding sequence the blocks its next `steps_per_call` tokens need; when the
   pool has none left it preempts the newest sequence (its blocks return to the pool, it
   goes back to the head of the queue, and its prompt and the tokens it has generated are
   recomputed when it is admitted again: what it samples does not change);
3. runs one device step: every decoding sequence's next tokens and up to `chunk_tokens`
   prompt tokens (the prefill shape that covers most of them: one long prompt's chunk, or
   the chunks of several short ones), so a long prompt never holds up the decoding ones.
Full blocks are registered in the prefix cache as they fill, prompt and output alike.
"""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from cla_jax.serving.batcher import Batcher, Handle, Request, RequestError, _Running
from cla_jax.serving.blocks import BlockPool, block_keys
from cla_jax.serving.engine import bucket_for
from cla_jax.serving.paged_engine import PagedEngine, StepInputs
from cla_jax.sampling import seed_key


class PagedBatcher(Batcher):
    """The host loop over a `PagedEngine`. prefix_caching=False: every prompt is computed in
    full (the comparison the prefix cache is measured against).

    overcommit=True admits a request when the pool holds its prompt (plus `reserve_blocks`,
    default 1% of the pool, for the running ones to grow into) and preempts when sequences
    outgrow the pool: the most sequences at once when outputs often end early (EOS). False
    admits a request only when the pool holds the blocks every running sequence, and it,
    may still need up to its max_tokens: nothing is ever preempted."""

    def __init__(self, engine: PagedEngine, decode: Callable[[list[int]], str] | None = None,
                 steps_per_call: int = 4, prefix_caching: bool = True,
                 reserve_blocks: int | None = None, overcommit: bool = True):
        super().__init__(engine, decode, steps_per_call)
        self.blocks = BlockPool(engine.num_blocks, engine.block_size, prefix_caching)
        self.reserve_blocks = (self.blocks.usable // 100 if reserve_blocks is None
                               else reserve_blocks)
        self.overcommit = overcommit
        self._admissions = 0
        self.prefill_tokens = 0       # prompt tokens run through the model
        self.recomputed_tokens = 0    # generated tokens run again after a preemption
        self.reused_tokens = 0        # tokens taken from the prefix cache instead
        self.preemptions = 0

    def submit(self, request: Request, on_event=None) -> Handle:
        need = self.engine.blocks_needed(len(request.prompt) + request.max_tokens - 1)
        if need > self.blocks.usable - self.reserve_blocks:
            fits = ((self.blocks.usable - self.reserve_blocks) * self.engine.block_size
                    - len(request.prompt) + 1)
            raise RequestError(
                f"the prompt ({len(request.prompt)} tokens) + max_tokens ({request.max_tokens}) "
                f"needs {need} KV blocks of {self.engine.block_size}, more than this server's "
                f"pool gives one sequence ({self.blocks.usable - self.reserve_blocks}); ask "
                f"for at most {max(fits, 0)} tokens or raise --num_blocks", "max_tokens")
        return super().submit(request, on_event)

    def cache_positions_used(self) -> int:
        return sum(len(s.blocks) for s in self.slots if s is not None) * self.engine.block_size

    # --- the loop -----------------------------------------------------------------------

    def step_once(self) -> bool:
        self._drop_cancelled()
        self._admit()
        self.max_running = max(self.max_running, self.slots_in_use())
        decode, prefill = self._plan()
        if decode or prefill:
            self._run(decode, prefill)
        return self.busy

    def warm_up(self, decode_rows=None, prefill_shapes=None, windows=None) -> int:
        """Compiles the step for every (decode rows, prefill shape or none, window) given
        (default: all decode row buckets and windows, every prefill shape), so no request
        waits for XLA later. Only while idle; returns the number of programs run."""
        if self.busy:
            raise RuntimeError("warm_up runs only while no request is waiting or running")
        engine, count = self.engine, 0
        shapes = [None, *(engine.prefill_shapes if prefill_shapes is None else prefill_shapes)]
        for rows in decode_rows or engine.decode_buckets:
            for shape in shapes:
                for window in windows or engine.window_buckets:
                    inputs = engine.empty_inputs(rows, shape, window)
                    self.state, *outputs = engine.step(self.state, inputs, self.steps_per_call)
                    np.asarray(outputs[0])
                    count += 1
        return count

    def _vacate(self, slot: int) -> None:
        running = self.slots[slot]
        if running is not None:
            self.blocks.release(running.blocks)
            running.blocks = []
        self.slots[slot] = None

    @staticmethod
    def _sequence(running: _Running) -> list[int]:
        return list(running.request.prompt) + running.tokens

    def _admit(self) -> None:
        """Fills free rows from the head of the queue while the pool has its blocks (first
        come, first served). Only this thread removes from the queue; others append."""
        for slot in [s for s, occupant in enumerate(self.slots) if occupant is None]:
            with self._lock:
                running = self._waiting[0] if self._waiting else None
            if running is None or not self._allocate_prompt(running):
                return
            with self._lock:
                self._waiting.popleft()
            self._admissions += 1
            running.admission = self._admissions
            self.slots[slot] = running

    def _allocate_prompt(self, running: _Running) -> bool:
        """Holds the cached prefix and new blocks for the rest of the sequence so far;
        False (holding nothing) when the pool lacks them."""
        tokens = self._sequence(running)
        size = self.engine.block_size
        keys = block_keys(tokens, size)
        cached = self.blocks.lookup(keys[:(len(tokens) - 1) // size])
        need = self.engine.blocks_needed(len(tokens)) - len(cached)
        if not self.overcommit:  # room for everyone's max_tokens, this one's included
            r = running.request
            need += self._growth(len(tokens), len(r.prompt) + r.max_tokens - 1) + sum(
                self._growth(len(s.blocks) * size, len(s.request.prompt) + s.request.max_tokens
                             - 1) for s in self.slots if s is not None)
        if self.blocks.num_free() < need + self.reserve_blocks:
            self.blocks.release(cached)
            self.blocks.hits -= len(cached)
            return False
        running.blocks = cached + [self.blocks.allocate() for _ in range(need)]
        running.keys = keys[:len(cached)]
        running.registered = len(cached)
        running.computed = running.length = len(cached) * size
        self.reused_tokens += running.computed
        return True

    def _growth(self, held_positions: int, last: int) -> int:
        """Blocks a sequence holding `held_positions` still needs to write `last` positions."""
        return max(0, self.engine.blocks_needed(last) - self.engine.blocks_needed(held_positions))

    def _plan(self) -> tuple[list[int], list[int]]:
        """(decoding slots, prefilling slots), each with the blocks its step needs."""
        k = self.steps_per_call
        by_age = sorted((s for s in range(len(self.slots)) if self.slots[s] is not None),
                        key=lambda s: self.slots[s].admission)
        for slot in by_age:
            running = self.slots[slot]
            if running is None or self._to_compute(running) != 1:
                continue
            r = running.request
            # The positions its next k tokens write, up to the last one it can use.
            last = len(r.prompt) + r.max_tokens - 1
            need = self.engine.blocks_needed(min(running.computed + k, last)) - len(running.blocks)
            while need > self.blocks.num_free():
                victim = self._preempt_newest()
                if victim == slot or victim is None:
                    break
            if self.slots[slot] is None:  # it was the newest: back in the queue
                continue
            for _ in range(max(0, min(need, self.blocks.num_free()))):
                running.blocks.append(self.blocks.allocate())
        decode = [s for s in by_age if self.slots[s] is not None
                  and self._to_compute(self.slots[s]) == 1]
        prefill = [s for s in by_age if self.slots[s] is not None
                   and self._to_compute(self.slots[s]) > 1]
        return decode, prefill

    def _to_compute(self, running: _Running) -> int:
        return len(running.request.prompt) + len(running.tokens) - running.computed

    def _preempt_newest(self) -> int | None:
        """Sends the most recently admitted sequence back to the head of the queue, its blocks
        freed; returns its slot (None when nothing runs)."""
        running_slots = [s for s, r in enumerate(self.slots) if r is not None]
        if not running_slots:
            return None
        slot = max(running_slots, key=lambda s: self.slots[s].admission)
        running = self.slots[slot]
        self._vacate(slot)
        running.computed = running.length = running.registered = 0
        running.keys = []
        self.preemptions += 1
        with self._lock:
            self._waiting.appendleft(running)
        return slot

    def _prefill_shape(self, prefill: list[int]) -> tuple[tuple[int, int] | None, list[int]]:
        """The prefill shape that runs the most prompt tokens now, and its chunk lengths."""
        best, best_lengths = None, []
        for rows, chunk in self.engine.prefill_shapes:
            lengths = [min(self._to_compute(self.slots[s]), chunk) for s in prefill[:rows]]
            if sum(lengths) > sum(best_lengths):
                best, best_lengths = (rows, chunk), lengths
        return best, best_lengths

    def _run(self, decode: list[int], prefill: list[int]) -> None:
        engine, k, size = self.engine, self.steps_per_call, self.engine.block_size
        shape, chunks = self._prefill_shape(prefill) if prefill else (None, [])
        prefill = prefill[:len(chunks)]
        d = bucket_for(max(len(decode), 1), engine.decode_buckets)
        p, c = shape or (0, 0)
        reach = [self.slots[s].computed + k for s in decode] + [
            self.slots[s].computed + n for s, n in zip(prefill, chunks)]
        window = bucket_for(min(max(reach), engine.window_buckets[-1]), engine.window_buckets)
        x = engine.empty_inputs(d, shape, window)
        rows = [(i, s) for i, s in enumerate(decode)] + [(d + i, s) for i, s in enumerate(prefill)]
        for row, slot in rows:
            running = self.slots[slot]
            r = running.request
            blocks = running.blocks[:window // size]
            x.tables[row, :len(blocks)] = blocks
            x.temperature[row], x.top_k[row], x.top_p[row] = r.temperature, r.top_k, r.top_p
            if running.key_data is None:  # the request's key, made once
                running.key_data = np.asarray(jax.random.key_data(seed_key(r.seed)))
            x.key_data[row] = running.key_data
            x.sample_index[row] = len(running.tokens)
        sequences = {s: self._sequence(self.slots[s]) for s in decode + prefill}
        for i, slot in enumerate(decode):
            running = self.slots[slot]
            x.decode_tokens[i] = sequences[slot][-1]
            x.decode_positions[i] = running.computed
            x.decode_active[i] = True
        for i, (slot, n) in enumerate(zip(prefill, chunks)):
            start = self.slots[slot].computed
            x.prefill_tokens[i, :n] = sequences[slot][start:start + n]
            x.prefill_starts[i], x.prefill_lengths[i] = start, n
        self.state, tokens, logprobs, first, first_lp = engine.step(self.state, x, k)
        tokens, logprobs = np.asarray(tokens), np.asarray(logprobs)
        first, first_lp = np.asarray(first), np.asarray(first_lp)
        self.steps += k
        self.slot_steps += k * len(decode)
        for slot, start, n in ([(s, self.slots[s].computed, 1) for s in decode]
                               + [(s, self.slots[s].computed, n) for s, n in zip(prefill, chunks)]):
            prompt = min(max(len(self.slots[slot].request.prompt) - start, 0), n)
            self.prefill_tokens += prompt
            self.recomputed_tokens += n - prompt if slot in prefill else 0
        for i, (slot, n) in enumerate(zip(prefill, chunks)):
            running = self.slots[slot]
            running.computed += n
            running.length = running.computed
            self._register(running, sequences[slot])
            if self._to_compute(running) == 0:
                self._record(slot, [(int(first[i]), float(first_lp[i]))])
        for i, slot in enumerate(decode):
            self._record(slot, [(int(tokens[j, i]), float(logprobs[j, i])) for j in range(k)],
                         decoding=True)

    def _record(self, slot: int, samples, decoding: bool = False) -> None:
        """Adds a row's new tokens to its request until it finishes (a decoding row's input
        token is written to the cache before each)."""
        running = self.slots[slot]
        try:
            for token, logprob in samples:
                if decoding:
                    running.computed += 1
                    running.length = running.computed
                if self._add_token(running, token, logprob):
                    self._vacate(slot)
                    return
            self._register(running, self._sequence(running))
        except Exception as error:  # noqa: BLE001 (e.g. decode): this request's, not all
            self._vacate(slot)
            self._fail(running, error)

    def _register(self, running: _Running, tokens: list[int]) -> None:
        """Puts the sequence's blocks that are full and computed into the prefix cache."""
        size = self.engine.block_size
        full = min(running.computed, len(tokens)) // size
        if full > len(running.keys):
            parent = running.keys[-1] if running.keys else b""
            running.keys += block_keys(tokens[len(running.keys) * size:full * size], size,
                                       parent)
        for b in range(running.registered, full):
            self.blocks.register(running.blocks[b], running.keys[b])
        running.registered = max(running.registered, full)

    def stats(self) -> dict:
        return {"prefill_tokens": self.prefill_tokens, "reused_tokens": self.reused_tokens,
                "recomputed_tokens": self.recomputed_tokens,
                "preemptions": self.preemptions, "max_running": self.max_running,
                "prefix_cache_blocks": self.blocks.num_cached(),
                "prefix_cache_hits_blocks": self.blocks.hits,
                "evictions": self.blocks.evictions}

