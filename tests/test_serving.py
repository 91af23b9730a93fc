"""The serving engine and its continuous batching: requests joining a busy pool at different
times produce what `decoding.generate` produces for each alone; a request's samples do not
depend on its neighbours; stops, max tokens and eviction; no slot leaks."""

import jax
import numpy as np
import pytest
from test_model import make_config, make_params

from cla_jax import sharding
from cla_jax.decoding import Sampling, generate
from cla_jax.errors import UserError
from cla_jax.model import abstract_params
from cla_jax.serving import Batcher, Engine, Request, RequestError
from cla_jax.serving.engine import bucket_for, buckets


def alone(config, params, request, cache_dtype="float32"):
    """decoding.generate for one request, greedy, cut at its max_tokens (one compile per
    prompt length: max_new_tokens is fixed at the config's test maximum)."""
    tokens, _ = generate(config, params, [list(request.prompt)], 10, Sampling(temperature=0),
                         cache_dtype=cache_dtype)
    return np.asarray(tokens)[0, :request.max_tokens].tolist()


def staggered(batcher, requests, arrivals):
    """Submits request i before loop iteration arrivals[i]; returns the handles."""
    handles, iteration = {}, 0
    while len(handles) < len(requests) or batcher.busy:
        for i, when in enumerate(arrivals):
            if when == iteration:
                handles[i] = batcher.submit(requests[i])
        batcher.step_once()
        iteration += 1
    return [handles[i] for i in range(len(requests))]


@pytest.mark.parametrize("pattern,kv,cache_dtype", [
    *((p, kv, "float32") for p in ("cla1", "cla2", "cla3_uneven") for kv in ("mha", "gqa", "mqa")),
    ("cla2", "mqa", "int8"),  # the quantised cache: the engine quantises as generate does
])
def test_greedy_requests_joining_a_busy_pool_equal_each_request_alone(pattern, kv,
                                                                      cache_dtype):
    config = make_config(pattern, kv, max_seq_len=32, attention="xla")
    params = make_params(config, seed=2)
    rng = np.random.RandomState(3)
    # One prompt length and one attention window keep this to one compile per program (the
    # next tests cross prompt buckets and windows). With two slots the third request waits,
    # then joins a pool whose other slot is mid-sequence.
    requests = [Request(prompt=rng.randint(0, config.vocab_size, 9).tolist(), max_tokens=m,
                        temperature=0.0) for m in (10, 4, 7)]
    batcher = Batcher(Engine(config, params, num_slots=2, max_length=32, min_window_bucket=32,
                             cache_dtype=cache_dtype))
    handles = staggered(batcher, requests, arrivals=[0, 0, 2])
    for request, handle in zip(requests, handles):
        completion = handle.result(timeout=0)
        assert completion.tokens == alone(config, params, request, cache_dtype)
        assert completion.finish_reason == "length"
    assert batcher.slots_in_use() == 0 and max(batcher.slot_steps / batcher.steps, 0) > 1


def test_a_requests_samples_do_not_depend_on_its_neighbours():
    config = make_config("cla2", "gqa", max_seq_len=48, attention="xla")
    params = make_params(config, seed=4)
    probe = Request(prompt=[5, 9, 2, 7], max_tokens=12, temperature=0.9, top_k=20, top_p=0.9,
                    seed=123)
    rng = np.random.RandomState(0)
    others = [Request(prompt=rng.randint(0, 61, rng.randint(1, 20)).tolist(),
                      max_tokens=int(rng.randint(2, 20)), temperature=float(rng.rand() * 2),
                      top_p=float(rng.uniform(0.3, 1.0)), seed=int(rng.randint(1000)))
              for _ in range(5)]
    engine = Engine(config, params, num_slots=4, max_length=48, min_window_bucket=16)
    by_itself = staggered(Batcher(engine, steps_per_call=1), [probe], [0])[0].result().tokens
    # Crowded, and with several steps per device call: the same tokens.
    crowded = staggered(Batcher(engine, steps_per_call=3), others + [probe],
                        [0, 0, 0, 1, 4, 3])[-1].result()
    assert crowded.tokens == by_itself
    # ... and the seed matters: another seed samples another continuation.
    reseeded = Request(**{**probe.__dict__, "seed": 124})
    assert staggered(Batcher(engine), [reseeded], [0])[0].result().tokens != by_itself


def letters(tokens):
    return "".join(chr(ord("a") + t % 26) for t in tokens)


