"""Serving benchmark: one seeded request trace on CLA1, CLA2 and CLA2 + int8-cache twins of
one model, at one fixed KV-memory budget, served by the slot engine (`Engine` + `Batcher`:
a full max_length region reserved per slot, one prompt prefilled at a time), by the paged
engine (`PagedEngine` + `PagedBatcher`: blocks on demand, chunked prefill mixed with decode,
prefix caching), and optionally by static batching (`decoding.generate` in fixed batches);
then a shared-prefix trace (every prompt starts with the same 256-512 tokens) through the
paged engine with prefix caching on and off.

The budget is the one at which the CLA1 twin with a 16-bit cache fits `--budget_sequences`
(4) sequences of the trace's longest prompt + output; each twin gets budget // (its cache
bytes per sequence of that length) slots (`cla_jax.capacity.cache_bytes`, i.e.
`jax.eval_shape` of `init_cache`; int8 counts its bfloat16 scales), so memory, not compute,
sets the number of slots: CLA1 4, CLA2 8, CLA2 + int8 15 on the default trace. The paged
engine gets the same bytes as blocks (`--block_size` positions each, the null block
included) and up to `--max_seqs_factor` x that many sequences.

Requests are greedy and ignore EOS (stop_ids=()), so each produces exactly its max_tokens;
they are served all at once (offline: every request queued at t=0) and with Poisson
arrivals at `--rate` requests/s. Every prompt and attention-window bucket is compiled before
anything is timed, and the compiles during each timed run are counted (0 expected).

    PYTHONPATH=. python benchmarks/serving.py                    # ~25 min on 2 CPU cores
    PYTHONPATH=. python benchmarks/serving.py --quick            # a small trace, ~3 min
    PYTHONPATH=. python benchmarks/serving.py --models=cla1,cla2 --rate=4 --out=/tmp/s.json

Writes benchmarks/results/serving_<date>_<device>.json and prints a table.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys
import time

import jax
import numpy as np
from flax import linen as nn

sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))
from benchmarks.common import model_from_config_file, provenance, publish, report  # noqa: E402
from cla_jax import decoding, sharding  # noqa: E402
from cla_jax.capacity import cache_bytes, capacity  # noqa: E402
from cla_jax.config import ModelConfig  # noqa: E402
from cla_jax.decoding import Sampling  # noqa: E402
from cla_jax.model import init_params  # noqa: E402
from cla_jax.serving import Batcher, Engine, PagedBatcher, PagedEngine, Request  # noqa: E402
from cla_jax.serving.engine import bucket_for  # noqa: E402

# name -> (kv_sharing, cache dtype that the memory budget is counted in)
MODELS = {"cla1": (1, "bfloat16"), "cla2": (2, "bfloat16"), "cla2_int8": (2, "int8")}
MODES = ("all_at_once", "poisson")
ENGINES = ("slots", "paged")
GIB = 2**30
GOALS = {"cla2_vs_cla1": 1.5, "cla2_int8_vs_cla1": 2.5, "continuous_vs_static": 1.5,
         "int8_tokens_per_gib_vs_cla1_16bit": 4.0,
         # the paged engine (issue 26)
         "capacity_paged_vs_slots": 1.6, "throughput_paged_vs_slots_cla2": 1.5,
         "paged_cla2_vs_cla1": 1.5, "prefix_prefill_tokens_saved": 0.8,
         "prefix_ttft_p50_speedup": 3.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/default.py",
                   help="config file whose model the twins copy (only kv_sharing changes)")
    p.add_argument("--requests", type=int, default=200, help="requests in the trace")
    p.add_argument("--prompt_len", default="16,400", help="min,max prompt tokens (uniform)")
    p.add_argument("--output_len", default="16,200", help="min,max output tokens (uniform)")
    p.add_argument("--rate", type=float, default=8.0,
                   help="Poisson arrival rate, requests/s (default 8: about 3/4 of what the "
                        "slot engine's CLA1 serves all at once on a 2-core CPU, so its 4 slots "
                        "queue at times; see benchmarks/README.md)")
    p.add_argument("--prefix_rate", type=float, default=2.0,
                   help="Poisson arrival rate of the shared-prefix trace, requests/s")
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma-separated, of {tuple(MODELS)}")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {MODES}")
    p.add_argument("--engines", default=",".join(ENGINES),
                   help=f"comma-separated, of {ENGINES}: the slot engine (a max_length region "
                        "per slot) and the paged engine")
    p.add_argument("--static_models", default="",
                   help="models that also get the static-batching baseline, e.g. cla2 ('' = "
                        "none; ~3 min each on 2 CPU cores)")
    p.add_argument("--block_size", type=int, default=16, help="paged engine: positions per block")
    p.add_argument("--chunk_tokens", type=int, default=256,
                   help="paged engine: prompt tokens prefilled per step")
    p.add_argument("--overcommit", action=argparse.BooleanOptionalAction, default=True,
                   help="paged engine: admit by the prompt's blocks and preempt on growth "
                        "(default), or (--no-overcommit) only what can reach max_tokens")
    p.add_argument("--max_seqs_factor", type=int, default=4,
                   help="paged engine: sequences at once at most = this x the slot count")
    p.add_argument("--prefix_model", default="cla2",
                   help="model for the shared-prefix trace ('' = skip it)")
    p.add_argument("--prefix_requests", type=int, default=100)
    p.add_argument("--prefix_len", default="256,512",
                   help="min,max of the shared prefix's length (drawn once per trace)")
    p.add_argument("--prefix_suffix_len", default="16,64", help="min,max of each prompt's own tail")
    p.add_argument("--prefix_output_len", default="16,64", help="min,max output tokens")
    p.add_argument("--static_prompt_step", type=int, default=64,
                   help="static batching pads each batch's prompts to a multiple of this")
    p.add_argument("--static_new_step", type=int, default=16,
                   help="static batching rounds each batch's max_new_tokens up to a multiple "
                        "of this (bounds compiles; costs it a few percent extra steps)")
    p.add_argument("--budget_sequences", type=int, default=4,
                   help="the budget = this many CLA1 16-bit sequences of the longest request")
    p.add_argument("--cache_dtype", default="",
                   help="cache dtype of the float twins (default float32 on CPU, bfloat16 "
                        "elsewhere); the int8 twin always runs int8")
    p.add_argument("--seed", type=int, default=0, help="trace seed (params use key 0)")
    p.add_argument("--quick", action="store_true",
                   help="a small trace (24 requests, prompts 16-100, outputs 8-40), Poisson at "
                        "8 req/s: the smoke-test path")
    p.add_argument("--out", default="", help="results JSON path (default: benchmarks/results/"
                                             "serving_<date>_<device>.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.prompt_len, args.output_len, args.rate = 24, "16,100", "8,40", 8.0
        args.prefix_rate = 8.0
        args.prefix_requests, args.prefix_len = 16, "64,96"
    args.prompt_len = _pair(p, "--prompt_len", args.prompt_len)
    args.output_len = _pair(p, "--output_len", args.output_len)
    args.prefix_len = _pair(p, "--prefix_len", args.prefix_len)
    args.prefix_suffix_len = _pair(p, "--prefix_suffix_len", args.prefix_suffix_len)
    args.prefix_output_len = _pair(p, "--prefix_output_len", args.prefix_output_len)
    args.engines = _names(p, "--engines", args.engines, ENGINES)
    if args.prefix_model and args.prefix_model not in MODELS:
        p.error(f"--prefix_model: unknown {args.prefix_model!r}; choose from {tuple(MODELS)}")
    args.models = _names(p, "--models", args.models, MODELS)
    args.modes = _names(p, "--modes", args.modes, MODES)
    args.static_models = _names(p, "--static_models", args.static_models, MODELS, empty_ok=True)
    if args.requests < 1 or args.rate <= 0 or args.budget_sequences < 1:
        p.error("--requests and --budget_sequences must be >= 1 and --rate > 0")
    return args


def _pair(p, flag, text):
    try:
        low, high = (int(x) for x in text.split(","))
    except ValueError:
        p.error(f"{flag} must be min,max (integers), got {text!r}")
    if not 1 <= low <= high:
        p.error(f"{flag} needs 1 <= min <= max, got {text!r}")
    return low, high


def _names(p, flag, text, allowed, empty_ok=False):
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not (names or empty_ok):
        p.error(f"{flag}: unknown {unknown}; choose from {tuple(allowed)}")
    return names


# --- the trace ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Trace:
    prompts: list[list[int]]
    max_tokens: list[int]
    unit_gaps: list[float]  # exponential(1) gaps: arrival i = sum(gaps[1..i]) / rate

    def arrivals(self, rate: float) -> np.ndarray:
        gaps = np.asarray(self.unit_gaps) / rate
        gaps[0] = 0.0
        return np.cumsum(gaps)

    @property
    def longest(self) -> int:
        return max(len(p) + m for p, m in zip(self.prompts, self.max_tokens))


def make_trace(n, prompt_len, output_len, vocab_size, seed) -> Trace:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(prompt_len[0], prompt_len[1] + 1, n)
    outputs = rng.integers(output_len[0], output_len[1] + 1, n)
    prompts = [rng.integers(1, vocab_size, size=int(k)).tolist() for k in lengths]
    return Trace(prompts, [int(m) for m in outputs], rng.exponential(1.0, n).tolist())


def make_prefix_trace(n, prefix_len, suffix_len, output_len, vocab_size, seed) -> Trace:
    """Every prompt is one shared prefix (its length drawn once) + a tail of its own."""
    rng = np.random.default_rng(seed + 1)
    prefix = rng.integers(1, vocab_size, size=int(rng.integers(prefix_len[0],
                                                                prefix_len[1] + 1))).tolist()
    tails = rng.integers(suffix_len[0], suffix_len[1] + 1, n)
    outputs = rng.integers(output_len[0], output_len[1] + 1, n)
    prompts = [prefix + rng.integers(1, vocab_size, size=int(k)).tolist() for k in tails]
    return Trace(prompts, [int(m) for m in outputs], rng.exponential(1.0, n).tolist())


# --- measurement helpers ------------------------------------------------------------------

class CompileCounter:
    """Counts XLA backend compiles (jax.monitoring), to show a timed run compiled nothing."""

    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1


def percentiles(values) -> dict:
    values = np.asarray([v for v in values if v is not None], float)
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99)),
            "mean": float(values.mean())}


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# --- continuous batching ------------------------------------------------------------------

def reach(n: int, sizes: tuple[int, ...]) -> tuple[int, ...]:
    """The buckets of `sizes` up to the one that holds n."""
    return sizes[:sizes.index(bucket_for(min(n, sizes[-1]), sizes)) + 1]


def warm_up(batcher: Batcher | PagedBatcher, longest_prompt: int, longest: int) -> float:
    """Compiles every program the trace can reach (`warm_up`: prompt buckets and windows of
    the slot engine; decode rows x prefill shapes x windows of the paged one), then runs two
    short requests through; returns the seconds it took."""
    start = time.perf_counter()
    engine, k = batcher.engine, batcher.steps_per_call
    if isinstance(batcher, PagedBatcher):
        batcher.warm_up(windows=reach(longest + k, engine.window_buckets))
    else:
        batcher.warm_up(reach(longest_prompt, engine.prompt_buckets),
                        reach(longest + k, engine.window_buckets))
    handles = [batcher.submit(Request(prompt=[1, 2, 3], max_tokens=3, temperature=0.0))
               for _ in range(2)]
    batcher.run_until_idle()
    [h.result() for h in handles]
    return time.perf_counter() - start


def serve(batcher: Batcher | PagedBatcher, trace: Trace, mode: str, rate: float) -> dict:
    """Serves the whole trace through `batcher` (fresh, warmed up); per-request and pool
    figures."""
    requests = [Request(prompt=p, max_tokens=m, temperature=0.0, seed=i, stop_ids=())
                for i, (p, m) in enumerate(zip(trace.prompts, trace.max_tokens))]
    start = time.perf_counter()
    if mode == "all_at_once":
        handles = [batcher.submit(r) for r in requests]
        batcher.run_until_idle()
    else:
        arrivals = start + trace.arrivals(rate)
        batcher.start()  # the serving loop on its own thread, as the HTTP server runs it
        handles = []
        for r, at in zip(requests, arrivals):
            time.sleep(max(0.0, at - time.perf_counter()))
            handles.append(batcher.submit(r))
        for h in handles:
            h.result()
        batcher.stop()
    done = [h.result() for h in handles]
    end = max(c.token_times[-1] for c in done)
    wall = end - start
    output_tokens = sum(len(c.tokens) for c in done)
    result = {
        "wall_s": wall,
        "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / wall,
        "time_to_first_token_s": percentiles(c.time_to_first_token for c in done),
        "time_per_output_token_s": percentiles(c.time_per_output_token for c in done),
        "decode_steps": batcher.steps,
        "running_mean": batcher.slot_steps / max(batcher.steps, 1),
        "running_max": batcher.max_running,
        "output_counts_equal_max_tokens": all(
            len(c.tokens) == r.max_tokens for c, r in zip(done, requests)),
        "finish_reasons": sorted({c.finish_reason for c in done}),
    }
    if isinstance(batcher, PagedBatcher):
        result.update(batcher.stats())
    return result


def step_and_prefill_cost(engine: Engine, windows, prompt_buckets, repeats: int = 20) -> dict:
    """Median ms of one decode step with every slot active, per window bucket, and of one
    prefill, per prompt bucket: where the time of a continuous run goes."""
    steps = {}
    for window in windows:
        state = engine.insert(engine.init_state(), engine.prefill([1]), 0)
        active = [True] * engine.num_slots
        times = []
        for _ in range(min(repeats + 1, window - 1)):  # every length stays below the window
            t = time.perf_counter()
            state, tokens, _ = engine.step(state, active, window)
            np.asarray(tokens)
            times.append(time.perf_counter() - t)
        steps[str(window)] = float(np.median(times[1:]) * 1e3)
    prefills = {}
    for bucket in prompt_buckets:
        times = []
        for _ in range(4):
            t = time.perf_counter()
            int(engine.prefill([1] * bucket).token[0])
            times.append(time.perf_counter() - t)
        prefills[str(bucket)] = float(np.median(times[1:]) * 1e3)
    return {"full_pool_step_ms_by_window": steps, "prefill_ms_by_prompt_bucket": prefills}


# --- static batching ----------------------------------------------------------------------

def static_batching(config, params, trace: Trace, batch_size: int, cache_dtype: str,
                    prompt_step: int, new_step: int, compiles: CompileCounter) -> dict:
    """`decoding.generate`'s program on the trace in arrival order, `batch_size` requests at a
    time, each batch running to its longest request's max_tokens rounded up to a multiple of
    `new_step`, its prompts right-padded (as generate pads them) to a multiple of
    `prompt_step`: the buckets bound the compiles. Each distinct shape is compiled ahead
    (`jax.jit(...).lower(...).compile()`, timed apart), so the timed calls run only. Only each
    request's own max_tokens count as output."""
    greedy, mesh = Sampling(temperature=0), sharding.single_device_mesh()
    key_data = np.asarray(jax.random.key_data(jax.random.key(0)))
    executables, compile_s, seconds, row_steps, padded_steps = {}, 0.0, [], 0, 0
    for first in range(0, len(trace.prompts), batch_size):
        prompts = trace.prompts[first:first + batch_size]
        new = max(trace.max_tokens[first:first + batch_size])
        width = -(-max(len(p) for p in prompts) // prompt_step) * prompt_step
        steps = -(-new // new_step) * new_step
        padded = np.zeros((len(prompts), width), np.int32)
        for row, prompt in enumerate(prompts):
            padded[row, :len(prompt)] = prompt
        lengths = np.asarray([len(p) for p in prompts], np.int32)
        inputs = jax.device_put((padded, lengths, key_data), sharding.replicated(mesh))
        shape = (len(prompts), width, steps)
        if shape not in executables:
            t = time.perf_counter()
            executables[shape] = decoding._generate.lower(
                config, steps, greedy, (), cache_dtype, mesh, params, *inputs).compile()
            compile_s += time.perf_counter() - t
        before = compiles.count
        t = time.perf_counter()
        tokens, _ = executables[shape](params, *inputs)
        jax.block_until_ready(tokens)
        seconds.append(time.perf_counter() - t)
        if compiles.count != before:
            raise RuntimeError(f"a timed static batch compiled {compiles.count - before} programs")
        assert tokens.shape == (len(prompts), steps)
        row_steps += len(prompts) * steps
        padded_steps += steps - new
    wall = sum(seconds)
    useful = sum(trace.max_tokens)
    return {"batch_size": batch_size, "batches": len(seconds),
            "distinct_shapes": len(executables), "compile_s": compile_s,
            "prompt_bucket_step": prompt_step, "max_new_tokens_bucket_step": new_step,
            "wall_s": wall, "output_tokens": useful, "output_tokens_per_s": useful / wall,
            "row_steps": row_steps, "wasted_row_steps_fraction": 1 - useful / row_steps,
            "bucket_extra_steps_fraction": padded_steps / sum(
                max(trace.max_tokens[f:f + batch_size])
                for f in range(0, len(trace.prompts), batch_size)),
            "batch_seconds": seconds}


# --- the run ------------------------------------------------------------------------------

def serve_modes(make_batcher, trace: Trace, args, compiles: CompileCounter, label: str,
                modes=None, rate=None) -> dict:
    """`serve` in each mode, each with a fresh loop; compiles during each run counted."""
    results = {}
    for mode in modes or args.modes:
        before = compiles.count
        result = serve(make_batcher(), trace, mode, rate or args.rate)
        result["compiles_during_run"] = compiles.count - before
        results[mode] = result
        print(f"{label} {mode}: {result['output_tokens_per_s']:.0f} tok/s, "
              f"{result['wall_s']:.1f} s, at most {result['running_max']} running",
              file=sys.stderr, flush=True)
    return results


def serve_paged(name, config, params, slots, budget, budget_dtype, run_dtype, trace,
                prefix_trace, args, compiles) -> dict:
    """The paged engine at the same budget: the trace in each mode, and for the prefix model
    the shared-prefix trace (Poisson) with prefix caching on and off."""
    prefix = name == args.prefix_model
    max_length = max(trace.longest, prefix_trace.longest if prefix else 0)
    num_blocks = PagedEngine.blocks_for_budget(config, budget, args.block_size, budget_dtype)
    engine = PagedEngine(config, params, num_blocks, args.block_size, max_length,
                         max_seqs=args.max_seqs_factor * slots, cache_dtype=run_dtype,
                         chunk_tokens=args.chunk_tokens)
    entry = {"num_blocks": num_blocks, "block_size": args.block_size,
             "pool_positions": (num_blocks - 1) * args.block_size,
             "pool_bytes_as_budgeted": num_blocks * cache_bytes(config, 1, args.block_size,
                                                                budget_dtype),
             "max_seqs": engine.max_seqs, "chunk_tokens": args.chunk_tokens,
             "prefill_shapes": [list(s) for s in engine.prefill_shapes],
             "decode_buckets": list(engine.decode_buckets),
             "window_buckets": list(engine.window_buckets)}
    print(f"[{name}] paged engine: {num_blocks} blocks of {args.block_size}; warming up",
          file=sys.stderr, flush=True)
    entry["warm_up_s"] = warm_up(PagedBatcher(engine), max(len(p) for p in trace.prompts),
                                 max_length)
    entry["overcommit"] = args.overcommit
    entry["modes"] = serve_modes(lambda: PagedBatcher(engine, overcommit=args.overcommit),
                                 trace, args, compiles, f"[{name}] paged")
    if prefix:
        entry["shared_prefix"] = {
            "trace": {"requests": len(prefix_trace.prompts),
                      "prefix_tokens": len(os.path.commonprefix(prefix_trace.prompts)),
                      "prompt_tokens": sum(len(p) for p in prefix_trace.prompts),
                      "output_tokens": sum(prefix_trace.max_tokens)},
            **{f"caching_{state}": serve_modes(
                lambda: PagedBatcher(engine, prefix_caching=state == "on",
                                     overcommit=args.overcommit), prefix_trace,
                args, compiles, f"[{name}] shared prefix, caching {state}",
                modes=("poisson",), rate=args.prefix_rate)["poisson"]
                for state in ("on", "off")}}
    return entry


def run(args, base: ModelConfig | None = None) -> dict:
    load_start = loadavg()
    started = time.perf_counter()
    base = base or model_from_config_file(args.config)
    trace = make_trace(args.requests, args.prompt_len, args.output_len, base.vocab_size,
                       args.seed)
    longest, longest_prompt = trace.longest, max(len(p) for p in trace.prompts)
    prefix_trace = make_prefix_trace(args.prefix_requests, args.prefix_len,
                                     args.prefix_suffix_len, args.prefix_output_len,
                                     base.vocab_size, args.seed)
    # Room for the longest request and for static batching's bucket padding (no learned
    # positions: max_seq_len changes no weight, only what init_cache accepts).
    base = base.replace(max_seq_len=max(base.max_seq_len, longest + args.static_prompt_step
                                        + args.static_new_step, prefix_trace.longest))
    float_dtype = args.cache_dtype or ("float32" if jax.default_backend() == "cpu"
                                       else "bfloat16")
    twin = lambda sharing: base.replace(kv_sharing=sharing, group_sizes=None)  # noqa: E731
    cla1_16bit = cache_bytes(twin(1), 1, longest, "bfloat16")
    budget = args.budget_sequences * cla1_16bit
    compiles = CompileCounter()

    models, params_by_sharing = {}, {}
    for name in args.models:
        sharing, budget_dtype = MODELS[name]
        config = twin(sharing)
        per_sequence = cache_bytes(config, 1, longest, budget_dtype)
        run_dtype = "int8" if budget_dtype == "int8" else float_dtype
        if sharing not in params_by_sharing:
            params_by_sharing[sharing] = nn.meta.unbox(init_params(config, jax.random.key(0)))
        params = params_by_sharing[sharing]
        slots = budget // per_sequence
        entry = {"kv_sharing": sharing, "groups": list(config.groups),
                 "budget_dtype": budget_dtype, "run_cache_dtype": run_dtype,
                 "cache_bytes_per_sequence": per_sequence,
                 "cache_bytes_per_sequence_as_run": cache_bytes(config, 1, longest, run_dtype),
                 "slots": slots}
        if "slots" in args.engines:
            engine = Engine(config, params, num_slots=slots, max_length=longest,
                            cache_dtype=run_dtype)
            entry.update(prompt_buckets=list(engine.prompt_buckets),
                         window_buckets=list(engine.window_buckets))
            print(f"[{name}] slot engine: {slots} slots; warming up", file=sys.stderr,
                  flush=True)
            entry["warm_up_s"] = warm_up(Batcher(engine), longest_prompt, longest)
            entry["continuous"] = serve_modes(lambda: Batcher(engine), trace, args, compiles,
                                              f"[{name}] slots")
            windows = [w for w in engine.window_buckets
                       if w <= bucket_for(longest, engine.window_buckets)]
            entry.update(step_and_prefill_cost(engine, windows, [
                b for b in engine.prompt_buckets if b <= bucket_for(longest_prompt,
                                                                    engine.prompt_buckets)]))
        if "paged" in args.engines:
            entry["paged"] = serve_paged(name, config, params, slots, budget, budget_dtype,
                                         run_dtype, trace, prefix_trace, args, compiles)
        if name in args.static_models:
            entry["static"] = static_batching(config, params, trace, slots, run_dtype,
                                              args.static_prompt_step, args.static_new_step,
                                              compiles)
            print(f"[{name}] static: {entry['static']['output_tokens_per_s']:.0f} tok/s",
                  file=sys.stderr, flush=True)
        models[name] = entry
        # Each engine compiled its programs (a hundred or so for a paged one); one process
        # holding every model's runs out of memory maps, so they go with their model.
        jax.clear_caches()

    goals = evaluate_goals(models, twin, longest)
    return report(
        "serving",
        what=("Continuous batching (cla_jax.serving Engine + Batcher) of one seeded request "
              "trace on CLA1 / CLA2 / CLA2+int8-cache twins at one fixed KV-memory budget, and "
              "static batching (decoding.generate in fixed batches) of the same trace. Greedy, "
              "EOS ignored (stop_ids=()): every request produces exactly its max_tokens. "
              "Random-init params (throughput does not depend on the weights)."),
        settings=dict(
            config=args.config, requests=args.requests, prompt_len=list(args.prompt_len),
            output_len=list(args.output_len), seed=args.seed, rate_requests_per_s=args.rate,
            prefix_rate_requests_per_s=args.prefix_rate, engines=args.engines,
            block_size=args.block_size, chunk_tokens=args.chunk_tokens,
            max_seqs_factor=args.max_seqs_factor, prefix_model=args.prefix_model,
            overcommit=args.overcommit,
            prefix_requests=args.prefix_requests, prefix_len=list(args.prefix_len),
            prefix_suffix_len=list(args.prefix_suffix_len),
            prefix_output_len=list(args.prefix_output_len),
            models=args.models, modes=args.modes, static_models=args.static_models,
            budget_sequences=args.budget_sequences, quick=args.quick,
            trace_longest_prompt_plus_output=longest, trace_longest_prompt=longest_prompt,
            trace_output_tokens=sum(trace.max_tokens),
            trace_mean_prompt=float(np.mean([len(p) for p in trace.prompts])),
            trace_mean_output=float(np.mean(trace.max_tokens)),
            trace_arrival_span_s=float(trace.arrivals(args.rate)[-1]),
            budget_bytes=budget, budget_definition=(
                f"{args.budget_sequences} x the bfloat16 cache bytes of one CLA1 sequence of "
                f"the trace's longest prompt+output ({longest} tokens)"),
            float_cache_dtype_run=float_dtype,
            cache_dtype_note=("Slots are counted at the 16-bit (or int8) cache size; on CPU "
                              "the float twins run a float32 cache (bfloat16 arithmetic is "
                              "emulated and slow there), i.e. twice the budget's bytes, with "
                              "the same number of slots."),
            model=base.to_dict()),
        note=("Throughput = output tokens / (first submit -> last token). all_at_once: every "
              "request queued at t=0. poisson: arrivals at the given rate (fixed seeded gaps, "
              "scaled by 1/rate), the Batcher loop on its own thread as in serve.py; its "
              "throughput is capped by the arrival rate, so the throughput goals are read from "
              "all_at_once. Compile time is kept out: every bucket is compiled in warm_up "
              "first; compiles_during_run counts XLA compiles in each timed run. Static "
              "batching compiles each distinct (bucketed) batch shape ahead with "
              "lower().compile() and times only the runs."),
        load_average_start=load_start, load_average_end=loadavg(),
        run_time_s=time.perf_counter() - started,
        models=models, goals=goals)


def args_prefix_model(models: dict) -> str | None:
    """The model that ran the shared-prefix trace."""
    return next((n for n, m in models.items() if "shared_prefix" in m.get("paged", {})), None)


def evaluate_goals(models: dict, twin, context: int) -> dict:
    goals = {}

    def throughput(name, kind="continuous"):
        entry = models.get(name, {})
        if kind == "static":
            return entry.get("static", {}).get("output_tokens_per_s")
        if kind == "paged":
            entry = entry.get("paged", {}).get("modes", {})
            return entry.get("all_at_once", {}).get("output_tokens_per_s")
        return entry.get("continuous", {}).get("all_at_once", {}).get("output_tokens_per_s")

    def goal(key, measured, basis, goal_key=None, **more):
        target = GOALS[goal_key or key]
        goals[key] = {"goal": target, "measured": measured, "met": measured >= target,
                      "basis": basis, **more}

    for name, m in models.items():
        running = m.get("paged", {}).get("modes", {}).get("all_at_once", {}).get("running_max")
        if running:
            goal(f"capacity_paged_vs_slots_{name}", running / m["slots"],
                 "sequences running at once (all_at_once), paged engine vs slot engine, same "
                 "KV bytes", "capacity_paged_vs_slots", paged=running, slots=m["slots"])
    a, b = throughput("cla2", "paged"), throughput("cla2")
    if a and b:
        goal("throughput_paged_vs_slots_cla2", a / b,
             "all_at_once output tokens/s, paged engine vs slot engine, CLA2")
    a, b = throughput("cla2", "paged"), throughput("cla1", "paged")
    if a and b:
        goal("paged_cla2_vs_cla1", a / b, "all_at_once output tokens/s under the paged engine")
    prefix = models.get(args_prefix_model(models), {}).get("paged", {}).get("shared_prefix")
    if prefix:
        on, off = prefix["caching_on"], prefix["caching_off"]
        goal("prefix_prefill_tokens_saved", 1 - on["prefill_tokens"] / off["prefill_tokens"],
             "shared-prefix trace (Poisson): 1 - prompt tokens computed with caching on / off",
             on=on["prefill_tokens"], off=off["prefill_tokens"])
        goal("prefix_ttft_p50_speedup", off["time_to_first_token_s"]["p50"]
             / on["time_to_first_token_s"]["p50"],
             "shared-prefix trace (Poisson): TTFT p50 caching off / on")

    for name, goal_key in (("cla2", "cla2_vs_cla1"), ("cla2_int8", "cla2_int8_vs_cla1")):
        a, b = throughput(name), throughput("cla1")
        if a and b:
            goals[goal_key] = {"goal": GOALS[goal_key], "measured": a / b,
                               "met": a / b >= GOALS[goal_key],
                               "basis": "all_at_once output tokens/s, continuous batching"}
    for name in models:
        a, b = throughput(name), throughput(name, "static")
        if a and b:
            goals[f"continuous_vs_static_{name}"] = {
                "goal": GOALS["continuous_vs_static"], "measured": a / b,
                "met": a / b >= GOALS["continuous_vs_static"],
                "basis": "all_at_once continuous vs static batching, same trace and slots"}
    int8 = capacity(twin(2), GIB, context, "int8")["cla"]
    cla1 = capacity(twin(1), GIB, context, "bfloat16")["cla"]
    ratio = int8["max_cached_tokens"] / cla1["max_cached_tokens"]
    goals["int8_tokens_per_gib_vs_cla1_16bit"] = {
        "goal": GOALS["int8_tokens_per_gib_vs_cla1_16bit"], "measured": ratio,
        "met": ratio >= GOALS["int8_tokens_per_gib_vs_cla1_16bit"],
        "cla2_int8_tokens_per_gib": int8["max_cached_tokens"],
        "cla1_bfloat16_tokens_per_gib": cla1["max_cached_tokens"],
        "basis": ("cla_jax.capacity at 1 GiB, scales counted: int8 K/V + one bfloat16 scale "
                  "per token and KV head gives 2 x (head_dim + 2) bytes per group against "
                  "2 x 2 x head_dim at 16 bit, so CLA2+int8 is 4 x head_dim / (head_dim + 2) "
                  "= 3.88x at head_dim 64: exactly 4x only without the scales")}
    return goals


def table(rep) -> str:
    rows = [f"{'model':<10} {'engine':<7} {'mode':<12} {'seqs':>5} {'tok/s':>7} {'TTFT p50':>9} "
            f"{'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9} {'running':>8} "
            f"{'max':>4} {'wall s':>7}"]

    def row(name, engine, mode, seqs, r):
        ttft, tpot = r["time_to_first_token_s"], r["time_per_output_token_s"]
        rows.append(f"{name:<10} {engine:<7} {mode:<12} {seqs:>5} {r['output_tokens_per_s']:>7.0f} "
                    f"{ttft['p50']:>8.2f}s {ttft['p99']:>8.2f}s {tpot['p50'] * 1e3:>7.1f}ms "
                    f"{tpot['p99'] * 1e3:>7.1f}ms {r['running_mean']:>8.2f} "
                    f"{r['running_max']:>4} {r['wall_s']:>7.1f}")

    for name, m in rep["models"].items():
        for mode, r in m.get("continuous", {}).items():
            row(name, "slots", mode, m["slots"], r)
        paged = m.get("paged", {})
        for mode, r in paged.get("modes", {}).items():
            row(name, "paged", mode, paged["max_seqs"], r)
        for state in ("on", "off"):
            r = paged.get("shared_prefix", {}).get(f"caching_{state}")
            if r:
                row(name, "paged", f"prefix {state}", paged["max_seqs"], r)
        if "static" in m:
            s = m["static"]
            rows.append(f"{name:<10} {'static':<7} {'':<12} {m['slots']:>5} "
                        f"{s['output_tokens_per_s']:>7.0f} {'':>9} {'':>9} {'':>9} {'':>9} "
                        f"{'':>8} {'':>4} {s['wall_s']:>7.1f}")
    rows.append("goals:")
    for key, g in rep["goals"].items():
        rows.append(f"  {key:<36} {g['measured']:.2f}x (goal >= {g['goal']}x): "
                    f"{'met' if g['met'] else 'NOT met'}")
    s = rep["settings"]
    rows.append(f"{provenance(rep)}; {s['requests']} requests, budget {s['budget_bytes']} B, "
                f"poisson {s['rate_requests_per_s']} req/s, load {rep['load_average_start']} -> "
                f"{rep['load_average_end']}, run {rep['run_time_s']:.0f} s")
    return "\n".join(rows)


def main(argv=None):
    args = parse_args(argv)
    rep = run(args)
    publish(rep, table(rep), args.out)


if __name__ == "__main__":
    main()
