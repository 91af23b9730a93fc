"""/v1/completions (OpenAI's legacy completions API): a body -> engine requests, and the
response, whole or as stream chunks; and the chosen tokens' logprobs, which both endpoints
report for the same tokens whether streamed or not."""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

from cla_jax.serving import Completion, Request
from cla_jax.serving.http import fields
from cla_jax.serving.http.errors import bad_request

NEUTRAL = {"n": 1, "best_of": 1, "echo": False, "suffix": None, "frequency_penalty": 0,
           "presence_penalty": 0, "logit_bias": {}}


@dataclasses.dataclass(frozen=True)
class Options:
    """How to answer: streamed or whole, with usage at the end of a stream, with logprobs."""
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False


def is_token_list(value) -> bool:
    """Whether `value` is a prompt given as a list of token ids."""
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                           for t in value)


def prompt_forms(body: dict) -> list[str | list[int]]:
    """OpenAI's four prompt forms as a list of texts or token lists (not yet encoded)."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [fields.text(prompt, "prompt")]
    if is_token_list(prompt) and prompt:
        return [list(prompt)]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return [fields.text(p, "prompt") for p in prompt]
        if all(is_token_list(p) for p in prompt):
            return [list(p) for p in prompt]
    if prompt is None:
        raise bad_request("prompt is required (a string, a list of strings, a list of token "
                          "ids, or a list of such lists)", "prompt")
    if prompt == [] or prompt == [[]]:
        raise bad_request("the prompt is empty; give a string (\"\" = from the start of a "
                          "document) or at least one token id", "prompt")
    raise bad_request("prompt must be a string, a list of strings, a list of token ids, or "
                      f"a list of such lists, got {fields.shown(prompt)}", "prompt")


def parse(body, model_name: str, encode: Callable[[str], list[int]],
          stop_ids: Sequence[int], check_count: Callable[[int], None] = lambda n: None
          ) -> tuple[list[Request], Options]:
    """The engine requests (one per prompt) of a /v1/completions body, and how to answer.
    A text gets BOS in front (`encode`); token ids are taken as they are. check_count sees
    the number of prompts before any is encoded."""
    fields.model_of(body, model_name)
    fields.refuse_unsupported(body, NEUTRAL)
    forms = prompt_forms(body)
    check_count(len(forms))
    settings = fields.sampling(body)
    stream, include_usage = fields.streaming(body)
    logprobs = fields.typed(body, "logprobs", None, (int,), "an integer")
    if logprobs is not None and not 0 <= logprobs <= 1:
        raise bad_request(f"logprobs={logprobs} is not supported: this server returns the "
                          "chosen token's logprob only (logprobs 0 or 1), no alternatives",
                          "logprobs")
    prompts = [encode(p) if isinstance(p, str) else p for p in forms]
    requests = [Request(prompt=p, stop_ids=tuple(stop_ids), logprobs=logprobs is not None,
                        **settings) for p in prompts]
    return requests, Options(stream, include_usage, logprobs is not None)


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """One generated token's text and logprob, and where its text starts in the choice's text."""
    text: str
    logprob: float | None
    offset: int  # into the choice's text: the length of the text of the tokens before


class LogprobsWriter:
    """The chosen tokens' logprobs of one choice, a few tokens at a time. A token is reported
    only once the text it starts in has been sent, so a stream reports exactly the tokens of
    a whole response: none of a stop string cut from the text, no stop id."""

    def __init__(self, decode: Callable[[list[int]], str], stop_ids: Sequence[int]):
        self.decode, self.stop_ids = decode, set(stop_ids)
        self.tokens: list[int] = []
        self._pending: list[TokenLogprob] = []
        self._sent_text = 0

    def add(self, tokens: list[int], logprobs: list[float], text_added: int,
            final: bool) -> list[TokenLogprob]:
        """tokens and their logprobs, and the length of the text sent with them; final: the
        choice's last event (what is still pending then was cut with a stop string)."""
        for token, logprob in zip(tokens, logprobs):
            offset = len(self.decode(self.tokens))
            self.tokens.append(token)
            if token not in self.stop_ids:
                self._pending.append(TokenLogprob(self.decode([token]),
                                                  logprob if math.isfinite(logprob) else None,
                                                  offset))
        self._sent_text += text_added
        ready = [t for t in self._pending if t.offset < self._sent_text]
        self._pending = [] if final else self._pending[len(ready):]
        return ready


def logprobs_json(entries: list[TokenLogprob]) -> dict:
    """The completions API's `logprobs` object for a choice's tokens."""
    return {"tokens": [e.text for e in entries], "token_logprobs": [e.logprob for e in entries],
            "text_offset": [e.offset for e in entries], "top_logprobs": None}


class Format:
    """The JSON of /v1/completions."""
    object_name = chunk_object_name = "text_completion"
    id_prefix = "cmpl"

    @staticmethod
    def choice(index: int, completion: Completion, entries) -> dict:
        return {"text": completion.text, "index": index,
                "finish_reason": completion.finish_reason,
                "logprobs": None if entries is None else logprobs_json(entries)}

    @staticmethod
    def chunk_choice(index: int, text: str, finish_reason: str | None, entries) -> dict:
        return {"text": text, "index": index, "finish_reason": finish_reason,
                "logprobs": None if entries is None else logprobs_json(entries)}

    @staticmethod
    def opening_chunks(count: int) -> list[dict]:
        return []