def test_stop_ids_stop_strings_and_max_tokens_end_a_request_and_free_its_slot():
    config = make_config("cla2", "mqa", max_seq_len=48, attention="xla")
    params = make_params(config, seed=5)
    engine = Engine(config, params, num_slots=2, max_length=48, min_window_bucket=16)
    free = Batcher(engine, letters)
    handle = free.submit(Request(prompt=[3, 4, 5], max_tokens=20, temperature=0))
    free.run_until_idle()
    run = handle.result().tokens  # the unconstrained greedy continuation
    stop_id = run[5]
    first = run.index(stop_id)
    text = letters(run)
    stop_string = text[7:9]
    cut = text.index(stop_string)

    batcher = Batcher(engine, letters)
    by_id = batcher.submit(Request(prompt=[3, 4, 5], max_tokens=20, temperature=0,
                                   stop_ids=[stop_id]))
    by_string = batcher.submit(Request(prompt=[3, 4, 5], max_tokens=20, temperature=0,
                                       stop=[stop_string, "nowhere"]))
    by_length = batcher.submit(Request(prompt=[3, 4, 5], max_tokens=4, temperature=0))
    streamed = []
    batcher.submit(Request(prompt=[3, 4, 5], max_tokens=20, temperature=0,
                           stop=[stop_string]), on_event=streamed.append)
    batcher.run_until_idle()
    assert by_id.result().tokens == run[:first + 1] and by_id.result().finish_reason == "stop"
    assert by_id.result().text == text[:first]  # the stop id is kept in tokens, not text
    assert by_string.result().text == text[:cut] and by_string.result().finish_reason == "stop"
    assert by_length.result().tokens == run[:4]
    assert by_length.result().finish_reason == "length"
    # Streaming: the pieces add up to the final text, and no piece shows the stop string.
    assert "".join(e.text for e in streamed) == text[:cut]
    assert [e.finish_reason for e in streamed][-1] == "stop" and len(streamed) > 2
    assert batcher.slots_in_use() == 0 and not batcher.busy

    # Cancelling: a running request leaves its slot at once, a waiting one never runs.
    running = [batcher.submit(Request(prompt=[3, 4, 5], max_tokens=20, temperature=0))
               for _ in range(2)]
    waiting = batcher.submit(Request(prompt=[3, 4, 5], max_tokens=20, temperature=0))
    batcher.step_once()
    batcher.step_once()
    batcher.cancel(running[0])
    batcher.cancel(waiting)
    batcher.step_once()
    assert running[0].result(timeout=0).finish_reason == "cancelled"
    # The prefill's token, then two calls of steps_per_call steps.
    assert running[0].result().tokens == run[:1 + 2 * batcher.steps_per_call]
    assert waiting.result(timeout=0).tokens == [] and batcher.slots_in_use() == 1
    batcher.run_until_idle()
    assert running[1].result().tokens == run and not batcher.busy


