"""The paged engine and its scheduler: every request's tokens equal `decoding.generate` for it
alone (greedy) or the slot engine's (sampled), through paging, chunked prefill mixed with
decode, preemption and prefix reuse; the block pool's bookkeeping; no block leaks."""

import jax
import numpy as np
import pytest
from test_model import make_config, make_params
from test_serving import alone

from cla_jax import sharding
from cla_jax.errors import UserError
from cla_jax.model import abstract_params
from cla_jax.serving import Batcher, Engine, Request, RequestError
from cla_jax.serving.blocks import BlockPool, block_keys
from cla_jax.serving.paged_engine import PagedEngine
from cla_jax.serving.scheduler import PagedBatcher

# One window and few shapes keep each case to a handful of compiles.
SMALL = dict(block_size=4, max_seqs=4, chunk_tokens=16, prefill_rows=(1, 4), min_window=32)


def run_all(batcher, requests):
    handles = [batcher.submit(r) for r in requests]
    batcher.run_until_idle()
    return [h.result(timeout=0) for h in handles]


def assert_no_leaks(batcher):
    assert batcher.slots_in_use() == 0 and not batcher.busy
    assert batcher.blocks.num_free() == batcher.blocks.usable
    assert (batcher.blocks.refs == 0).all()


def prompts(config, lengths, seed=3):
    rng = np.random.RandomState(seed)
    return [rng.randint(0, config.vocab_size, n).tolist() for n in lengths]


@pytest.mark.parametrize("pattern,kv,cache_dtype", [
    *((p, kv, "float32") for p in ("cla1", "cla2", "cla3_uneven") for kv in ("mha", "gqa", "mqa")),
    ("cla2", "mqa", "int8"), ("cla3_uneven", "gqa", "int8"),
])
def test_paged_greedy_requests_equal_each_request_alone(pattern, kv, cache_dtype):
    """Prompts of 1 to 20 tokens: a 20-token prompt runs in two chunks of 16 while the others
    decode; the pool (11 usable blocks of 4) cannot hold all four at once, so some wait for
    blocks or are preempted and recomputed."""
    config = make_config(pattern, kv, max_seq_len=32, attention="xla")
    params = make_params(config, seed=2)
    requests = [Request(prompt=p, max_tokens=m, temperature=0.0)
                for p, m in zip(prompts(config, (9, 20, 3, 1)), (10, 4, 7, 5))]
    batcher = PagedBatcher(PagedEngine(config, params, num_blocks=12, cache_dtype=cache_dtype,
                                       **SMALL), steps_per_call=2, reserve_blocks=0)
    for request, completion in zip(requests, run_all(batcher, requests)):
        assert completion.tokens == alone(config, params, request, cache_dtype)
        assert completion.finish_reason == "length"
    assert batcher.prefill_tokens >= 20 + 9 + 3  # the 1-token prompt goes straight to decode
    assert_no_leaks(batcher)


@pytest.mark.parametrize("cache_dtype", ["float32", "int8"])
def test_decode_through_the_pallas_gpu_paged_kernel_equals_each_request_alone(cache_dtype):
    """attention=pallas_gpu: the decode rows read their pages through jax's Triton
    paged-attention kernel (in Pallas's interpreter on this CPU), int8 scales included."""
    config = make_config("cla2", "gqa", max_seq_len=32, attention="pallas_gpu", head_dim=16)
    params = make_params(config, seed=5)
    requests = [Request(prompt=p, max_tokens=m, temperature=0.0)
                for p, m in zip(prompts(config, (6, 3)), (6, 8))]
    engine = PagedEngine(config, params, num_blocks=12, cache_dtype=cache_dtype, **SMALL)
    x = engine.empty_inputs(4, None, 32)
    jaxpr = str(engine._step.trace(engine.params, engine.init_state(), x, 2).jaxpr)
    assert "pallas_call" in jaxpr  # the kernel, not the gather, serves the decode rows
    xla = PagedEngine(config.replace(attention="xla"), params, num_blocks=12, **SMALL)
    assert "pallas_call" not in str(xla._step.trace(params, xla.init_state(), x, 2).jaxpr)
    for request, completion in zip(requests, run_all(PagedBatcher(engine, steps_per_call=2),
                                                     requests)):
        assert completion.tokens == alone(config, params, request, cache_dtype)


def test_preemption_recomputes_and_changes_nothing_sampled():
    """Sampled requests through a pool so small that sequences are preempted and recomputed
    give the slot engine's tokens for the same seeds (token i draws fold_in(key(seed), i))."""
    config = make_config("cla2", "gqa", max_seq_len=32, attention="xla")
    params = make_params(config, seed=1)
    requests = [Request(prompt=p, max_tokens=12, temperature=1.0, top_k=20, seed=s)
                for s, p in enumerate(prompts(config, (7, 5, 9, 6, 8)))]
    paged = PagedBatcher(PagedEngine(config, params, num_blocks=10, **SMALL),
                         steps_per_call=2, reserve_blocks=0)
    got = run_all(paged, requests)
    assert paged.preemptions > 0
    slots = Batcher(Engine(config, params, num_slots=2, max_length=32, min_window_bucket=32),
                    steps_per_call=2)
    want = run_all(slots, requests)
    assert [c.tokens for c in got] == [c.tokens for c in want]
    assert_no_leaks(paged)


