"""serve.py with the official openai client over 127.0.0.1: completions equal
decoding.generate, streaming, concurrent requests sharing the batch, stop strings, and HTTP
400 for bad requests. Most tests run the app in-process over a tiny random model; one starts
`serve.py --workdir` on a trained checkpoint as a subprocess."""
import concurrent.futures
import inspect
import json
import re
import subprocess
import sys
import types
import urllib.error
import urllib.request

import jax.numpy as jnp
import numpy as np
import openai
import pytest
from serving_app import MAX_LENGTH, serving, tiny_model
from test_train import ROOT

from cla_jax import checkpoint
from cla_jax.decoding import Sampling, generate
from cla_jax.scripts import serve
from cla_jax.serving import PagedBatcher, PagedEngine, Request
from cla_jax.serving.http.app import make_app
from cla_jax.serving.http.server import warm_up

PROMPTS = ["the king", "a queen", "far away", "lord and lady"]  # one prompt bucket (16)
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


@pytest.fixture(scope="module")
def greedy(tiny):
    """What decoding.generate gives for each prompt, greedy, ending at bos/eos: {prompt:
    token ids}; the first n of them are what it gives for max_new_tokens=n."""
    _, model, params, tokenizer = tiny
    ids = [[tokenizer.bos_id] + tokenizer.encode(p) for p in PROMPTS]
    rows = np.asarray(generate(model, params, ids, MAX_TOKENS, Sampling(0.0, 0, 1.0),
                               eos_id=(tokenizer.bos_id, tokenizer.eos_id),
                               cache_dtype="float32")[0])
    out = {}
    for prompt, row in zip(PROMPTS, rows.tolist()):
        ends = [i for i, t in enumerate(row) if t in (tokenizer.bos_id, tokenizer.eos_id)]
        out[prompt] = row[:ends[0] + 1] if ends else row
    return out


def expected_text(tiny, greedy, prompt, max_tokens):
    return tiny[3].decode(greedy[prompt][:max_tokens])


@pytest.fixture(scope="module")
def served(tiny):
    """The app over the tiny model on a free port: (openai client, url, batcher)."""
    _, model, params, tokenizer = tiny
    # The paged engine, as serve.py runs it: 12 blocks of 16 = three sequences of MAX_LENGTH.
    batcher = PagedBatcher(PagedEngine(model, params, num_blocks=13, block_size=16,
                                       max_length=MAX_LENGTH, max_seqs=6),
                           decode=tokenizer.decode)
    warm_up(batcher, everything=False)
    batcher.start()
    try:
        with serving(make_app(batcher, tokenizer, "tiny")) as url:
            yield openai.OpenAI(base_url=url, api_key="unused", max_retries=0,
                                timeout=120), url, batcher
    finally:
        batcher.stop()


def complete(client, prompt, model="tiny", **kwargs):
    return client.completions.create(model=model, prompt=prompt, **kwargs)


def test_models_lists_the_model(served):
    client, *_ = served
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_a_greedy_completion_equals_decoding_generate(tiny, greedy, served):
    client, *_ = served
    tokens = greedy[PROMPTS[0]][:20]
    result = complete(client, PROMPTS[0], max_tokens=20, temperature=0, logprobs=1)
    (choice,) = result.choices
    assert choice.text == tiny[3].decode(tokens) and choice.text
    assert choice.finish_reason == ("stop" if tokens[-1] in (1, 2) else "length")
    assert result.usage.prompt_tokens == 1 + len(PROMPTS[0])  # bos + one id per byte
    assert result.usage.completion_tokens == len(tokens)
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == 20
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert all(np.isfinite(x) and x <= 0 for x in lp.token_logprobs)


def test_token_id_prompts_and_several_prompts_become_choices(tiny, greedy, served):
    client, *_ = served
    expected = [expected_text(tiny, greedy, p, 12) for p in PROMPTS[:2]]
    result = complete(client, PROMPTS[:2], max_tokens=12, temperature=0)
    assert [c.index for c in result.choices] == [0, 1]
    assert [c.text for c in result.choices] == expected
    ids = [tiny[3].bos_id] + tiny[3].encode(PROMPTS[1])
    assert complete(client, ids, max_tokens=12, temperature=0).choices[0].text == expected[1]


