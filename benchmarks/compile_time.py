"""Compile time of the jitted forward+backward pass against depth and CLA pattern.

Answers: does compile time stay flat as the model gets deeper (the stages are `nn.scan`s, so
it should), and what does each extra stage of a non-uniform pattern cost? The goal is
compile(deepest) / compile(shallowest) <= 1.3 for the depth sweep.

Each figure is the wall time of `jax.jit(jax.value_and_grad(loss)).lower(params, batch)` and,
separately, of `.compile()` on the result, with abstract params (ShapeDtypeStructs: nothing
is allocated, so depth costs no memory). Every measurement uses a fresh function after
`jax.clear_caches()` with the persistent compilation cache off, so no repeat hits a cache.
Repeats go round-robin over all cases, so slow spells on a shared machine hit every case
alike; the median is reported.

    PYTHONPATH=. python benchmarks/compile_time.py --depths=4,8,16,32 --repeats=5
    # A KV-sharing family map (issue 29): 5:1 local:global, CLA2, the last half reusing K/V
    PYTHONPATH=. python benchmarks/compile_time.py --depths=24,48,96 --patterns= \
        --layer_types=5:1 --local_window=64 --kv_sources=last:half --repeats=3
"""
from __future__ import annotations

import argparse
import os
import pathlib
import re
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))
from benchmarks.common import environment, provenance, publish, today  # noqa: E402
from cla_jax import ModelConfig, Transformer, abstract_params  # noqa: E402
from cla_jax.config import REMAT_POLICIES  # noqa: E402

GOAL_RATIO = 1.3

# A CPU-sized MQA model; only num_layers and the groups change between cases.
BASE_MODEL = dict(vocab_size=4096, d_model=256, num_heads=4, num_kv_heads=1, head_dim=64,
                  mlp_dim=768, max_seq_len=512, dtype="float32", param_dtype="float32",
                  attention="xla")

