"""Stress of the HTTP server as an operator would deploy it: `serve.py` in its own process on
127.0.0.1, with an API key, driven through the faults issue 25 found and a mixed load:

    gave_up        64 clients ask for long completions and give up after 1 s (the openai
                   client's timeout): how long the server keeps decoding, the next request
    big_body       a 50 MB body: time to the refusal, /health meanwhile
    many_prompts   one request with 500 prompts, then a 16-token request
    queue_flood    200 requests of 200 tokens at once: how many get 429 + Retry-After, and
                   the next request
    closing        500 clients send half a request and close: tracebacks logged
    half_headers   a client that sends half a header line: when the server closes it
    mixed_load     the soak's traffic (whole, streamed, cancelled, given up, disconnected,
                   bad, long prompts) from 16 clients: throughput and latencies
and the server's memory before and after. Model: configs/default.py (4M params), random
init, over the byte tokenizer (the model's 4096 ids outnumber its 259: ids past the
tokenizer are sampled and must decode to nothing).

    PYTHONPATH=. python benchmarks/serving_stress.py             # ~3 min on 2 CPU cores
    PYTHONPATH=. python benchmarks/serving_stress.py --mixed=100 --out=/tmp/s.json

Writes benchmarks/results/serving_stress_<date>_<device>.json and prints a table. The
traffic functions also drive the suite's soak test (tests/test_serve_soak.py).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import pathlib
import random
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))
from benchmarks.common import provenance, publish, report  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
KEY = "sk-stress"


# --- Traffic: one function per kind of client, each (url, rng, key) -> (kind, key, text) -----

def _client(url: str, key: str, timeout: float = 120.0):
    import openai  # noqa: PLC0415 (the suite imports this module without needing it)
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=timeout)


def whole(url, rng, key):
    """A sampled completion with one of four seeds: the same seed gives the same text."""
    seed = rng.randrange(4)
    result = _client(url, key).completions.create(
        model="stress", prompt=f"request {seed}", max_tokens=1 + seed * 5, temperature=0.8,
        seed=seed)
    return ("whole", seed, result.choices[0].text)


def streamed(url, rng, key):
    chunks = _client(url, key).completions.create(model="stress", prompt="a stream",
                                                  max_tokens=30, temperature=0, stream=True)
    return ("streamed", None, "".join(c.choices[0].text for c in chunks))


def cancelled_stream(url, rng, key):
    stream = _client(url, key).completions.create(model="stress", prompt="cut short",
                                                  max_tokens=40, stream=True)
    for i, _ in enumerate(stream):
        if i == 1:
            break
    stream.close()
    return ("cancelled_stream", None, None)


def gave_up(url, rng, key, max_tokens=50, timeout=0.02):
    """A whole response the client stops waiting for (the openai client's timeout)."""
    import openai  # noqa: PLC0415
    try:
        _client(url, key, timeout).completions.create(model="stress", prompt="too slow",
                                                      max_tokens=max_tokens)
    except openai.APITimeoutError:
        pass
    return ("gave_up", None, None)


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split("/")[0].rsplit(":", 1)
    return host, int(port)


def _request_bytes(path: str, body: bytes, key: str, length: int | None = None) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: "
            f"{len(body) if length is None else length}\r\n\r\n").encode() + body


def disconnected(url, rng, key):
    """A client that sends all or part of a request and closes without reading."""
    body = json.dumps({"model": "stress", "prompt": "gone", "max_tokens": 40}).encode()
    request = _request_bytes("/v1/completions", body, key)
    headers = len(request) - len(body)
    with socket.create_connection(_address(url), timeout=30) as sock:
        sock.sendall(request[:headers + rng.randrange(len(body) + 1)])
    return ("disconnected", None, None)


BAD = [dict(temperature=-1), dict(max_tokens=10**9), dict(prompt=[10**6]), dict(n=3),
       dict(prompt="\ud800"), dict(model="nope"), dict(stop=["a"] * 5)]


def bad(url, rng, key):
    fields = {"model": "stress", "prompt": "x", **rng.choice(BAD)}
    status, answer = post_json(url + "/completions", fields, key)
    assert status == 400 and answer["error"]["message"], (fields, status, answer)
    return ("bad", None, None)