def test_streaming_gives_the_same_text_in_several_chunks(served):
    client, *_ = served
    result = complete(client, PROMPTS[2], max_tokens=MAX_TOKENS, temperature=0)
    whole = result.choices[0]
    chunks = list(complete(client, PROMPTS[2], max_tokens=MAX_TOKENS, temperature=0,
                           stream=True, stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == whole.text and len([t for t in texts if t]) > 2
    assert all(c.object == "text_completion" for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.finish_reason
    assert chunks[-1].usage == result.usage


def test_a_stream_sends_one_chunk_per_token(served):
    """Not one per device call of --steps_per_call tokens (what its help used to say)."""
    client, _, batcher = served
    assert batcher.steps_per_call > 1
    chunks = [c.choices[0] for c in complete(client, PROMPTS[0], max_tokens=12, temperature=0,
                                             stream=True, logprobs=1)]
    per_chunk = [len(c.logprobs.tokens) for c in chunks if c.logprobs.tokens]
    # A chunk holds more than one token only where text was held back (part of a UTF-8
    # character): far more chunks than the 3 device calls of 4 steps.
    assert len(per_chunk) >= 6 and per_chunk.count(1) > per_chunk.count(4)
    assert "one chunk per token" in serve_flag_help("steps_per_call")


def serve_flag_help(name: str) -> str:
    """The help text of a serve.py flag, read from its definition (defining the flags here
    would take their names from the test process)."""
    source = " ".join(inspect.getsource(serve.define_flags).split())
    definition = source[source.index(f'"{name}"'):]
    return "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', definition[:definition.index(")")]))


def test_concurrent_requests_equal_one_at_a_time(tiny, greedy, served):
    client, _, batcher = served
    # 8 requests over 3 slots: requests join a busy pool and wait for freed slots.
    jobs = [(PROMPTS[i % 4], 6 + 2 * i) for i in range(8)]
    steps, slot_steps = batcher.steps, batcher.slot_steps
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(
            lambda job: complete(client, job[0], max_tokens=job[1], temperature=0,
                                 stream=job[1] % 4 == 0), jobs))
    texts = [r.choices[0].text if isinstance(r, openai.types.Completion)
             else "".join(c.choices[0].text for c in r) for r in results]
    assert texts == [expected_text(tiny, greedy, p, n) for p, n in jobs]
    # The batch was shared: a decode step ran more than 1.5 of these requests on average.
    assert batcher.slot_steps - slot_steps > 1.5 * (batcher.steps - steps)


def test_stop_strings_cut_the_text(served):
    client, *_ = served
    sampled = dict(max_tokens=MAX_TOKENS, temperature=1.0, seed=11)  # the seed repeats it
    full = complete(client, PROMPTS[3], **sampled).choices[0].text
    # An ASCII character from the second half: the text is cut at its first occurrence.
    stop = next(c for c in full[len(full) // 2:] if c.isascii() and c.isprintable())
    cut = full[:full.index(stop)]
    reported = {}
    for stream in (False, True):
        result = complete(client, PROMPTS[3], stop=[stop, "never seen"], stream=stream,
                          logprobs=1, **sampled)
        if stream:
            chunks = [c.choices[0] for c in result]
            text, finish = "".join(c.text for c in chunks), chunks[-1].finish_reason
            reported[stream] = [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
        else:
            text, finish = result.choices[0].text, result.choices[0].finish_reason
            reported[stream] = result.choices[0].logprobs.tokens
        assert (text, finish) == (cut, "stop")
        if not stream:
            offsets = result.choices[0].logprobs.text_offset
    # The same tokens' logprobs streamed or not: none of the stop string cut from the text.
    assert reported[True] == reported[False] and all(o < len(cut) for o in offsets)


@pytest.mark.parametrize("kwargs, words", [
    (dict(temperature=-1), ["temperature", "-1"]),
    (dict(top_p=0), ["top_p"]),
    (dict(prompt="x" * MAX_LENGTH), ["context length", str(MAX_LENGTH)]),
    (dict(max_tokens=0), ["max_tokens"]),
    (dict(n=2), ["n=2"]),
    (dict(model="gpt-4"), ["gpt-4", "does not exist"]),
    (dict(logprobs=5), ["logprobs"]),
    (dict(echo=True), ["echo"]),
    (dict(prompt=[]), ["empty"]),
    (dict(prompt=[999]), ["999", "vocabulary"]),
    (dict(stop=["a", "b", "c", "d", "e"]), ["stop", "4"]),
    (dict(extra_body={"top_k": 261}), ["top_k", "261"]),
    (dict(extra_body={"temperature": "hot"}), ["temperature", "number"]),
])
def test_bad_requests_get_400_with_a_message(served, kwargs, words):
    client, *_ = served
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(**{"model": "tiny", "prompt": "x", **kwargs})
    assert caught.value.status_code == 400
    assert caught.value.body["type"] == "invalid_request_error"
    for word in words:
        assert word in caught.value.body["message"], caught.value.body


def test_a_body_that_is_not_json_gets_400(served):
    _, url, _ = served
    request = urllib.request.Request(f"{url}/completions", data=b"{not json",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 400
    assert "not valid JSON" in json.loads(caught.value.read())["error"]["message"]


def test_serve_script_serves_a_saved_checkpoint(tiny, greedy, tmp_path):
    """serve.py --workdir restores the run onto its config's mesh (all 8 test devices) and
    answers as the params it saved do."""
    config, _, params, _ = tiny
    saver = checkpoint.Checkpointer(tmp_path / "run" / "checkpoints")
    saver.save(1, types.SimpleNamespace(params=params, opt_state={"count": jnp.zeros(())}),
               {"config": config.to_dict()})
    saver.wait()
    saver.close()
    log = open(tmp_path / "stderr.txt", "w+")
    server = subprocess.Popen(
        [sys.executable, "serve.py", f"--workdir={tmp_path / 'run'}",
         f"--cache_dir={tmp_path / 'cache'}", "--port=0", "--num_slots=4",
         "--warm_up=smallest"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        ready = server.stdout.readline()  # the one line it prints once it accepts requests
        assert "serving run (step 1)" in ready, ready + (tmp_path / "stderr.txt").read_text()
        assert "8 devices" in ready
        client = openai.OpenAI(base_url=re.search(r"http://\S+/v1", ready).group(0),
                               api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["run"]
        result = complete(client, PROMPTS[1], model="run", max_tokens=10, temperature=0)
        assert result.choices[0].text == expected_text(tiny, greedy, PROMPTS[1], 10)
        with pytest.raises(openai.BadRequestError):
            complete(client, PROMPTS[1], model="run", max_tokens=MAX_LENGTH)
    finally:
        server.terminate()
        server.wait(30)
        log.close()


def scrape(url: str) -> dict[str, float]:
    """{sample name{labels}: value} of GET /metrics, parsed by prometheus_client's parser."""
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(url.removesuffix("/v1") + "/metrics", timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {s.name + (json.dumps(s.labels, sort_keys=True) if s.labels else ""): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_requests_tokens_and_latencies(served):
    client, url, batcher = served
    before = scrape(url)
    results = [complete(client, p, max_tokens=6, temperature=0) for p in PROMPTS]
    generated = sum(r.usage.completion_tokens for r in results)
    after = scrape(url)
    assert after["cla_generation_tokens_total"] - before["cla_generation_tokens_total"] \
        == generated
    assert after["cla_prompt_tokens_total"] - before["cla_prompt_tokens_total"] == \
        sum(r.usage.prompt_tokens for r in results)
    for histogram in ("cla_time_to_first_token_seconds", "cla_request_duration_seconds"):
        assert after[f"{histogram}_count"] - before.get(f"{histogram}_count", 0) == 4
    assert after["cla_time_per_output_token_seconds_count"] > 0
    assert after["cla_generation_tokens_per_second"] > 0
    assert after["cla_slots"] == 6  # the paged engine's max_seqs
    assert after["cla_requests_running"] == after["cla_slot_usage_ratio"] == 0
    assert after["cla_kv_cache_usage_ratio"] == after["cla_requests_waiting"] == 0
    batcher.stop()  # paused: what is submitted now waits, and the gauges say so
    try:
        waiting = [batcher.submit(Request(prompt=[3, 4, 5], max_tokens=8)) for _ in range(2)]
        paused = scrape(url)
        assert paused["cla_requests_waiting"] == 2 and paused["cla_queued_tokens"] == 22
        batcher.step_once()  # both join the pool: one block of 16 each, of 12 x 16 = 3 x 64
        running = scrape(url)
        assert running["cla_requests_running"] == 2 and running["cla_requests_waiting"] == 0
        assert running["cla_slot_usage_ratio"] == pytest.approx(2 / 6)
        assert running["cla_kv_cache_usage_ratio"] == pytest.approx(
            batcher.cache_positions_used() / (3 * MAX_LENGTH))
        assert batcher.cache_positions_used() == 2 * 16
        for handle in waiting:
            batcher.cancel(handle)
    finally:
        batcher.start()
