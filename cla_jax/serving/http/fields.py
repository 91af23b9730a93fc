"""Request fields both endpoints share: sampling settings, stop strings, streaming options,
and the checks that turn a bad value into one 400 naming its field."""
from __future__ import annotations

import json

from cla_jax.serving.http.errors import bad_request

MAX_STOP_STRINGS = 4  # as OpenAI


def typed(body: dict, name: str, default, types: tuple, what: str):
    """body[name] if it is of `types` (bool is not an int here), `default` if absent/null."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise bad_request(f"{name} must be {what}, got {shown(value)}", name)
    return value


def shown(value, limit: int = 80) -> str:
    """A value as JSON text, cut short: what an error message quotes of the request."""
    return json.dumps(value, ensure_ascii=True)[:limit]


def text(value: str, param: str) -> str:
    """`value`, refused if it is not valid Unicode (JSON admits lone surrogates such as
    \\ud800, which no tokenizer can encode)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise bad_request(f"{param} holds a lone surrogate {shown(value[error.start])} at "
                          f"character {error.start}, which is not text; send valid Unicode",
                          param) from None
    return value


def refuse_unsupported(body: dict, neutral: dict) -> None:
    """Fields we cannot honour are refused, not ignored: a client relying on them would
    otherwise get silently different results. `neutral`: the one value each may take."""
    for name, value in neutral.items():
        given = body.get(name)
        if given is not None and (given != value
                                  or isinstance(given, bool) != isinstance(value, bool)):
            raise bad_request(f"{name}={shown(given)} is not supported by this server "
                              f"(only {json.dumps(value)})", name)


def stop_strings(body: dict) -> tuple[str, ...]:
    """The request's `stop`: a string or a list of non-empty strings, as a tuple."""
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise bad_request(f"stop must be a non-empty string or a list of them, got "
                          f"{shown(body.get('stop'))}", "stop")
    if len(stop) > MAX_STOP_STRINGS:
        raise bad_request(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}",
                          "stop")
    return tuple(text(s, "stop") for s in stop)


def sampling(body: dict, max_tokens_names: tuple[str, ...] = ("max_tokens",)) -> dict:
    """The engine Request's sampling arguments (checked for type here, for range by
    Request.check): max_tokens (the first of `max_tokens_names` given), temperature,
    top_p, top_k, seed, stop."""
    name = next((n for n in max_tokens_names if body.get(n) is not None), max_tokens_names[0])
    return dict(max_tokens=typed(body, name, 16, (int,), "an integer"),
                temperature=float(typed(body, "temperature", 1.0, (int, float), "a number")),
                top_p=float(typed(body, "top_p", 1.0, (int, float), "a number")),
                top_k=typed(body, "top_k", 0, (int,), "an integer (0 = off)"),
                seed=typed(body, "seed", None, (int,), "an integer"),
                stop=stop_strings(body))


def streaming(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = typed(body, "stream", False, (bool,), "true or false")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request("stream_options must be an object", "stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise bad_request("stream_options.include_usage must be true or false",
                          "stream_options")
    return stream, include_usage


def model_of(body, model_name: str) -> None:
    """Checks that the body is a JSON object naming the served model."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if model != model_name:
        raise bad_request(f"the model {shown(model)} does not exist; this server serves "
                          f"{model_name!r} (see GET /v1/models)", "model")
