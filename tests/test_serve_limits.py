"""The server under abuse, as an operator deploying it would meet it: API keys, body and
queue limits, header/body/request time limits, clients that leave, malformed input. Every
error is OpenAI's JSON shape and leaves the connection usable; no slot decodes for a client
that is gone. The app runs in-process over a tiny random model (serving_app.py)."""
import http.client
import json
import logging
import socket
import subprocess
import sys
import threading
import time

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving_app import MAX_LENGTH, serving, tiny_model
from test_train import ROOT

from cla_jax.errors import UserError
from cla_jax.serving import Batcher, Engine, Request
from cla_jax.serving.http.app import make_app
from cla_jax.serving.http.auth import check_exposure
from cla_jax.serving.http.limits import Limits
from cla_jax.serving.http.server import warm_up

KEY = "sk-test-key"
LIMITS = Limits(max_body_bytes=16 << 10, max_prompts=2, max_queued_tokens=4 * MAX_LENGTH,
                header_timeout=1.0, body_timeout=1.0, request_timeout=3.0)


class Tokenizer:
    """The byte tokenizer, recording which thread encodes, and failing on one text (an
    internal error the server did not foresee)."""

    def __init__(self, inner):
        self._inner, self.threads = inner, set()

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def encode(self, text):
        self.threads.add(threading.get_ident())
        if text == "explode":
            raise ValueError("the tokenizer broke")
        return self._inner.encode(text)


@pytest.fixture(scope="module")
def server():
    """(base url, batcher, tokenizer, app) of a keyed app with small limits."""
    _, model, params, byte_tokenizer = tiny_model()
    tokenizer = Tokenizer(byte_tokenizer)
    batcher = Batcher(Engine(model, params, num_slots=2, max_length=MAX_LENGTH),
                      decode=tokenizer.decode)
    warm_up(batcher, everything=False)
    batcher.start()
    app = make_app(batcher, tokenizer, "tiny", api_keys=(KEY,), limits=LIMITS)
    try:
        with serving(app, LIMITS) as url:
            yield url, batcher, tokenizer, app
    finally:
        batcher.stop()


def client(url, key=KEY):
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)


def address(url):
    host, port = url.removeprefix("http://").split("/")[0].split(":")
    return host, int(port)