def test_a_long_prompt_is_chunked_while_the_others_keep_decoding():
    config = make_config("cla2", "mqa", max_seq_len=64, attention="xla")
    params = make_params(config, seed=0)
    engine = PagedEngine(config, params, num_blocks=40, block_size=4, max_seqs=4,
                         chunk_tokens=8, prefill_rows=(1,), min_window=64)
    batcher = PagedBatcher(engine, steps_per_call=1)
    short, long = (Request(prompt=p, max_tokens=m, temperature=0.0)
                   for p, m in zip(prompts(config, (3, 40)), (10, 3)))
    first = batcher.submit(short)
    batcher.step_once()
    before = len(first._completion.tokens) if first.done() else None
    second = batcher.submit(long)
    decoded_during_prefill = 0
    while not second.done() or batcher.busy:
        tokens_before = batcher.slot_steps
        batcher.step_once()
        if batcher.prefill_tokens < 40 and batcher.slot_steps > tokens_before:
            decoded_during_prefill += 1
    assert before is None
    # 40 prompt tokens in chunks of 8: five steps, and the short request decodes in each.
    assert decoded_during_prefill >= 4
    assert first.result(0).tokens == alone(config, params, short)
    assert second.result(0).tokens == alone(config, params, long)
    assert_no_leaks(batcher)


def test_prefix_reuse_changes_no_output_and_skips_the_shared_prompt():
    config = make_config("cla3_uneven", "gqa", max_seq_len=64, attention="xla")
    params = make_params(config, seed=4)
    shared = prompts(config, (24,), seed=9)[0]
    tails = prompts(config, (3, 5, 1, 4), seed=10)
    requests = [Request(prompt=shared + t, max_tokens=6, temperature=0.0) for t in tails]

    def serve(caching):
        engine = PagedEngine(config, params, num_blocks=40, block_size=4, max_seqs=4,
                             chunk_tokens=16, prefill_rows=(1, 4), min_window=64)
        batcher = PagedBatcher(engine, steps_per_call=2, prefix_caching=caching)
        # One request first, so its prompt's blocks are cached when the rest arrive.
        out = run_all(batcher, requests[:1]) + run_all(batcher, requests[1:])
        assert_no_leaks(batcher)
        return [c.tokens for c in out], batcher

    with_cache, on = serve(True)
    without, off = serve(False)
    assert with_cache == without == [alone(config, params, r) for r in requests]
    assert off.reused_tokens == 0 and off.prefill_tokens == sum(len(r.prompt) for r in requests)
    assert on.reused_tokens == 3 * 24  # six full blocks of 4, for each of the three
    assert on.prefill_tokens == off.prefill_tokens - 3 * 24
    assert on.recomputed_tokens == off.recomputed_tokens == 0


def test_the_paged_engine_on_a_mesh_equals_one_device():
    config = make_config("cla2", "gqa", max_seq_len=32, attention="xla", vocab_size=64)
    params = make_params(config, seed=2)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = jax.device_put(params, sharding.param_shardings(abstract_params(config), mesh))
    requests = [Request(prompt=p, max_tokens=6, temperature=0.0)
                for p in prompts(config, (5, 11, 2))]
    got = run_all(PagedBatcher(PagedEngine(config, sharded, num_blocks=16, mesh=mesh,
                                           **SMALL)), requests)
    assert [c.tokens for c in got] == [alone(config, params, r) for r in requests]


def test_the_block_pool_counts_holds_and_evicts_least_recently_used():
    pool = BlockPool(5, 2)
    a, b = pool.allocate(), pool.allocate()
    assert {a, b} == {1, 2} and pool.num_free() == 2
    keys = block_keys([1, 2, 3, 4, 5], 2)
    assert len(keys) == 2 and keys[0] != keys[1]
    # The same block of tokens after another prefix is another key.
    assert block_keys([9, 9, 3, 4], 2)[1] != keys[1]
    pool.register(a, keys[0])
    pool.register(b, keys[1])
    assert pool.lookup(keys) == [a, b] and pool.refs[a] == 2
    pool.release([a, b, a, b])
    assert pool.num_free() == 4 and pool.num_cached() == 2
    # Empty blocks go first, then the cached ones, least recently used first (a, then b).
    assert {pool.allocate(), pool.allocate()} == {3, 4}
    assert pool.allocate() == a and pool.lookup(keys) == []  # a's key is gone
    assert pool.evictions == 1
    with pytest.raises(ValueError, match="null block"):
        BlockPool(1, 2)


def test_bad_pools_and_requests_that_cannot_fit_are_refused_clearly():
    config = make_config("cla2", "mqa", max_seq_len=32, attention="xla")
    params = make_params(config)
    with pytest.raises(UserError, match="power of two"):
        PagedEngine(config, params, num_blocks=8, block_size=3)
    with pytest.raises(UserError, match="divide chunk_tokens"):
        PagedEngine(config, params, num_blocks=8, chunk_tokens=10, prefill_rows=(4,))
    batcher = PagedBatcher(PagedEngine(config, params, num_blocks=5, **SMALL),
                           reserve_blocks=0)
    with pytest.raises(RequestError, match="--num_blocks") as error:
        batcher.submit(Request(prompt=[1] * 10, max_tokens=10))
    assert error.value.param == "max_tokens"
    assert not batcher.busy