def long_prompt(url, rng, key, length=48):
    result = _client(url, key).completions.create(model="stress", prompt="x" * length,
                                                  max_tokens=8, temperature=0)
    return ("long", None, result.choices[0].text)


MIX = {whole: 100, streamed: 50, cancelled_stream: 30, gave_up: 30, disconnected: 30,
       bad: 40, long_prompt: 20}  # 300 requests


def mixed_load(url: str, key: str, requests: int, workers: int, seed: int = 0,
               long_prompt_tokens: int = 48) -> dict:
    """`requests` clients of the MIX's kinds (in its proportions, shuffled) from `workers`
    threads: {"results": [(kind, key, text)], "seconds": {kind: [latency]}, "wall_s"}."""
    rng = random.Random(seed)
    kinds = [kind for kind, n in MIX.items() for _ in range(n)]
    jobs = [(kinds[i % len(kinds)], random.Random(rng.random())) for i in range(requests)]
    rng.shuffle(jobs)
    seconds: dict[str, list[float]] = {}

    def run(job):
        kind, job_rng = job
        start = time.perf_counter()
        result = (long_prompt(url, job_rng, key, long_prompt_tokens) if kind is long_prompt
                  else kind(url, job_rng, key))
        seconds.setdefault(result[0], []).append(time.perf_counter() - start)
        return result

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(run, jobs))
    return {"results": results, "seconds": seconds, "wall_s": time.perf_counter() - start}


# --- Talking to the server -------------------------------------------------------------------

def post_json(url: str, fields: dict, key: str, timeout: float = 120.0) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(fields).encode(), headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def metrics(url: str) -> dict[str, float]:
    """{sample name{labels}: value} of GET /metrics."""
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415
    with urllib.request.urlopen(url.removesuffix("/v1") + "/metrics", timeout=60) as response:
        text = response.read().decode()
    return {s.name + (json.dumps(s.labels, sort_keys=True) if s.labels else ""): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def probe(url: str, key: str) -> float:
    """Seconds for a 16-token greedy request: what the next caller waits."""
    return timed(lambda: _client(url, key).completions.create(
        model="stress", prompt="ROMEO:", max_tokens=16, temperature=0))[0]


def health(url: str) -> float:
    def get():
        with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=120) as r:
            return r.read()
    return timed(get)[0]


def idle_after(url: str, limit_s: float = 120.0) -> float:
    """Seconds until no engine request runs or waits (polled through /metrics)."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit_s:
        m = metrics(url)
        if m["cla_requests_running"] == 0 and m["cla_requests_waiting"] == 0:
            break
        time.sleep(0.05)
    return time.perf_counter() - start


def rss_mib(pid: int) -> float:
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


class Server:
    """serve.py in its own process; its stderr is kept (tracebacks are counted in it)."""

    def __init__(self, args, log_path: pathlib.Path):
        self.log = open(log_path, "w+")
        command = [sys.executable, "serve.py", "--random_init", f"--config={args.config}",
                   "--config.data.tokenizer=byte", "--model_name=stress", "--port=0",
                   f"--num_slots={args.num_slots}", f"--api_key={KEY}",
                   f"--header_timeout={args.header_timeout}"]
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                                        stderr=self.log, text=True)
        ready = self.process.stdout.readline()
        found = re.search(r"http://\S+/v1", ready)
        if not found:
            self.stop()
            raise RuntimeError(f"serve.py did not start: {ready}{log_path.read_text()[-3000:]}")
        self.url, self.ready_line = found.group(0).rstrip(":"), ready.strip()

    def tracebacks(self) -> int:
        self.log.flush()
        return pathlib.Path(self.log.name).read_text().count("Traceback")

    def log_bytes(self) -> int:
        return pathlib.Path(self.log.name).stat().st_size

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)
        self.log.close()


# --- The scenarios -------------------------------------------------------------------------

def gave_up_scenario(url: str, clients: int = 64, max_tokens: int = 400) -> dict:
    """The issue's first stress: clients give up on long whole responses after 1 s."""
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda _: gave_up(url, None, KEY, max_tokens, 1.0), range(clients)))
    gave_up_s = time.perf_counter() - start
    return {"clients": clients, "max_tokens": max_tokens, "clients_done_s": gave_up_s,
            "server_busy_after_s": idle_after(url), "next_request_s": probe(url, KEY)}


