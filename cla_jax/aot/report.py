"""Compile a program for a target and say what it is: memory per device and whether it fits,
kernels, collectives, buffers shaped like attention scores or full logits, and a roofline.

Which numbers come from where:
- XLA (the compiled program): argument / output / alias / temp bytes per device
  (`memory_analysis()`), the kernels, every collective and its bytes, buffer shapes.
- The project's formula: model FLOPs (`config.train_flops_per_token`, forward = 1/3 of it).
- The target's datasheet (`targets.py`): HBM size, peak bf16 FLOP/s, HBM and interconnect
  bandwidth.
- Estimated from the compiled program: HBM traffic per step, every unfused operation reading
  its operands and writing its results once per run (`hlo.Program.hbm_traffic`).
- Derived: the roofline bound on a step's time is the largest of FLOPs / peak, HBM traffic /
  HBM bandwidth and collective bytes / link bandwidth (ICI or NVLink; DCN or InfiniBand for
  groups that span slices or nodes), as if the three overlapped perfectly. The MFU bound is
  the compute term over that time.
"""
from __future__ import annotations

import dataclasses
import math
import time

import jax

from cla_jax.aot import hlo
from cla_jax.aot.programs import PROGRAMS, Program, Setup
from cla_jax.aot.targets import Target

# A program "fits" when what it needs at its peak leaves this much of HBM free: XLA's
# allocator and the runtime take some (on GPU jax reserves 75% by default, 92% here with
# XLA_PYTHON_CLIENT_MEM_FRACTION; on TPU the whole HBM less a little).
USABLE_FRACTION = 0.95


def memory(compiled) -> dict:
    """A compiled program's memory figures (bytes): arguments, outputs, temporaries, code and
    what it needs in all while it runs."""
    m = compiled.memory_analysis()
    figures = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in
               ("argument", "output", "alias", "temp", "generated_code")}
    # What the program needs while it runs: its inputs, its outputs (those not written over
    # donated inputs), its temporaries and its code.
    figures["peak"] = (figures["argument"] + figures["output"] - figures["alias"] +
                       figures["temp"] + figures["generated_code"])
    return figures


def suspicious_buffers(program: hlo.Program, check: dict) -> list[dict]:
    """Buffers in HBM (outside fusions, not collectives' own) that hold a whole T x S block
    of attention scores or mask per row of the batch, or the logits of every token.

    Shapes only: a buffer counts as scores when it has T (or T times the query heads per KV
    head, as the folded XLA kernel lays them out) and S as two of its dims, at least three
    dims, and T x S elements for each row of the batch on the device (a residual stream
    [rows, T, d_model], or a stack of them per layer, with d_model == S is told apart by its
    shape, a weight or a weight's gradient by its size); as logits when it
    has the vocabulary (or its tensor-parallel share) and T or rows x T as dims and that many
    tokens' worth of elements. Programs of one-token steps (T = 1) are not checked."""
    t, s, rows = check["T"], check["S"], check["rows_per_device"]
    if t <= 1:
        return []
    query_dims = {t, t * check["query_groups"]}
    vocabs = {check["vocab"], check["vocab_local"]}
    weights = set(check["weight_sizes"])
    found = []
    for array, inst in program.buffers():
        if inst.opcode.removesuffix("-start") in hlo.COLLECTIVES or array.size in weights:
            continue
        dims = list(array.shape)
        kind = None
        if len(dims) >= 3 and array.size >= rows * t * s and not _residual_like(dims, check):
            query = next((d for d in dims if d in query_dims), None)
            if query is not None:
                rest = list(dims)
                rest.remove(query)
                kind = "scores" if s in rest else None
        vocab = next((d for d in dims if d in vocabs), None)
        if kind is None and vocab and array.size >= rows * t * vocab and any(
                d in (t, rows * t) for d in dims if d != vocab):
            kind = "logits"
        if kind:
            found.append(dict(kind=kind, shape=str(array), instruction=inst.name,
                              bytes=array.bytes))
    return found


def _residual_like(dims: list[int], check: dict) -> bool:
    """[rows, T, d_model] activations, or a per-layer stack of them."""
    rest = list(dims)
    for want in (check["rows_per_device"], check["T"], check["d_model"]):
        if want not in rest:
            return False
        rest.remove(want)
    return math.prod(rest) <= check["num_layers"]


def collective_summary(collectives: list[hlo.Collective]) -> dict:
    """The collectives of a program summed by kind: count and bytes per step, and how many
    of those bytes cross the network."""
    by_kind: dict[str, dict] = {}
    for c in collectives:
        entry = by_kind.setdefault(c.kind, dict(count=0, bytes_per_step=0.0))
        entry["count"] += 1
        entry["bytes_per_step"] += c.bytes_per_step
    return dict(
        bytes_per_step=sum(c.bytes_per_step for c in collectives),
        network_bytes_per_step=sum(c.bytes_per_step for c in collectives if c.crosses_slices),
        by_kind=by_kind)