def test_no_slot_leaks_after_a_thousand_requests():
    config = make_config("cla2", "mqa", max_seq_len=24, attention="xla")
    params = make_params(config, seed=6)
    batcher = Batcher(Engine(config, params, num_slots=3, max_length=24, min_window_bucket=16))
    rng = np.random.RandomState(1)
    requests = [Request(prompt=rng.randint(0, 61, rng.randint(1, 6)).tolist(),
                        max_tokens=int(rng.randint(1, 4)), temperature=1.0,
                        stop_ids=[int(rng.randint(61))], seed=i) for i in range(1000)]
    handles = []
    for start in range(0, 1000, 100):  # arrivals in waves, while earlier ones still run
        handles += [batcher.submit(r) for r in requests[start:start + 100]]
        for _ in range(5):
            batcher.step_once()
    batcher.run_until_idle()
    assert all(h.done() for h in handles) and batcher.slots_in_use() == 0
    for request, handle in zip(requests, handles):
        c = handle.result(timeout=0)
        assert 1 <= len(c.tokens) <= request.max_tokens
        stopped = c.tokens[-1] in request.stop_ids
        assert c.finish_reason == ("stop" if stopped else "length")
        assert stopped or len(c.tokens) == request.max_tokens
        assert not any(t in request.stop_ids for t in c.tokens[:-1])
    # Every decode step ran at most num_slots sequences, and the pool stayed busy.
    assert batcher.slot_steps <= 3 * batcher.steps
    # A request of n tokens ran ceil((n - 1) / k) calls of k steps (its first token comes
    # from the prefill); no slot step is unaccounted for.
    k = batcher.steps_per_call
    assert batcher.slot_steps == sum(k * -(-(len(h.result().tokens) - 1) // k) for h in handles)


@pytest.mark.parametrize("changes,words", [
    (dict(prompt=[]), "prompt is empty"),
    (dict(prompt=[1, 61]), "outside the vocabulary"),
    (dict(max_tokens=0), "max_tokens must be an integer >= 1"),
    (dict(max_tokens=30), "exceeds the context length 24"),
    (dict(temperature=-1.0), "temperature must be"),
    (dict(top_p=0.0), "top_p must be in"),
    (dict(top_k=62), "exceeds the model's vocab_size"),
    (dict(seed=-3), "seed must be"),
    (dict(stop_ids=[99]), "stop ids must be"),
    (dict(stop=[""]), "stop strings must be non-empty"),
])
def test_bad_requests_are_refused_with_a_clear_message(changes, words):
    config = make_config("cla2", "mqa", max_seq_len=24)
    batcher = Batcher(Engine(config, make_params(config), num_slots=1, max_length=24),
                      letters)
    with pytest.raises(UserError, match=words):
        batcher.submit(Request(**{**dict(prompt=[1, 2], max_tokens=4), **changes}))
    assert not batcher.busy


def test_buckets_bound_the_compiles():
    assert buckets(16, 100) == (16, 32, 64, 100)
    assert buckets(16, 600, step=128) == (16, 32, 64, 128, 256, 384, 512, 600)
    assert bucket_for(17, buckets(16, 100)) == 32 and bucket_for(100, (16, 100)) == 100


def test_the_engine_on_a_mesh_equals_one_device():
    config = make_config("cla2", "gqa", max_seq_len=32, attention="xla", vocab_size=64)
    params = make_params(config, seed=7)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = jax.device_put(params, sharding.param_shardings(abstract_params(config), mesh))
    rng = np.random.RandomState(2)
    requests = [Request(prompt=rng.randint(0, 64, n).tolist(), max_tokens=6, temperature=0.7,
                        seed=n) for n in (2, 11, 5, 7, 3)]
    one = staggered(Batcher(Engine(config, params, 4, 32)), requests, [0, 0, 1, 2, 2])
    many = staggered(Batcher(Engine(config, sharded, 4, 32, mesh=mesh)), requests,
                     [0, 0, 1, 2, 2])
    assert [h.result().tokens for h in many] == [h.result().tokens for h in one]



# --- Faults that used to take the loop down or hang a caller ---------------------------------

@pytest.fixture(scope="module")
def small_engine():
    config = make_config("cla2", "mqa", max_seq_len=48, attention="xla")
    return Engine(config, make_params(config, seed=8), num_slots=2, max_length=48,
                  min_window_bucket=16)


def greedy_runs(engine, prompts, max_tokens=12):
    handles = staggered(Batcher(engine), [Request(prompt=p, max_tokens=max_tokens,
                                                  temperature=0) for p in prompts],
                        [0] * len(prompts))
    return [h.result().tokens for h in handles]


def test_a_request_whose_text_cannot_be_decoded_fails_alone(small_engine):
    """One request's host-side failure (here its decode, as a SentencePiece tokenizer smaller
    than the model used to fail) ends that request with the error; the loop keeps serving the
    others and later ones."""
    prompts = [[3, 4], [9, 9, 9], [17], [30, 2]]
    runs = greedy_runs(small_engine, prompts)
    bad, good = next((a, b) for a in range(4) for b in range(4) if runs[a][0] != runs[b][0])
    poison = runs[bad][0]

    def decode(tokens):
        if tokens and tokens[0] == poison:
            raise IndexError("piece id is out of range")
        return letters(tokens)

    batcher = Batcher(small_engine, decode)
    batcher.start()
    try:
        failing = batcher.submit(Request(prompt=prompts[bad], max_tokens=12, temperature=0))
        serving = batcher.submit(Request(prompt=prompts[good], max_tokens=12, temperature=0))
        with pytest.raises(IndexError, match="out of range"):
            failing.result(timeout=120)
        assert serving.result(timeout=120).tokens == runs[good]
        later = batcher.submit(Request(prompt=prompts[good], max_tokens=3, temperature=0))
        assert later.result(timeout=120).tokens == runs[good][:3]
        assert batcher.slots_in_use() == 0 and not batcher.busy
    finally:
        batcher.stop()


class FailingEngine:
    """small_engine, but `program` (prefill or insert) raises for prompts longer than 16, as
    compiling a new prompt bucket out of memory would: before touching the pool (the pool
    keeps serving), or after its donated state is gone (the loop fails)."""

    def __init__(self, engine, program):
        self._engine, self._program = engine, program

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def prefill(self, prompt, *args):
        if self._program == "prefill" and len(prompt) > 16:
            raise MemoryError("RESOURCE_EXHAUSTED compiling the prefill of bucket 32")
        return self._engine.prefill(prompt, *args)

    def insert(self, state, prefix, slot):
        if (self._program or "").startswith("insert") and int(prefix.cache.lengths[0]) > 16:
            if self._program == "insert_consuming_the_pool":  # as a failed donated call can
                jax.tree_util.tree_map(lambda leaf: leaf.delete(), state)
            raise MemoryError("RESOURCE_EXHAUSTED compiling the insert of bucket 32")
        return self._engine.insert(state, prefix, slot)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("program", ["prefill", "insert", "insert_consuming_the_pool"])
def test_a_request_that_fails_to_start_gets_its_error_instead_of_a_hang(
        small_engine, program):
    batcher = Batcher(FailingEngine(small_engine, program))
    batcher.start()
    try:
        long = batcher.submit(Request(prompt=[5] * 20, max_tokens=4, temperature=0))
        with pytest.raises(MemoryError, match="RESOURCE_EXHAUSTED"):
            long.result(timeout=120)  # it used to wait forever: in neither queue nor slot
        if program == "insert_consuming_the_pool":  # no cache left to serve from
            batcher._thread.join(120)
            with pytest.raises(RuntimeError, match="serving loop stopped"):
                batcher.submit(Request(prompt=[5] * 3, max_tokens=4))
            return
        short = batcher.submit(Request(prompt=[5] * 3, max_tokens=4, temperature=0))
        assert len(short.result(timeout=120).tokens) == 4
        assert batcher.slots_in_use() == 0 and not batcher.busy
    finally:
        batcher.stop()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_submit_racing_a_loop_failure_is_refused_not_lost(small_engine, monkeypatch):
    """The loop fails while a submit is between its checks and the queue: the submit must
    raise (or its request fail), never queue a request nobody will run."""
    class BrokenStep(FailingEngine):
        def step(self, *args):
            raise RuntimeError("the device is gone")

    batcher = Batcher(BrokenStep(small_engine, None))
    batcher.start()
    real_check = Request.check

    def check_while_the_loop_fails(request, *args):
        real_check(request, *args)
        if request.max_tokens == 5:  # the racing submit: let the loop fail meanwhile
            with pytest.raises(RuntimeError, match="device is gone"):
                batcher.submit(Request(prompt=[3], max_tokens=4)).result(timeout=120)
            batcher._thread.join(120)

    monkeypatch.setattr(Request, "check", check_while_the_loop_fails)
    try:
        with pytest.raises(RuntimeError, match="serving loop stopped"):
            handle = batcher.submit(Request(prompt=[3], max_tokens=5))
            handle.result(timeout=5)  # before the fix: TimeoutError, queued for nobody
    finally:
        batcher._thread = None


def test_every_bit_of_a_seed_counts(small_engine):
    from cla_jax.sampling import seed_key
    assert (np.asarray(jax.random.key_data(seed_key(5)))
            == np.asarray(jax.random.key_data(jax.random.key(5)))).all()  # old seeds unchanged

    def sampled(seed):
        request = Request(prompt=[3, 4], max_tokens=16, temperature=1.5, seed=seed)
        return staggered(Batcher(small_engine), [request], [0])[0].result().tokens

    assert sampled(2**32 + 5) != sampled(5)
    assert sampled(2**32 + 5) == sampled(2**32 + 5)


def test_a_bad_request_error_names_its_parameter(small_engine):
    batcher = Batcher(small_engine)
    cases = {"max_tokens": dict(prompt=[3], max_tokens=10**9),
             "prompt": dict(prompt=[3] * 48, max_tokens=1),
             "temperature": dict(prompt=[3], temperature=-1.0),
             "top_p": dict(prompt=[3], top_p=0.0), "seed": dict(prompt=[3], seed=-1)}
    for param, fields in cases.items():
        with pytest.raises(RequestError) as caught:
            batcher.submit(Request(**fields))
        assert caught.value.param == param, (param, str(caught.value))