def big_body_scenario(url: str, megabytes: int = 50) -> dict:
    """A 50 MB body, sent as fast as the socket takes it, while /health is asked."""
    size = megabytes << 20
    answer: dict = {}

    def upload():
        start = time.perf_counter()
        with socket.create_connection(_address(url), timeout=120) as sock:
            sock.sendall(_request_bytes("/v1/completions", b"", KEY, size))
            try:
                chunk = b"x" * (1 << 20)
                for _ in range(megabytes):
                    sock.sendall(chunk)
            except OSError:
                pass  # the server answered and closed: it need not read the rest
            try:
                answer["status_line"] = sock.recv(256).split(b"\r\n")[0].decode()
            except OSError as error:  # reset before the answer could be read
                answer["status_line"] = f"connection {type(error).__name__}"
        answer["refused_after_s"] = time.perf_counter() - start

    thread = threading.Thread(target=upload)
    thread.start()
    health_s = []
    while thread.is_alive():
        health_s.append(health(url))
    thread.join()
    return {"body_mb": megabytes, **answer, "health_max_s": max(health_s, default=0.0),
            "health_requests": len(health_s)}


def many_prompts_scenario(url: str, prompts: int = 500) -> dict:
    status_s, (status, answer) = timed(lambda: post_json(
        url + "/completions", {"model": "stress", "prompt": ["ROMEO:"] * prompts,
                               "max_tokens": 16}, KEY))
    return {"prompts": prompts, "status": status, "answered_s": status_s,
            "message": answer.get("error", {}).get("message"),
            "next_request_s": probe(url, KEY)}