# name -> depth -> (kv_sharing, group_sizes). The non-uniform ones are the paper's patterns
# stretched to `depth` layers: each run of equal groups is one more scan (stage).
PATTERNS = {
    "cla1": lambda depth: (1, None),
    "cla2": lambda depth: (2, None),
    "cla3": lambda depth: (3, None),  # uneven when 3 does not divide depth: a 2-layer tail
    "keepends": lambda depth: (1, (1,) + (2,) * ((depth - 2) // 2) + (1,)),
    "densefront": lambda depth: (1, (1, 1) + (2,) * ((depth - 2) // 2)),
    "denseback": lambda depth: (1, (2,) * ((depth - 2) // 2) + (1, 1)),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", default="4,8,16,32",
                   help="comma-separated layer counts for the depth sweep")
    p.add_argument("--kv_sharing", type=int, default=2,
                   help="CLA sharing factor of the depth sweep (1 = no CLA)")
    p.add_argument("--patterns", default="cla1,cla2,cla3,keepends",
                   help=f"CLA patterns compared at --pattern_depth; any of {sorted(PATTERNS)}; "
                        "empty to skip")
    p.add_argument("--pattern_depth", type=int, default=32)
    p.add_argument("--layer_types", default="",
                   help="model.layer_types of the depth sweep, e.g. 5:1 (local:global)")
    p.add_argument("--local_window", type=int, default=0, help="model.local_window")
    p.add_argument("--kv_sources", default="",
                   help="model.kv_sources of the depth sweep; last:half = the last half of "
                        "the layers reuse K/V")
    p.add_argument("--repeats", type=int, default=5, help="compiles per case; median reported")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--remat", default="none", choices=REMAT_POLICIES, help="model.remat policy")
    p.add_argument("--out", default="",
                   help="results JSON path (default: benchmarks/results/"
                        "compile_time_<date>_<device>.json)")
    args = p.parse_args(argv)
    try:
        args.depths = [int(d) for d in args.depths.split(",") if d.strip()]
    except ValueError:
        p.error(f"--depths must be comma-separated integers, got {args.depths!r}")
    args.patterns = [s.strip() for s in args.patterns.split(",") if s.strip()]
    unknown = [s for s in args.patterns if s not in PATTERNS]
    if unknown:
        p.error(f"unknown pattern(s) {unknown}; choose from {sorted(PATTERNS)}")
    paired = sorted({"keepends", "densefront", "denseback"} & set(args.patterns))
    if paired and (args.pattern_depth < 4 or args.pattern_depth % 2):
        p.error(f"{paired} need an even --pattern_depth >= 4, got {args.pattern_depth}")
    if args.repeats < 1 or not args.depths:
        p.error("need --repeats >= 1 and at least one depth")
    return args


def model_config(depth: int, kv_sharing: int, group_sizes, remat: str,
                 kv_map: dict | None = None) -> ModelConfig:
    kv_map = dict(kv_map or {})
    if kv_map.get("kv_sources") == "last:half":
        kv_map["kv_sources"] = f"last:{depth // 2}"
    return ModelConfig(num_layers=depth, kv_sharing=kv_sharing, group_sizes=group_sizes,
                       remat=remat, **BASE_MODEL, **kv_map)


def abstract_inputs(config: ModelConfig, batch: int, seq_len: int):
    """Unboxed ShapeDtypeStruct params and a packed training batch of the same kind."""
    params = nn.meta.unbox(abstract_params(config))
    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    data = dict(inputs=tokens, targets=tokens, positions=tokens, segment_ids=tokens,
                weights=jax.ShapeDtypeStruct((batch, seq_len), jnp.float32))
    return params, data


def make_loss(config: ModelConfig):
    """A new function object every call: jit's caches are keyed on it."""

    def loss(params, data):
        logits, _ = Transformer(config).apply({"params": params}, data["inputs"],
                                              data["positions"], data["segment_ids"])
        logz = jax.nn.logsumexp(logits, axis=-1)
        target = jnp.take_along_axis(logits, data["targets"][..., None], axis=-1)[..., 0]
        return jnp.sum((logz - target) * data["weights"]) / jnp.sum(data["weights"])

    return loss


def measure_once(config: ModelConfig, params, data, count_loops: bool):
    jax.clear_caches()
    fn = jax.jit(jax.value_and_grad(make_loss(config)))
    t0 = time.perf_counter()
    lowered = fn.lower(params, data)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    program = None
    if count_loops:  # program size: noise-free evidence of whether depth adds code
        hlo = compiled.as_text()
        program = dict(stablehlo_lines=lowered.as_text().count("\n"),
                       optimized_hlo_lines=hlo.count("\n"),
                       # scans left as loops (forward + backward per stage; XLA unrolls a
                       # scan of length 1, so a single-group stage adds no loop)
                       while_loops=len(re.findall(r"\bwhile\(", hlo)))
    return t1 - t0, t2 - t1, program


def summarize(values):
    return dict(median=statistics.median(values), min=min(values), max=max(values),
                all=[round(v, 4) for v in values])


def run(args):
    jax.config.update("jax_enable_compilation_cache", False)
    kv_map = dict(layer_types=args.layer_types, local_window=args.local_window,
                  kv_sources=args.kv_sources)
    cases = [dict(name=f"depth{d}_cla{args.kv_sharing}", group="depth", depth=d,
                  kv_sharing=args.kv_sharing, group_sizes=None, kv_map=kv_map)
             for d in args.depths]
    for name in args.patterns:
        kv_sharing, group_sizes = PATTERNS[name](args.pattern_depth)
        cases.append(dict(name=f"{name}_depth{args.pattern_depth}", group="pattern",
                          pattern=name, depth=args.pattern_depth, kv_sharing=kv_sharing,
                          group_sizes=group_sizes))
    for case in cases:
        config = model_config(case["depth"], case["kv_sharing"], case["group_sizes"],
                              args.remat, case.get("kv_map"))
        case["config"] = config
        case["groups"] = list(config.groups)
        case["stages"] = [list(s) for s in config.stages]
        case["inputs"] = abstract_inputs(config, args.batch, args.seq_len)
        case["lower_s"], case["compile_s"] = [], []

    # Warm-up: the first compile in a process pays one-off costs (imports, backend start).
    first = cases[0]
    measure_once(first["config"], *first["inputs"], count_loops=False)

    load_before = os.getloadavg()
    start = time.perf_counter()
    for r in range(args.repeats):
        for case in cases:
            lower_s, compile_s, program = measure_once(case["config"], *case["inputs"],
                                                     count_loops=r == 0)
            case["lower_s"].append(lower_s)
            case["compile_s"].append(compile_s)
            if r == 0:
                case["program"] = program
            print(f"  repeat {r + 1}/{args.repeats} {case['name']:<22} lower {lower_s:6.2f} s"
                  f"  compile {compile_s:6.2f} s", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - start
    load_after = os.getloadavg()

    results = []
    for case in cases:
        lower, compile_ = summarize(case["lower_s"]), summarize(case["compile_s"])
        results.append(dict(
            name=case["name"], group=case["group"], pattern=case.get("pattern"),
            num_layers=case["depth"], kv_sharing=case["kv_sharing"], groups=case["groups"],
            stages=case["stages"], num_stages=len(case["stages"]),
            **case["program"],
            lower_s=lower, compile_s=compile_,
            lower_plus_compile_median_s=lower["median"] + compile_["median"]))

    sweep = [r for r in results if r["group"] == "depth"]
    by_depth = sorted(sweep, key=lambda r: r["num_layers"])
    shallow, deep = by_depth[0], by_depth[-1]

    def ratio(key, stat="median"):
        return deep[key][stat] / shallow[key][stat]

    depth_ratio = dict(
        deep_layers=deep["num_layers"], shallow_layers=shallow["num_layers"],
        compile=ratio("compile_s"), compile_of_min=ratio("compile_s", "min"),
        lower=ratio("lower_s"),
        lower_plus_compile=(deep["lower_plus_compile_median_s"]
                            / shallow["lower_plus_compile_median_s"]),
        program_lines=deep["optimized_hlo_lines"] / shallow["optimized_hlo_lines"],
        goal=GOAL_RATIO, goal_met=ratio("compile_s") <= GOAL_RATIO)

    return dict(
        benchmark="compile_time",
        date=today(),
        what=("wall seconds of jax.jit(jax.value_and_grad(loss)).lower(params, batch) and of "
              ".compile() on it; abstract params; caches cleared before every measurement; "
              "median over repeats taken round-robin across cases"),
        environment=dict(
            environment(),
            load_average_1m_before=round(load_before[0], 2),
            load_average_1m_after=round(load_after[0], 2)),
        note=("Shared, noisy machine: other jobs may run alongside; compare medians, and "
              "treat differences of ~10-15% as noise unless they repeat."),
        settings=dict(repeats=args.repeats, batch=args.batch, seq_len=args.seq_len,
                      remat=args.remat, depths=args.depths, sweep_kv_sharing=args.kv_sharing,
                      sweep_kv_map=kv_map,
                      pattern_depth=args.pattern_depth, patterns=args.patterns),
        model=dict(BASE_MODEL, remat=args.remat),
        measured_seconds=round(elapsed, 1),
        depth_ratio=depth_ratio,
        results=results,
    )


def table(report) -> str:
    rows = [f"{'case':<22} {'layers':>6} {'stages':>6} {'loops':>5} {'HLO lines':>9} "
            f"{'lower s':>8} {'compile s':>9} {'(min)':>6} {'total s':>8}"]
    for r in report["results"]:
        rows.append(f"{r['name']:<22} {r['num_layers']:>6} {r['num_stages']:>6} "
                    f"{r['while_loops']:>5} {r['optimized_hlo_lines']:>9} "
                    f"{r['lower_s']['median']:>8.2f} {r['compile_s']['median']:>9.2f} "
                    f"{r['compile_s']['min']:>6.2f} {r['lower_plus_compile_median_s']:>8.2f}")
    d = report["depth_ratio"]
    rows.append(f"compile({d['deep_layers']})/compile({d['shallow_layers']}) = "
                f"{d['compile']:.2f}x (goal <= {d['goal']}x: "
                f"{'met' if d['goal_met'] else 'NOT met'}); "
                f"of the minima {d['compile_of_min']:.2f}x; "
                f"lower {d['lower']:.2f}x; lower+compile {d['lower_plus_compile']:.2f}x; "
                f"HLO size {d['program_lines']:.2f}x")
    rows.append(f"{provenance(report)}, median of {report['settings']['repeats']}")
    return "\n".join(rows)


def main(argv=None):
    args = parse_args(argv)
    report = run(args)
    publish(report, table(report), args.out)


if __name__ == "__main__":
    main()