def roofline(target: Target, program: Program, hbm_bytes: float, summary: dict) -> dict:
    """Lower bounds on a step's time on `target` from its FLOPs, memory traffic and collective
    bytes, and which of them bounds it."""
    chip = target.chip
    flops_per_chip = program.model_flops / target.chips
    compute_s = flops_per_chip / chip.peak_bf16_flops
    memory_s = hbm_bytes / chip.hbm_bytes_per_s
    local = summary["bytes_per_step"] - summary["network_bytes_per_step"]
    collective_s = (local / chip.interconnect_bytes_per_s +
                    summary["network_bytes_per_step"] / chip.network_bytes_per_s)
    step_s = max(compute_s, memory_s, collective_s)
    bound = max(("compute", compute_s), ("memory", memory_s), ("collectives", collective_s),
                key=lambda kv: kv[1])[0]
    return dict(model_flops_per_step=program.model_flops, flops_per_chip=flops_per_chip,
                compute_s=compute_s, hbm_bytes=hbm_bytes, memory_s=memory_s,
                collective_s=collective_s, step_s_lower_bound=step_s, bound_by=bound,
                mfu_upper_bound=compute_s / step_s if step_s else None,
                tokens_per_s_upper_bound=program.tokens / step_s if step_s else None)


def analyse(target: Target, program: Program, compiled, compile_s: float,
            slice_of_device: list[int]) -> dict:
    """The report of one compiled program on one target: memory, collectives, roofline, kernels
    and suspicious buffers."""
    figures = memory(compiled)
    parsed = hlo.Program(compiled.as_text())
    collectives = parsed.collectives(slice_of_device)
    summary = collective_summary(collectives)
    usable = int(target.chip.hbm_bytes * USABLE_FRACTION)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    return dict(
        program=program.name, status="ok", compile_s=compile_s,
        memory=figures, hbm_bytes=target.chip.hbm_bytes, fits=figures["peak"] <= usable,
        kernels=parsed.kernels(),
        collectives=[c.to_dict() for c in collectives], collective_summary=summary,
        suspicious_buffers=suspicious_buffers(parsed, program.shape_check),
        cache_bytes_per_device=program.cache_bytes or None,
        # XLA's count, while-loop bodies counted once (so not per step); TPU only.
        xla_flops=(cost or {}).get("flops") if isinstance(cost, dict) else None,
        roofline=roofline(target, program, parsed.hbm_traffic(), summary))


def compile_program(name: str, setup: Setup, target: Target, slice_of_device: list[int]):
    """(report, compiled) of one program; a program that cannot be built or compiled is a
    report with status "error" (a program that does not fit is an ordinary report)."""
    start = time.perf_counter()
    # A persistent compilation cache cannot hold executables of compile-only devices.
    caching = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        program = PROGRAMS[name](setup)
        compiled = program.fn.lower(*program.args).compile()
    except Exception as error:  # noqa: BLE001 (a finding of the report, not a crash)
        text = " ".join(f"{type(error).__name__}: {error}".split())
        status = "does not fit" if "RESOURCE_EXHAUSTED" in text and "hbm" in text.lower() \
            else "error"
        return dict(program=name, status=status, error=text[:2000],
                    compile_s=time.perf_counter() - start), None
    finally:
        jax.config.update("jax_enable_compilation_cache", caching)
    return analyse(target, program, compiled, time.perf_counter() - start,
                   slice_of_device), compiled


def largest_batch(name: str, setup: Setup, target: Target, slice_of_device: list[int],
                  field: str = "batch_per_shard", limit: int = 4096,
                  known: dict[int, int] | None = None) -> dict:
    """The largest per-shard batch whose program fits, found by compiling: two sizes give
    the bytes a row adds (memory is affine in the batch), the estimate is compiled, then
    stepped one row at a time until the boundary is found. Multiples of grad accumulation
    steps only, for train. known: {batch: peak bytes} already compiled (the first size)."""
    unit = setup.train.grad_accum_steps if name == "train" else 1
    usable = int(target.chip.hbm_bytes * USABLE_FRACTION)
    tried: dict[int, int | None] = dict(known or {})

    def peak(batch: int) -> int | None:
        if batch not in tried:
            report, _ = compile_program(name, dataclasses.replace(setup, **{field: batch}),
                                        target, slice_of_device)
            tried[batch] = report["memory"]["peak"] if report["status"] == "ok" else None
        return tried[batch]

    first = min(tried) if tried else unit
    one, two = peak(first), peak(2 * first)
    if one is None or one > usable:
        first, one, two = unit, peak(unit), peak(2 * unit)
    if one is None or one > usable:
        return dict(largest=0, compiles=len(tried), peaks=tried)
    per_row = max((two or usable * 2) - one, 1) / first
    guess = max(unit, min(limit, int(first + (usable - one) / per_row) // unit * unit))
    fits = lambda b: peak(b) is not None and peak(b) <= usable  # noqa: E731
    batch = guess
    if fits(batch):
        while batch + unit <= limit and fits(batch + unit):
            batch += unit
    else:
        while batch > unit and not fits(batch):
            batch -= unit
    return dict(largest=batch if fits(batch) else 0, compiles=len(tried) - len(known or {}),
                peaks={str(k): v for k, v in sorted(tried.items())})