def queue_flood_scenario(url: str, requests: int = 200, max_tokens: int = 200) -> dict:
    statuses: dict[int, int] = {}
    retry_after = set()

    def one(_):
        request = urllib.request.Request(
            url + "/completions", data=json.dumps({"model": "stress", "prompt": "flood",
                                                   "max_tokens": max_tokens}).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                code = response.status
        except urllib.error.HTTPError as error:
            code = error.code
            if error.headers.get("Retry-After"):
                retry_after.add(int(error.headers["Retry-After"]))
        statuses[code] = statuses.get(code, 0) + 1

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(requests) as pool:
        list(pool.map(one, range(requests)))
    return {"requests": requests, "max_tokens": max_tokens,
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "retry_after_s": sorted(retry_after), "all_answered_s": time.perf_counter() - start,
            "next_request_s": probe(url, KEY)}


def closing_scenario(url: str, server: Server, clients: int = 500) -> dict:
    before, bytes_before = server.tracebacks(), server.log_bytes()
    rng = random.Random(1)
    for _ in range(clients):
        disconnected(url, rng, KEY)
    idle_after(url)
    return {"clients": clients, "tracebacks_logged": server.tracebacks() - before,
            "log_bytes": server.log_bytes() - bytes_before}


def half_headers_scenario(url: str) -> dict:
    start = time.perf_counter()
    with socket.create_connection(_address(url), timeout=120) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-")
        closed = sock.recv(1024) == b""
    return {"closed_by_server": closed, "closed_after_s": time.perf_counter() - start}


def latency_summary(values: list[float]) -> dict:
    values = sorted(values)
    return {"count": len(values), "p50_s": statistics.median(values),
            "p95_s": values[min(len(values) - 1, int(0.95 * len(values)))], "max_s": values[-1]}


def mixed_scenario(url: str, requests: int, workers: int) -> dict:
    before = metrics(url)
    load = mixed_load(url, KEY, requests, workers, long_prompt_tokens=400)
    busy_s = idle_after(url)
    after = metrics(url)
    generated = after["cla_generation_tokens_total"] - before["cla_generation_tokens_total"]
    finished = {k.split('"')[3]: after[k] - before.get(k, 0) for k in after
                if k.startswith("cla_requests_finished_total")}
    return {"requests": requests, "workers": workers, "wall_s": load["wall_s"],
            "requests_per_s": requests / load["wall_s"],
            "generated_tokens_per_s": generated / load["wall_s"],
            "drain_after_s": busy_s, "finished": finished,
            "latency_by_kind": {k: latency_summary(v) for k, v in load["seconds"].items()},
            "end_state": {k: after[k] for k in ("cla_requests_running", "cla_requests_waiting",
                                                "cla_kv_cache_usage_ratio")}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/default.py")
    p.add_argument("--num_slots", type=int, default=8)
    p.add_argument("--header_timeout", type=float, default=10.0)
    p.add_argument("--mixed", type=int, default=300, help="requests of the mixed load")
    p.add_argument("--workers", type=int, default=16, help="clients of the mixed load")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def run(args) -> dict:
    started = time.perf_counter()
    log_path = pathlib.Path("/tmp") / f"serving_stress_{int(time.time())}.log"
    server = Server(args, log_path)
    try:
        url = server.url
        rss_start = rss_mib(server.process.pid)
        baseline = {"probe_s": statistics.median(probe(url, KEY) for _ in range(5)),
                    "health_s": statistics.median(health(url) for _ in range(5))}
        scenarios = {"gave_up": gave_up_scenario(url), "big_body": big_body_scenario(url),
                     "many_prompts": many_prompts_scenario(url),
                     "queue_flood": queue_flood_scenario(url),
                     "closing": closing_scenario(url, server),
                     "half_headers": half_headers_scenario(url),
                     "mixed_load": mixed_scenario(url, args.mixed, args.workers)}
        baseline["probe_after_all_s"] = probe(url, KEY)
        memory = {"rss_start_mib": rss_start, "rss_end_mib": rss_mib(server.process.pid)}
        tracebacks = server.tracebacks()
        ready = server.ready_line
    finally:
        server.stop()
    return report(
        "serving_stress",
        what=("serve.py in its own process on 127.0.0.1 (API key on), through the faults of "
              "issue 25 and a mixed load; each *next_request_s* is a 16-token greedy request "
              "sent right after the scenario, to compare with baseline.probe_s."),
        settings=dict(config=args.config, num_slots=args.num_slots,
                      header_timeout=args.header_timeout, mixed=args.mixed,
                      workers=args.workers, server=ready),
        baseline=baseline, scenarios=scenarios, memory=memory,
        tracebacks_in_server_log=tracebacks, run_time_s=time.perf_counter() - started)


def table(rep: dict) -> str:
    b, s = rep["baseline"], rep["scenarios"]
    m = s["mixed_load"]
    rows = [
        ("baseline 16-token request", f"{b['probe_s'] * 1000:.0f} ms; /health "
                                      f"{b['health_s'] * 1000:.1f} ms"),
        ("64 clients give up at 1 s", f"server busy {s['gave_up']['server_busy_after_s']:.2f} s "
                                      f"after; next request "
                                      f"{s['gave_up']['next_request_s'] * 1000:.0f} ms"),
        ("50 MB body", f"{s['big_body']['status_line']} after "
                       f"{s['big_body']['refused_after_s']:.2f} s; /health max "
                       f"{s['big_body']['health_max_s'] * 1000:.0f} ms"),
        ("500 prompts in one request", f"HTTP {s['many_prompts']['status']} in "
                                       f"{s['many_prompts']['answered_s'] * 1000:.0f} ms; next "
                                       f"{s['many_prompts']['next_request_s'] * 1000:.0f} ms"),
        ("200 requests of 200 tokens at once", f"{s['queue_flood']['statuses']}, Retry-After "
                                      f"{s['queue_flood']['retry_after_s']}; next "
                                      f"{s['queue_flood']['next_request_s'] * 1000:.0f} ms"),
        ("500 clients close mid-request", f"{s['closing']['tracebacks_logged']} tracebacks, "
                                          f"{s['closing']['log_bytes']} log bytes"),
        ("half a header line", f"closed after {s['half_headers']['closed_after_s']:.1f} s"),
        (f"mixed load ({m['requests']} requests, {m['workers']} clients)",
         f"{m['requests_per_s']:.1f} req/s, {m['generated_tokens_per_s']:.0f} tok/s, "
         f"end state {m['end_state']}"),
        ("after everything", f"16-token request {b['probe_after_all_s'] * 1000:.0f} ms; RSS "
                             f"{rep['memory']['rss_start_mib']:.0f} -> "
                             f"{rep['memory']['rss_end_mib']:.0f} MiB"),
    ]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows) + \
        f"\n({provenance(rep)})"


def main(argv=None):
    args = parse_args(argv)
    rep = run(args)
    publish(rep, table(rep), args.out)


if __name__ == "__main__":
    main()
