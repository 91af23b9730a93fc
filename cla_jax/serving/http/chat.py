"""/v1/chat/completions: messages rendered with the model's own chat template, as
transformers' `apply_chat_template` renders them: jinja2's ImmutableSandboxedEnvironment
(a template from a downloaded model cannot reach Python), trim_blocks and lstrip_blocks, the
loopcontrols extension, `raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII,
and the tokenizer's special tokens (bos_token, eos_token, ...) as variables. The rendered
text is tokenized as it is: the template writes its own BOS.

The template comes from the tokenizer's directory (an imported Hugging Face model's
`tokenizer/`): `chat_template.jinja`, else `tokenizer_config.json`'s `chat_template` (a
string, or a list of named templates: "default" is used), or from --chat_template.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import pathlib

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from cla_jax.errors import UserError
from cla_jax.serving import Completion, Request
from cla_jax.serving.http import fields
from cla_jax.serving.http.completions import Options, TokenLogprob
from cla_jax.serving.http.errors import bad_request

NEUTRAL = {"n": 1, "frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {},
           "tools": [], "tool_choice": "none", "functions": [], "parallel_tool_calls": False,
           "top_logprobs": 0, "echo": False}
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
ROLES = ("system", "developer", "user", "assistant", "tool")


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format: str) -> str:  # noqa: A002 (transformers' name)
    return datetime.datetime.now().strftime(format)


@dataclasses.dataclass
class ChatTemplate:
    """A compiled chat template and the special tokens it is rendered with."""
    source: str
    special_tokens: dict[str, str]
    stop_ids: tuple[int, ...]  # the tokenizer's, and the id of the template's eos_token

    def __post_init__(self):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(self.source)
        except jinja2.TemplateError as error:
            raise UserError(f"the chat template does not compile: {error}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            return self._template.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt,
                                         **self.special_tokens)
        except jinja2.TemplateError as error:  # raise_exception(...) of the template itself
            raise bad_request(f"the model's chat template refused these messages: {error}",
                              "messages") from None

    @classmethod
    def of_tokenizer(cls, tokenizer, path: str | None = None) -> "ChatTemplate | None":
        """The template of `tokenizer`'s model directory (or the file `path`); None if it
        has none."""
        directory = getattr(tokenizer, "model_dir", None)
        config = _tokenizer_config(directory)
        if path:
            source = pathlib.Path(path).expanduser().read_text()
        elif directory is not None and (directory / "chat_template.jinja").is_file():
            source = (directory / "chat_template.jinja").read_text()
        else:
            source = _named_template(config.get("chat_template"), directory)
        if source is None:
            return None
        special = {name: _token_text(config.get(name)) for name in SPECIAL_TOKENS}
        special["bos_token"] = special["bos_token"] or tokenizer.token_text(tokenizer.bos_id)
        special["eos_token"] = special["eos_token"] or tokenizer.token_text(tokenizer.eos_id)
        eos = tokenizer.token_id(special["eos_token"])
        stop_ids = tuple(dict.fromkeys([*tokenizer.stop_ids, *([eos] if eos is not None
                                                                else [])]))
        return cls(source, {k: v or "" for k, v in special.items()}, stop_ids)


def _tokenizer_config(directory) -> dict:
    if directory is None or not (directory / "tokenizer_config.json").is_file():
        return {}
    return json.loads((directory / "tokenizer_config.json").read_text())


def _named_template(template, directory) -> str | None:
    if template is None or isinstance(template, str):
        return template
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    if "default" not in named:
        raise UserError(f"{directory}/tokenizer_config.json names chat templates "
                        f"{sorted(named)} but none 'default'; pass --chat_template=<file>")
    return named["default"]


def _token_text(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _content(message: dict, index: int) -> str:
    """A message's content as text: a string, or a list of text parts (joined)."""
    content = message.get("content")
    if content is None and message.get("role") == "assistant":
        return ""
    if isinstance(content, str):
        return fields.text(content, "messages")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return fields.text("".join(p["text"] for p in content), "messages")
    raise bad_request(f"messages[{index}].content must be a string or a list of "
                      f"{{\"type\": \"text\", \"text\": ...}} parts (this server reads text "
                      f"only), got {fields.shown(content)}", "messages")


def messages_of(body: dict) -> list[dict]:
    """The request's `messages`, checked: a non-empty list of {role, content} objects."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list of {\"role\": ..., \"content\": "
                          "...} objects", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise bad_request(f"messages[{i}] must be an object whose role is one of "
                              f"{list(ROLES)}, got {fields.shown(message)}", "messages")
        out.append({"role": message["role"], "content": _content(message, i)})
    return out


def parse(body, model_name: str, template: ChatTemplate | None, encode,
          ) -> tuple[list[Request], Options]:
    """The engine request of a /v1/chat/completions body, and how to answer. `encode` takes
    the rendered text as it is (no BOS added)."""
    fields.model_of(body, model_name)
    if template is None:
        raise bad_request(f"the model {model_name!r} has no chat template, so its messages "
                          "cannot be rendered; use /v1/completions with a prompt, or serve it "
                          "with --chat_template=<file.jinja> (or a chat_template in its "
                          "tokenizer_config.json or chat_template.jinja)", "messages")
    fields.refuse_unsupported(body, NEUTRAL)
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise bad_request(f"response_format={fields.shown(response_format)} is not supported "
                          "(only {\"type\": \"text\"})", "response_format")
    logprobs = fields.typed(body, "logprobs", False, (bool,), "true or false")
    settings = fields.sampling(body, ("max_completion_tokens", "max_tokens"))
    stream, include_usage = fields.streaming(body)
    prompt = encode(template.render(messages_of(body)))
    request = Request(prompt=prompt, stop_ids=template.stop_ids, logprobs=logprobs,
                      **settings)
    return [request], Options(stream, include_usage, logprobs)


def _logprobs_json(entries: list[TokenLogprob]) -> dict:
    return {"content": [{"token": e.text, "logprob": e.logprob,
                         "bytes": list(e.text.encode("utf-8")), "top_logprobs": []}
                        for e in entries]}


class Format:
    """The JSON of /v1/chat/completions."""
    object_name, chunk_object_name = "chat.completion", "chat.completion.chunk"
    id_prefix = "chatcmpl"

    @staticmethod
    def choice(index: int, completion: Completion, entries) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": completion.text},
                "finish_reason": completion.finish_reason,
                "logprobs": None if entries is None else _logprobs_json(entries)}

    @staticmethod
    def chunk_choice(index: int, text: str, finish_reason: str | None, entries) -> dict:
        return {"index": index, "delta": {"content": text} if text else {},
                "finish_reason": finish_reason,
                "logprobs": None if entries is None else _logprobs_json(entries)}

    @staticmethod
    def opening_chunks(count: int) -> list[dict]:
        """The role comes first, alone, as OpenAI streams it."""
        return [{"index": i, "delta": {"role": "assistant", "content": ""},
                 "finish_reason": None, "logprobs": None} for i in range(count)]

