"""/v1/chat/completions with the official openai client, against a Hugging Face Llama
imported with a chat template (the llama32 fixture, copied with a template added): messages
render as the template says, in jinja2's sandbox; the greedy reply equals decoding.generate
of the rendered prompt; streamed equals whole; a model without a template gets a clear 400."""
import json
import shutil

import numpy as np
import openai
import pytest
from serving_app import serving, tiny_model
from test_hf_import import FIXTURES, restored

from cla_jax import hf_import
from cla_jax.data.tokenizer import load_tokenizer
from cla_jax.decoding import Sampling, generate
from cla_jax.errors import UserError
from cla_jax.serving import Batcher, Engine
from cla_jax.serving.http.app import make_app
from cla_jax.serving.http.chat import ChatTemplate
from cla_jax.serving.http.errors import ApiError
from cla_jax.serving.http.server import warm_up

# Llama 3's shape with this fixture's special tokens; the role headers are plain text here.
TEMPLATE = """{% for message in messages %}
{% if message.role == 'tool' %}{{ raise_exception('this template has no tool role') }}{% endif %}
{{ bos_token if loop.first }}<|{{ message.role }}|>
{{ message.content }}{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}<|assistant|>
{% endif %}"""
MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                         {"type": "text", "text": "thére"}]}]
RENDERED = ("<|begin_of_text|><|system|>\nBe brief.<|eot_id|>\n"
            "<|user|>\nHi thére<|eot_id|>\n<|assistant|>\n")
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """The llama32 fixture imported with a chat template whose eos_token (<|eot_id|>, 303)
    is not among the model's own eos ids (trimmed to 301 here): (model, params, tokenizer,
    template)."""
    root = tmp_path_factory.mktemp("chat")
    hf_dir = shutil.copytree(FIXTURES / "llama32", root / "hf")
    (hf_dir / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 300, "eos_token_id": 301}))
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": TEMPLATE, "bos_token": "<|begin_of_text|>",
         "eos_token": {"content": "<|eot_id|>"}}))
    hf_import.import_checkpoint(hf_dir, root / "run")
    model, params = restored(root / "run")
    tokenizer = load_tokenizer(str(root / "run" / "tokenizer"))
    return model, params, tokenizer, ChatTemplate.of_tokenizer(tokenizer)


@pytest.fixture(scope="module")
def chat_server(chat_model):
    model, params, tokenizer, template = chat_model
    batcher = Batcher(Engine(model, params, num_slots=2, max_length=model.max_seq_len),
                      decode=tokenizer.decode)
    warm_up(batcher, everything=False)
    batcher.start()
    try:
        with serving(make_app(batcher, tokenizer, "llama", chat_template=template)) as url:
            yield openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
    finally:
        batcher.stop()


def test_the_template_renders_as_transformers_does_and_adds_its_stop_token(chat_model):
    _, _, tokenizer, template = chat_model
    from cla_jax.serving.http.chat import messages_of
    assert template.render(messages_of({"messages": MESSAGES})) == RENDERED
    assert 303 in template.stop_ids and 303 not in tokenizer.stop_ids
    assert tokenizer.encode(RENDERED)[0] == 300  # the template's BOS, as one token


def test_a_chat_completion_is_the_greedy_continuation_of_the_rendered_prompt(chat_model,
                                                                              chat_server):
    model, params, tokenizer, template = chat_model
    prompt = tokenizer.encode(RENDERED)
    row = np.asarray(generate(model, params, [prompt], MAX_TOKENS, Sampling(0.0),
                              eos_id=template.stop_ids, cache_dtype="float32")[0])[0].tolist()
    stops = [i for i, t in enumerate(row) if t in template.stop_ids]
    expected = row[:stops[0] + 1] if stops else row
    whole = chat_server.chat.completions.create(model="llama", messages=MESSAGES,
                                                max_tokens=MAX_TOKENS, temperature=0,
                                                logprobs=True)
    (choice,) = whole.choices
    assert choice.message.role == "assistant" and whole.object == "chat.completion"
    assert choice.message.content == tokenizer.decode(expected)
    assert choice.finish_reason == ("stop" if stops else "length")
    assert whole.usage.prompt_tokens == len(prompt)
    assert whole.usage.completion_tokens == len(expected)
    assert len(choice.logprobs.content) == len([t for t in expected
                                                if t not in template.stop_ids])
    chunks = list(chat_server.chat.completions.create(
        model="llama", messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage == whole.usage
    assert {c.object for c in chunks} == {"chat.completion.chunk"}


def test_a_template_that_refuses_the_messages_gets_400(chat_server):
    with pytest.raises(openai.BadRequestError, match="no tool role"):
        chat_server.chat.completions.create(
            model="llama", max_tokens=2,
            messages=[{"role": "tool", "content": "42", "tool_call_id": "x"}])
    with pytest.raises(openai.BadRequestError, match="not supported"):
        chat_server.chat.completions.create(model="llama", messages=MESSAGES, n=2)


def test_a_model_without_a_chat_template_gets_a_clear_400():
    _, model, params, tokenizer = tiny_model()
    assert ChatTemplate.of_tokenizer(tokenizer) is None
    batcher = Batcher(Engine(model, params, num_slots=1, max_length=16), tokenizer.decode)
    with serving(make_app(batcher, tokenizer, "tiny")) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError, match="no chat template.*--chat_template"):
            client.chat.completions.create(model="tiny", messages=MESSAGES)


def test_the_template_runs_in_a_sandbox():
    """A downloaded template reaches no Python internals and changes nothing it is given."""
    for escape in ("{{ ''.__class__.__mro__ }}", "{{ messages.append(1) }}",
                   "{{ messages[0].update({'role': 'x'}) }}"):
        with pytest.raises(ApiError, match="refused these messages"):
            ChatTemplate(escape, {}, ()).render([{"role": "user", "content": "x"}])
    with pytest.raises(UserError, match="does not compile"):
        ChatTemplate("{% for %}", {}, ())
