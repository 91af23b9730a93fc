"""benchmarks/serving.py end to end on a tiny model and a few requests: the results file holds
every figure, and the figures are consistent with the trace and the memory budget (no
timing checks)."""
import json
import os

from benchmarks import serving
from cla_jax import ModelConfig
from cla_jax.capacity import cache_bytes

MODELS_SHARING = {"cla1": 1, "cla2": 2, "cla2_int8": 2}
TINY = ModelConfig(vocab_size=256, d_model=64, num_layers=2, num_heads=4, num_kv_heads=1,
                   head_dim=16, mlp_dim=128, max_seq_len=64, kv_sharing=2, attention="xla")


def test_serving_benchmark_writes_consistent_results(tmp_path):
    out = tmp_path / "serving.json"
    args = serving.parse_args(["--requests=6", "--prompt_len=3,8", "--output_len=2,6",
                               "--rate=100", "--models=cla1,cla2_int8", "--static_models=cla2_int8",
                               "--max_seqs_factor=1", "--chunk_tokens=32",
                               "--prefix_model=cla2_int8", "--prefix_requests=4",
                               "--prefix_len=20,30", "--prefix_suffix_len=2,4",
                               "--prefix_output_len=2,4", f"--out={out}"])
    serving.publish(rep := serving.run(args, TINY), serving.table(rep), str(out))
    written = json.loads(out.read_text())
    assert written["benchmark"] == "serving" and written["environment"]["backend"] == "cpu"
    s = written["settings"]
    trace = serving.make_trace(6, (3, 8), (2, 6), TINY.vocab_size, seed=0)
    assert s["trace_output_tokens"] == sum(trace.max_tokens)
    assert s["trace_longest_prompt_plus_output"] == trace.longest
    prefix_trace = serving.make_prefix_trace(4, (20, 30), (2, 4), (2, 4), TINY.vocab_size, 0)
    config = TINY.replace(max_seq_len=max(TINY.max_seq_len, trace.longest + 64 + 16,
                                          prefix_trace.longest))
    budget = 4 * cache_bytes(config.replace(kv_sharing=1), 1, trace.longest, "bfloat16")
    assert s["budget_bytes"] == budget

    models = written["models"]
    assert set(models) == {"cla1", "cla2_int8"}  # a float CLA2 twin runs the CLA1 code path
    assert models["cla1"]["slots"] == 4
    int8 = models["cla2_int8"]
    assert int8["run_cache_dtype"] == "int8"
    assert int8["slots"] == budget // cache_bytes(config, 1, trace.longest, "int8") > 8
    for name, m in models.items():
        assert set(m["continuous"]) == {"all_at_once", "poisson"}
        for mode, r in m["continuous"].items():
            assert r["output_counts_equal_max_tokens"], (name, mode)
            assert r["output_tokens"] == sum(trace.max_tokens)
            assert r["finish_reasons"] == ["length"]
            assert 1 <= r["running_max"] <= m["slots"]
            assert 0 < r["running_mean"] <= r["running_max"]
            assert r["compiles_during_run"] == 0, (name, mode)  # warm-up covered every bucket
            assert r["output_tokens_per_s"] > 0 and r["wall_s"] > 0
            for key in ("time_to_first_token_s", "time_per_output_token_s"):
                assert 0 <= r[key]["p50"] <= r[key]["p99"]
        paged = m["paged"]
        # The same bytes as blocks of 16 (the null block counted), up to 1 x slots sequences.
        block = cache_bytes(config.replace(kv_sharing=MODELS_SHARING[name]), 1, 16,
                            m["budget_dtype"])
        assert paged["num_blocks"] == budget // block and paged["max_seqs"] == m["slots"]
        for mode, r in paged["modes"].items():
            assert r["output_counts_equal_max_tokens"] and r["compiles_during_run"] == 0
            assert 1 <= r["running_max"] <= paged["max_seqs"]
            assert r["prefill_tokens"] + r["reused_tokens"] >= sum(map(len, trace.prompts))
    prefix = int8["paged"]["shared_prefix"]
    assert prefix["trace"]["prefix_tokens"] == len(os.path.commonprefix(prefix_trace.prompts))
    on, off = prefix["caching_on"], prefix["caching_off"]
    assert off["prefill_tokens"] == prefix["trace"]["prompt_tokens"] and off["reused_tokens"] == 0
    assert on["reused_tokens"] > 0 and on["preemptions"] == off["preemptions"] == 0
    assert on["prefill_tokens"] + on["reused_tokens"] == off["prefill_tokens"]
    static = int8["static"]
    assert static["output_tokens"] == sum(trace.max_tokens) and static["batches"] == 1
    assert 0 <= static["wasted_row_steps_fraction"] < 1
    assert "static" not in models["cla1"]

    goals = written["goals"]
    assert {"cla2_int8_vs_cla1", "continuous_vs_static_cla2_int8",
            "int8_tokens_per_gib_vs_cla1_16bit", "capacity_paged_vs_slots_cla1",
            "capacity_paged_vs_slots_cla2_int8", "prefix_prefill_tokens_saved",
            "prefix_ttft_p50_speedup"} <= set(goals)
    # head_dim 16: int8 K/V plus a bfloat16 scale per token and head = 4 * 16 / 18 of 16-bit.
    assert abs(goals["int8_tokens_per_gib_vs_cla1_16bit"]["measured"] - 4 * 16 / 18) < 1e-3
    assert all(isinstance(g["met"], bool) for g in goals.values())
