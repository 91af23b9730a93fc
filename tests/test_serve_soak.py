"""A bounded soak of the HTTP server: a few hundred requests at once, mixed as an operator's
traffic would be (whole and streamed, greedy and sampled, clients that cancel a stream,
give up on a whole response or close the connection, bad requests, long prompts), then
checks that it ends clean: every engine request accounted for, no slot held, the queue
empty, nothing decoding for nobody, and a last request that takes the same device steps
and gives the same text as the first. Timings are printed, not asserted (a loaded 2-core
machine can stall any one request); what would make the last request slow is asserted.
The traffic is benchmarks/serving_stress.py's, which runs it against serve.py at scale."""
import time

import openai
import pytest
from serving_app import MAX_LENGTH, serving, tiny_model
from test_serve import scrape
from test_serve_limits import eventually

from benchmarks import serving_stress
from cla_jax.serving import PagedBatcher, PagedEngine
from cla_jax.serving.http.app import make_app
from cla_jax.serving.http.server import warm_up

REQUESTS = 300
WORKERS = 8
PROBE = dict(model="stress", prompt="the first and the last", max_tokens=20, temperature=0)


@pytest.fixture(scope="module")
def soaked():
    _, model, params, tokenizer = tiny_model()
    # The paged engine with a pool of two MAX_LENGTH sequences' blocks for up to 8 requests:
    # the soak admits by blocks, preempts and reuses prefixes.
    batcher = PagedBatcher(PagedEngine(model, params, num_blocks=9, block_size=16,
                                       max_length=MAX_LENGTH, max_seqs=8),
                           decode=tokenizer.decode)
    warm_up(batcher)  # every bucket: no compile in the middle of the soak
    batcher.start()
    try:
        with serving(make_app(batcher, tokenizer, "stress")) as url:
            yield url, batcher
    finally:
        batcher.stop()


def probe(url, batcher):
    steps, start = batcher.steps, time.perf_counter()
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
    text = client.completions.create(**PROBE).choices[0].text
    return text, batcher.steps - steps, time.perf_counter() - start


def test_a_soak_of_mixed_traffic_ends_clean(soaked):
    url, batcher = soaked
    assert sum(serving_stress.MIX.values()) == REQUESTS
    first = probe(url, batcher)
    load = serving_stress.mixed_load(url, "unused", REQUESTS, WORKERS)
    results, soak_s = load["results"], load["wall_s"]

    # Under load, the same request gives the same text: greedy, or sampled with one seed.
    by_kind: dict = {}
    for kind, key, text in results:
        by_kind.setdefault((kind, key), set()).add(text)
    for (kind, _), texts in by_kind.items():
        if kind in ("whole", "streamed", "long"):
            assert len(texts) == 1, (kind, texts)

    # Ends clean: every engine request has ended, nothing holds a slot or waits.
    assert eventually(lambda: not batcher.busy)
    metrics = scrape(url)
    finished = sum(v for k, v in metrics.items() if k.startswith("cla_requests_finished_total"))
    assert eventually(lambda: sum(v for k, v in scrape(url).items()
                                  if k.startswith("cla_requests_finished_total"))
                      == scrape(url)["cla_requests_total"]), (finished, metrics)
    metrics = scrape(url)
    assert metrics['cla_requests_finished_total{"finish_reason": "cancelled"}'] > 0
    assert batcher.slots_in_use() == 0 and batcher.waiting() == 0
    assert batcher.blocks.num_free() == batcher.blocks.usable  # no block leaked
    assert metrics["cla_requests_running"] == metrics["cla_requests_waiting"] == 0
    assert metrics["cla_kv_cache_usage_ratio"] == 0 and metrics["cla_queued_tokens"] == 0
    idle_steps = batcher.steps
    time.sleep(0.5)
    assert batcher.steps == idle_steps  # nothing decodes for a client that is gone

    last = probe(url, batcher)
    assert last[:2] == first[:2]  # same text, same device steps: no leftover work in the way
    print(f"\nsoak: {REQUESTS} requests in {soak_s:.1f} s with {WORKERS} clients; first "
          f"request {first[2] * 1000:.0f} ms, last {last[2] * 1000:.0f} ms; finished "
          f"{ {k: v for k, v in metrics.items() if 'finished_total' in k} }")