def post(connection, path, body: bytes, headers=None):
    """(status, headers, JSON body) of one request on a kept-alive connection."""
    connection.request("POST", path, body=body, headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {KEY}", **(headers or {})})
    response = connection.getresponse()
    return response.status, response.headers, json.loads(response.read())


def completion_body(**fields) -> bytes:
    return json.dumps({"model": "tiny", "prompt": "the king", "max_tokens": 4, **fields}
                      ).encode()


def assert_openai_error(body, status_words=()):
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    for word in status_words:
        assert word in body["error"]["message"], body


@pytest.fixture
def paused(server):
    """The serving loop stopped (requests queue, nothing runs) and restarted after."""
    _, batcher, *_ = server
    batcher.stop()
    try:
        yield batcher
    finally:
        batcher.start()


# --- API keys --------------------------------------------------------------------------------

def test_v1_routes_need_the_api_key_and_health_does_not(server):
    url, *_ = server
    assert [m.id for m in client(url).models.list().data] == ["tiny"]
    with pytest.raises(openai.AuthenticationError) as caught:
        client(url, "wrong-key").completions.create(model="tiny", prompt="x", max_tokens=2)
    assert caught.value.status_code == 401 and caught.value.body["code"] == "invalid_api_key"
    connection = http.client.HTTPConnection(*address(url), timeout=30)
    connection.request("POST", "/v1/completions", body=completion_body())  # no key at all
    response = connection.getresponse()
    assert response.status == 401 and response.getheader("WWW-Authenticate") == "Bearer"
    assert_openai_error(json.loads(response.read()), ["no API key"])
    connection.request("GET", "/health")
    assert connection.getresponse().read() == b"ok"


def test_an_address_beyond_this_machine_needs_a_key_or_an_explicit_flag():
    for host in ("127.0.0.1", "localhost", "::1"):
        check_exposure(host, (), False)
    with pytest.raises(UserError, match="--api_key .* or pass --allow_without_api_key"):
        check_exposure("0.0.0.0", (), False)
    check_exposure("0.0.0.0", ("key",), False)
    check_exposure("0.0.0.0", (), True)
    done = subprocess.run([sys.executable, "serve.py", "--host=0.0.0.0", "--random_init",
                           "--config=configs/default.py"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 2 and "no API key is set" in done.stderr.splitlines()[-1]


# --- Malformed input and unknown routes: OpenAI's JSON, the connection kept ------------------

def test_every_error_is_openai_json_and_keeps_the_connection(server):
    url, *_ = server
    connection = http.client.HTTPConnection(*address(url), timeout=60)
    cases = [
        (completion_body(prompt="bad \ud800 text"), 400, ["lone surrogate"]),
        (b"[" * 5_000 + b"]" * 5_000, 400, ["nests JSON too deeply"]),
        (b"{not json", 400, ["not valid JSON"]),
        (completion_body(max_tokens=10**9), 400, ["max_tokens"]),
        (completion_body(prompt="explode"), 500, ["the tokenizer broke"]),
    ]
    for body, status, words in cases:
        got, _, answer = post(connection, "/v1/completions", body)
        assert got == status, answer
        assert_openai_error(answer, words)
        # The same connection still serves a good request: nothing was reset.
        assert post(connection, "/v1/completions", completion_body())[0] == 200
    _, _, answer = post(connection, "/v1/completions", completion_body(max_tokens=10**9))
    assert answer["error"]["param"] == "max_tokens"
    for method, path, status in (("GET", "/v1/nowhere", 404), ("GET", "/v1/completions", 405)):
        connection.request(method, path, headers={"Authorization": f"Bearer {KEY}"})
        response = connection.getresponse()
        assert response.status == status
        assert_openai_error(json.loads(response.read()), [path])


# --- Limits ------------------------------------------------------------------------------------

def test_a_body_over_the_limit_gets_413_before_it_is_read(server):
    url, *_ = server
    connection = http.client.HTTPConnection(*address(url), timeout=30)
    # Declared 50 MB, nothing sent: the answer comes from the headers alone.
    connection.putrequest("POST", "/v1/completions")
    for name, value in (("Content-Type", "application/json"), ("Content-Length", "50000000"),
                        ("Authorization", f"Bearer {KEY}")):
        connection.putheader(name, value)
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413
    assert_openai_error(json.loads(response.read()), ["max_body_bytes"])
    with socket.create_connection(address(url), timeout=30) as chunked:  # no Content-Length
        chunked.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                        + KEY.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(3):  # 24 KiB of the 16 KiB allowed, then the server stops reading
            chunked.sendall(b"2000\r\n" + b" " * 0x2000 + b"\r\n")
        assert chunked.recv(4096).startswith(b"HTTP/1.1 413")


def test_prompts_are_tokenized_off_the_event_loop(server):
    url, _, tokenizer, _ = server
    tokenizer.threads.clear()
    client(url).completions.create(model="tiny", prompt="the king", max_tokens=2)
    names = {t.ident: t.name for t in threading.enumerate()}
    # Starlette's thread pool (anyio's workers), not the thread running the event loop.
    encoders = [names.get(ident, "gone") for ident in tokenizer.threads]
    assert encoders and all(name.startswith("AnyIO worker") for name in encoders), encoders


def test_too_many_prompts_get_400_and_a_full_queue_gets_429_with_retry_after(server, paused):
    url, *_ = server
    with pytest.raises(openai.BadRequestError, match="at most 2 .*--max_prompts"):
        client(url).completions.create(model="tiny", prompt=["a", "b", "c"], max_tokens=2)
    # The loop is paused: these wait in the queue, all 256 tokens it may hold.
    queued = [paused.submit(Request(prompt=[1] * 32, max_tokens=32)) for _ in range(4)]
    try:
        connection = http.client.HTTPConnection(*address(url), timeout=30)
        status, headers, answer = post(connection, "/v1/completions", completion_body())
        assert status == 429 and int(headers["Retry-After"]) >= 1
        assert_openai_error(answer, ["busy", "queued"])
    finally:
        for handle in queued:
            paused.cancel(handle)


# --- Time limits -------------------------------------------------------------------------------

def test_half_sent_headers_are_cut_and_a_slow_body_gets_408(server):
    url, *_ = server
    with socket.create_connection(address(url), timeout=30) as half:
        half.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-")
        assert half.recv(1024) == b""  # closed by the server (header_timeout 1 s)
    with socket.create_connection(address(url), timeout=30) as slow:
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n{\"model\"")
        answer = slow.recv(4096).decode()
        assert answer.startswith("HTTP/1.1 408") and '"invalid_request_error"' in answer


def test_a_request_past_its_deadline_gets_504_and_is_cancelled(server, paused):
    url, *_, app = server
    before = finished(app).get("cancelled", 0)
    with pytest.raises(openai.APIStatusError) as caught:
        client(url).completions.create(model="tiny", prompt="x", max_tokens=4)
    assert caught.value.status_code == 504 and "deadline" in caught.value.body["message"]
    paused.step_once()  # what the loop does next: the cancelled request leaves, unrun
    assert not paused.busy
    assert eventually(lambda: finished(app).get("cancelled", 0) == before + 1)


# --- Clients that leave ------------------------------------------------------------------------

def eventually(condition, seconds: float = 60.0) -> bool:
    """Whether `condition()` holds within `seconds` (polled): for what another thread does."""
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def finished(app) -> dict[str, float]:
    families = text_string_to_metric_families(app.state.metrics.exposition().decode())
    return {s.labels["finish_reason"]: s.value for f in families
            if f.name == "cla_requests_finished" for s in f.samples
            if s.name.endswith("_total")}


def test_a_client_that_gives_up_on_a_whole_response_cancels_its_request(server):
    """Not streamed: the server notices the disconnect, not only when writing."""
    url, batcher, _, app = server
    before, length_before = (finished(app).get(r, 0) for r in ("cancelled", "length"))
    batcher.stop()  # queued, not running, until the client has left
    with socket.create_connection(address(url), timeout=30) as gone:
        body = completion_body(max_tokens=MAX_LENGTH - 10)
        gone.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + KEY.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert eventually(lambda: batcher.waiting() == 1)
    assert eventually(lambda: batcher.waiting() == 0)  # the server saw the client leave
    batcher.start()
    # It ends cancelled, having decoded nothing, instead of running to its 54 tokens.
    assert eventually(lambda: finished(app).get("cancelled", 0) == before + 1)
    assert finished(app).get("length", 0) == length_before and not batcher.busy


def test_clients_that_close_mid_request_log_no_tracebacks(server):
    url, *_ = server
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "cla_jax.serving.http")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        for i in range(20):
            with socket.create_connection(address(url), timeout=30) as closing:
                closing.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: "
                                b"Bearer " + KEY.encode() + b"\r\nContent-Length: 500\r\n\r\n"
                                + b"{" * (i * 10))
        assert client(url).completions.create(model="tiny", prompt="x", max_tokens=2)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert [r.getMessage() for r in records if r.exc_info] == []
