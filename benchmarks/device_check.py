"""Device check: one command that says whether this checkout computes right and runs fast on
the accelerator jax sees, and writes one JSON results file.

    python3 benchmarks/device_check.py                            # GPU: the real shapes, < 8 min
    python3 benchmarks/device_check.py --platform=cpu --small --out=/tmp/device_check.json
    make device-check                                             # the first line, via make

Sections, each recorded with its status (ok, fail, error or skipped), its numbers and any
error; one failing section does not stop the others, and the file is rewritten after each:

  kernels                every attention kernel of `cla_jax.model.attention` that runs here
                         against `reference` in float32 on the same bf16 inputs: outputs and
                         q/k/v gradients, bf16, plain causal and packed documents
  decode_equals_forward  prefill + one-token cached decode steps against one full forward
                         pass, float32 and bf16
  train_step             the 1B H128-MQA-CLA2 training step (seq 2048, bf16): tokens/s and MFU,
                         at the first remat policy, least recompute first, that fits
  decode_roofline        one decode step at the batch whose cache fills a 40 GiB budget: time,
                         bytes read (params + cache) and their rate as a fraction of HBM's
  cla2_vs_cla1_decode    decode tokens/s of CLA2 and of its CLA1 twin at that same budget

On a CPU every section runs at tiny shapes and budgets (always, as with --small): seconds, so
the test suite runs it end to end. A time guard (--time_budget_s) skips, with the reason,
what would not finish in time. It needs jax, flax, optax, numpy, absl and etils only: nothing
on its import path loads tensorflow-datasets, grain or ml_collections (the paper model's
config is restated below; tests/test_device_check.py checks it against
configs/paper/1b_h128_mqa_cla2.py).
"""
from __future__ import annotations

import argparse
import gc
import os
import pathlib
import statistics
import sys
import time
import traceback
import types

STARTED = time.monotonic()  # the time budget counts jax's start-up too
PLATFORMS = {"gpu": "cuda", "cpu": "cpu"}  # --platform -> JAX_PLATFORMS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--platform", choices=sorted(PLATFORMS), default=None,
                   help="the jax platform (default: whatever jax picks)")
    p.add_argument("--out", default=None, help="results JSON (default: benchmarks/results/"
                   "device_check_<date>_<device>.json)")
    p.add_argument("--small", action="store_true",
                   help="tiny shapes and budgets (always so on a CPU)")
    p.add_argument("--time_budget_s", type=float, default=450.0,
                   help="sections that would start later than this are skipped")
    p.add_argument("--train_batch", type=int, default=8, help="train step batch (GPU)")
    p.add_argument("--budget_gib", type=float, default=40.0, help="KV-cache budget (GPU)")
    return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.platform:
    os.environ["JAX_PLATFORMS"] = PLATFORMS[ARGS.platform]
# The 1B train step with the least remat needs most of the card; jax's default is 75%.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.common import environment, today, write_results  # noqa: E402
from cla_jax import sharding  # noqa: E402
from cla_jax.cache import init_cache, kv_bytes  # noqa: E402
from cla_jax.capacity import capacity, without_cla  # noqa: E402
from cla_jax.config import (  # noqa: E402
    ATTENTION_KINDS,
    ModelConfig,
    kv_bytes_per_token,
    num_params,
    train_flops_per_token,
)
from cla_jax.model import Transformer, abstract_params, attention  # noqa: E402
from cla_jax.train.metrics import peak_flops  # noqa: E402
from cla_jax.train.optimizer import make_optimizer  # noqa: E402
from cla_jax.train.state import TrainState, state_shardings  # noqa: E402
from cla_jax.train.step import make_train_step  # noqa: E402

GIB = 2**30
# configs/paper/1b_h128_mqa_cla2.py's model (paper Table 1), restated without ml_collections.
PAPER_1B_H128_MQA_CLA2 = dict(
    vocab_size=50304, d_model=2048, num_layers=20, num_heads=16, num_kv_heads=1, head_dim=128,
    mlp_dim=5472, kv_sharing=2, group_sizes=None, rope_base=10000.0, norm_eps=1e-5,
    max_seq_len=2048, tie_embeddings=False, init_std=0.01275, dtype="bfloat16",
    param_dtype="float32", attention="auto", remat="dots_no_batch")
# The same structure (MQA, CLA2, bf16 over fp32) at a size a CPU runs in a second.
TINY = dict(vocab_size=256, d_model=64, num_layers=4, num_heads=4, head_dim=16, mlp_dim=128,
            max_seq_len=64)
# The paper's optimizer settings (configs/paper/common.py).
TRAIN_SETTINGS = dict(learning_rate=1e-3, steps=1000, warmup_fraction=0.05,
                      final_lr_fraction=0.1, b1=0.9, b2=0.95, weight_decay=0.1, grad_clip=1.0)
# HBM bandwidth, bytes/s, by jax's device_kind prefix (first match wins; datasheet values).
HBM_BYTES_PER_S = {"NVIDIA H100 PCIe": 2.0e12, "NVIDIA H100 NVL": 3.9e12,
                   "NVIDIA H100": 3.35e12, "NVIDIA H200": 4.8e12,
                   "NVIDIA A100-SXM4-80GB": 2.039e12, "NVIDIA A100-SXM4-40GB": 1.555e12}
# Kernels compiled for one backend only. On a CPU the Pallas ones still run, in Pallas's
# interpreter, at the tiny shapes; on another accelerator they are skipped (interpreted at the
# real shapes they would take minutes).
BACKEND_KERNELS = {"cudnn": "gpu", "pallas_gpu": "gpu", "splash": "tpu"}
# Largest relative error (max |kernel - truth| / max |truth|) a bf16 kernel may show against
# the float32 reference on the same bf16 inputs; bf16's unit roundoff is 2^-8 = 3.9e-3, and
# the reference kernel itself in bf16 shows ~1e-2 on the gradients.
KERNEL_TOLERANCE = {"output": 2e-2, "gradients": 5e-2}
# decode == forward: the same maths through the cache, so float32 agrees to rounding; bf16
# rounds activations and the cache at different points in the two paths.
DECODE_TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}
# On a GPU, jax's default precision runs float32 matmuls as TF32 (10-bit mantissa, unit
# roundoff 2^-11 = 4.9e-4), and Triton's dots do too: the H200 showed 5.3e-4 between the two
# paths (2026-12-04, greedy tokens 99.9% equal). Four TF32 units there.
GPU_FLOAT32_TOLERANCE = 2e-3
REMAT_ORDER = ("none", "dots", "dots_no_batch", "full")  # least recompute first
SECTIONS = ("kernels", "decode_equals_forward", "train_step", "decode_roofline",
            "cla2_vs_cla1_decode")


def sizes(small: bool, args) -> types.SimpleNamespace:
    """Every shape the sections use: the real ones, or tiny ones for a CPU."""
    if small:
        return types.SimpleNamespace(
            # Only packed masks: a plain causal one differs only for cuDNN, a GPU kernel.
            kernel=dict(batch=2, length=64, head_dim=16, heads=((4, 2),), packed=(True,),
                        block=16),
            decode=dict(config=TINY, batch=2, length=24, prompt=12, dtypes=("bfloat16",)),
            train=dict(config=TINY, batch=2, seq_len=64, steps=2),
            budget_bytes=256 * 2**10, context=64, decode_steps=3,
            needs_s=dict.fromkeys(SECTIONS, 1.0))
    return types.SimpleNamespace(
        kernel=dict(batch=2, length=2048, head_dim=128, heads=((16, 1), (16, 4)),
                    packed=(False, True), block=None),
        decode=dict(config=dict(vocab_size=32000, d_model=1024, num_layers=8, num_heads=8,
                                mlp_dim=2816, max_seq_len=256), batch=4, length=256, prompt=192,
                    dtypes=("float32", "bfloat16")),
        train=dict(config={}, batch=args.train_batch, seq_len=2048, steps=5),
        budget_bytes=int(args.budget_gib * GIB), context=2048,
        decode_steps=10,
        # About what each section takes on an H100/H200, compiles included: a section starts
        # only with this much of the time budget left.
        needs_s=dict(kernels=45.0, decode_equals_forward=45.0, train_step=150.0,
                     decode_roofline=60.0, cla2_vs_cla1_decode=60.0))


def paper_model(shapes: dict) -> ModelConfig:
    return ModelConfig(**{**PAPER_1B_H128_MQA_CLA2, **shapes})


def by_device_kind(table: dict, kind: str):
    return next((v for k, v in table.items() if kind.startswith(k)), None)


def fresh_params(config: ModelConfig, seed: int = 0):
    """Params distributed as `init_params` draws them (weights N(0, init_std), norm scales 1),
    from one flat random draw: compiling the model's own init, or one draw per weight, costs
    seconds on a CPU, once per model, and nothing here depends on the exact draws."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(abstract_params(config)))
    sizes_ = [a.size for _, a in leaves]

    def draw(key):
        flat = config.init_std * jax.random.normal(key, (sum(sizes_),), jnp.float32)
        offsets = np.cumsum([0] + sizes_)
        return tree.unflatten([
            jnp.ones(a.shape, a.dtype) if getattr(path[-1], "key", None) == "scale" else
            flat[start:start + a.size].reshape(a.shape).astype(a.dtype)
            for (path, a), start in zip(leaves, offsets)])

    return jax.jit(draw)(jax.random.key(seed))


def fresh_state(config: ModelConfig, optimizer) -> TrainState:
    params = fresh_params(config)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       opt_state=jax.jit(optimizer.init)(params))
    return jax.device_put(state, state_shardings(config, optimizer, sharding.single_device_mesh()))


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def is_out_of_memory(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


# ---------------------------------------------------------------- (a) attention kernels
def packed_segments(batch: int, length: int) -> np.ndarray:
    """int32 [B, T]: three documents of unequal length per row, in another split per row."""
    ids = np.ones((batch, length), np.int32)
    for row in range(batch):
        cut1, cut2 = length // (3 + row), length // 2 + row * length // 8
        ids[row, cut1:], ids[row, cut2:] = 2, 3
    return ids


def kernel_inputs(batch, length, heads, kv_heads, head_dim, packed, seed=0):
    rng = np.random.RandomState(seed)
    q, k, v, d_out = (jnp.asarray(rng.standard_normal(shape), jnp.bfloat16) for shape in (
        (batch, length, heads, head_dim), (batch, length, kv_heads, head_dim),
        (batch, length, kv_heads, head_dim), (batch, length, heads, head_dim)))
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length))
    segments = packed_segments(batch, length) if packed else np.ones((batch, length), np.int32)
    dense = (segments[:, :, None] == segments[:, None, :]) & (
        positions[:, None, :] <= positions[:, :, None])
    return (q, k, v, d_out), jnp.asarray(positions), jnp.asarray(segments), jnp.asarray(dense)


def kernel_mask(kind, positions, segments, dense):
    """The flash kernels take the mask as segment ids and positions; the dense ones as
    [B, T, S]."""
    return attention.SegmentMask(positions, segments) if kind in attention.FLASH_KERNELS \
        else dense


def skip_reason(kind: str) -> str | None:
    backend, home = jax.default_backend(), BACKEND_KERNELS.get(kind)
    if home is None or home == backend or (backend == "cpu" and kind != "cudnn"):
        return None
    return f"{kind} is compiled for {home}, not {backend}"


def median_seconds(fn, *args, repeats: int = 5) -> float:
    """Median wall time of fn(*args) (already compiled), results waited for."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def attention_with_grads(kind, q, k, v, d_out, mask, causal_only):
    def run(q, k, v):
        return attention.attend(q, k, v, mask, kind=kind, causal_only=causal_only)
    out, vjp = jax.vjp(run, q, k, v)
    return (out, *vjp(d_out.astype(out.dtype)))


def check_kernels(s) -> dict:
    sz = s.kernel
    kinds = [k for k in ATTENTION_KINDS if k != "auto"]
    default_block = attention.BLOCK
    attention.BLOCK = sz["block"] or default_block  # tiny lengths: several blocks still
    try:
        return _check_kernels(sz, kinds)
    finally:
        attention.BLOCK = default_block


def _check_kernels(sz, kinds) -> dict:
    cases, status = [], "ok"
    for heads, kv_heads in sz["heads"]:
        for packed in sz["packed"]:
            arrays, positions, segments, dense = kernel_inputs(
                sz["batch"], sz["length"], heads, kv_heads, sz["head_dim"], packed)
            causal_only = not packed
            as_f32 = [a.astype(jnp.float32) for a in arrays]
            truth = jax.jit(lambda q, k, v, d: attention_with_grads(
                "reference", q, k, v, d, dense, False))(*as_f32)
            for kind in kinds:
                case = dict(kind=kind, heads=heads, kv_heads=kv_heads,
                            mask="packed" if packed else "causal")
                if skip_reason(kind):
                    cases.append({**case, "status": "skipped", "reason": skip_reason(kind)})
                    continue
                try:
                    mask = kernel_mask(kind, positions, segments, dense)
                    step = jax.jit(lambda q, k, v, d, m: attention_with_grads(
                        kind, q, k, v, d, m, causal_only))
                    got = step(*arrays, mask)
                    # Forward + backward time: how `attention=auto`'s choice is to be judged.
                    case["fwd_bwd_seconds"] = median_seconds(step, *arrays, mask)
                    errors = {name: relative_error(g, t) for name, g, t in
                              zip(("output", "d_q", "d_k", "d_v"), got, truth)}
                    ok = (errors["output"] <= KERNEL_TOLERANCE["output"] and
                          max(errors[n] for n in ("d_q", "d_k", "d_v"))
                          <= KERNEL_TOLERANCE["gradients"])
                    cases.append({**case, "status": "ok" if ok else "fail", "errors": errors})
                except Exception as error:  # one kernel's failure is a finding, not a crash
                    cases.append({**case, "status": "error",
                                  "error": f"{type(error).__name__}: {error}"[:1000]})
                status = "fail" if cases[-1]["status"] in ("fail", "error") else status
    return dict(status=status, tolerance=KERNEL_TOLERANCE, kinds=kinds,
                shapes=dict(batch=sz["batch"], length=sz["length"], head_dim=sz["head_dim"]),
                blockwise_block=attention.BLOCK, cases=cases)


# ---------------------------------------------------------------- (b) decode == forward
def check_decode_equals_forward(s) -> dict:
    sz = s.decode
    b, t, p = sz["batch"], sz["length"], sz["prompt"]
    tokens = np.random.RandomState(1).randint(0, sz["config"]["vocab_size"], (b, t))
    tokens = jnp.asarray(tokens, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    runs, status = {}, "ok"
    for dtype in sz["dtypes"]:
        config = paper_model({**sz["config"], "dtype": dtype})
        model = Transformer(config)
        params = fresh_params(config)
        full = jax.jit(lambda w, x, pos: model.apply({"params": w}, x, pos)[0])(
            params, tokens, positions)
        with_cache = jax.jit(lambda w, x, pos, c: model.apply({"params": w}, x, pos, None, c))
        logits, cache = with_cache(params, tokens[:, :p], positions[:, :p],
                                   init_cache(config, b, t, jnp.dtype(dtype)))
        pieces = [logits]
        for i in range(p, t):
            logits, cache = with_cache(params, tokens[:, i:i + 1], positions[:, i:i + 1], cache)
            pieces.append(logits)
        cached = jnp.concatenate(pieces, axis=1)
        error = relative_error(cached, full)
        tolerance = (GPU_FLOAT32_TOLERANCE if dtype == "float32" and
                     jax.default_backend() == "gpu" else DECODE_TOLERANCE[dtype])
        runs[dtype] = dict(relative_error=error, tolerance=tolerance,
                           greedy_agreement=float(jnp.mean(
                               jnp.argmax(cached, -1) == jnp.argmax(full, -1))),
                           kernel_full_forward=_auto_kernel(config, t, causal_only=True))
        status = status if error <= tolerance else "fail"
    return dict(status=status, batch=b, length=t, prompt=p, decode_steps=t - p,
                model=paper_model(sz["config"]).to_dict(), runs=runs)


def _auto_kernel(config, seq_len, causal_only):
    """The kernel the model's training forward runs (what `auto` picks), for the record."""
    return attention.choose_kernel(config.attention, dtype=jnp.dtype(config.dtype),
                                   seq_len=seq_len, causal_only=causal_only, with_cache=False,
                                   num_heads=config.num_heads,
                                   num_kv_heads=config.num_kv_heads)


# ---------------------------------------------------------------- (c) training step
def train_batch(config, batch, seq_len):
    tokens = np.random.RandomState(0).randint(3, config.vocab_size, (batch, seq_len + 1))
    return {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32),
                                         (batch, seq_len)).copy(),
            "segment_ids": np.ones((batch, seq_len), np.int32),
            "weights": np.ones((batch, seq_len), np.float32)}


def free_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        return None
    return stats["bytes_limit"] - stats.get("bytes_in_use", 0)


def check_train_step(s, deadline: float) -> dict:
    sz = s.train
    base = paper_model({**sz["config"], "max_seq_len": max(
        sz["seq_len"], sz["config"].get("max_seq_len", 0))})
    optimizer = make_optimizer(types.SimpleNamespace(**TRAIN_SETTINGS))
    batch = jax.device_put(train_batch(base, sz["batch"], sz["seq_len"]),
                           sharding.batch_sharding(sharding.single_device_mesh()))
    tokens_per_step = sz["batch"] * sz["seq_len"]
    attempts, state = [], None
    attempt_s = s.needs_s["train_step"] / 3  # one compile and a few steps
    # A Pallas kernel that fails to compile here (it has never run on this device) is a
    # finding, recorded; the step is then timed with the blockwise kernel.
    kernels = [_auto_kernel(base, sz["seq_len"], False)]
    kernels += ["blockwise"] if kernels[0] in attention.PALLAS_BACKENDS else []
    plan = [(kernel, remat) for kernel in kernels for remat in REMAT_ORDER]
    failed_kernels = set()
    for kernel, remat in plan:
        if kernel in failed_kernels:
            continue
        if time.monotonic() > deadline - attempt_s:
            attempts.append(dict(remat=remat, attention=kernel, status="skipped",
                                 reason="time budget spent"))
            break
        config = base.replace(remat=remat, attention=kernel)
        if state is None or any(x.is_deleted() for x in jax.tree_util.tree_leaves(state)):
            state = None
            gc.collect()
            state = fresh_state(config, optimizer)
        step = make_train_step(config, optimizer)
        start = time.perf_counter()
        try:
            compiled = step.lower(state, batch).compile()
            compile_s = time.perf_counter() - start
            memory = compiled.memory_analysis()
            temp = getattr(memory, "temp_size_in_bytes", None)
            free = free_bytes()
            if temp is not None and free is not None and temp > 0.95 * free:
                attempts.append(dict(remat=remat, attention=kernel, status="does not fit",
                                     temp_bytes=temp,
                                     free_bytes=free, compile_s=compile_s))
                continue
            state, metrics = compiled(state, batch)  # warm-up
            jax.block_until_ready(metrics)
            times = []
            for _ in range(sz["steps"]):
                start = time.perf_counter()
                state, metrics = compiled(state, batch)
                jax.block_until_ready(metrics)
                times.append(time.perf_counter() - start)
        except Exception as error:
            state = None  # an asynchronous failure may have left `state` as broken outputs
            # A kernel short of shared memory is the kernel failing, not the step not fitting.
            failed = not is_out_of_memory(error) or "shared memory" in str(error).lower()
            if failed and kernel not in attention.PALLAS_BACKENDS:
                raise
            failed_kernels.update([kernel] if failed else [])
            attempts.append(dict(remat=remat, attention=kernel,
                                 status="error" if failed else "out of memory",
                                 error=f"{type(error).__name__}: {error}"[:1000]))
            continue
        step_s = statistics.median(times)
        memory_check = compare_memory(compiled, config, optimizer, state, batch)
        flops_per_token = train_flops_per_token(config, sz["seq_len"])
        peak = peak_flops(1)
        tokens_per_s = tokens_per_step / step_s
        attempts.append(dict(remat=remat, attention=kernel, status="fits"))
        loss = float(metrics["loss"])
        kind = jax.devices()[0].device_kind
        return dict(
            status="ok" if tokens_per_s > 0 and np.isfinite(loss) else "fail",
            remat=remat, attempts=attempts, batch=sz["batch"], seq_len=sz["seq_len"],
            tokens_per_step=tokens_per_step, compile_s=compile_s, step_s=step_s,
            step_s_repeats=times, tokens_per_s=tokens_per_s, params=num_params(config),
            flops_per_token=flops_per_token, achieved_flops_per_s=flops_per_token * tokens_per_s,
            peak_flops_per_s=peak, mfu=flops_per_token * tokens_per_s / peak if peak else None,
            mfu_reason=None if peak else f"no peak FLOP/s known for {kind!r}",
            temp_bytes=temp, loss=loss, attention=kernel, memory=memory_check,
            model=config.to_dict())
    timed_out = any(a["status"] == "skipped" for a in attempts)
    return dict(status="fail", reason="the time budget ran out" if timed_out else
                "no remat policy fitted", attempts=attempts)


def memory_figures(compiled) -> dict:
    """A compiled program's per-device bytes as XLA states them, and their sum: arguments +
    outputs - aliased (donated) + temporaries = what the program needs while it runs."""
    m = compiled.memory_analysis()
    figures = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in
               ("argument", "output", "alias", "temp")}
    return dict(figures, total=figures["argument"] + figures["output"] - figures["alias"] +
                figures["temp"])


def compare_memory(compiled, config, optimizer, state, batch) -> dict:
    """The train step's memory three ways: compiled here, compiled for this GPU's target
    description on compile-only devices (as `cla-compile` does on a CPU host), and the
    device's measured peak (a process-wide high-water mark; the earlier sections use far
    less)."""
    stats = jax.devices()[0].memory_stats() or {}
    record = dict(compiled_here=memory_figures(compiled),
                  measured_peak_bytes=stats.get("peak_bytes_in_use"),
                  bytes_in_use=stats.get("bytes_in_use"))
    if record["measured_peak_bytes"]:
        record["peak_over_compiled_total"] = (record["measured_peak_bytes"] /
                                              record["compiled_here"]["total"])
    try:
        from jax.experimental import topologies

        from cla_jax.aot.targets import CHIPS, gpu_target_config
        kind = jax.devices()[0].device_kind
        chip = next((c for c in CHIPS.values() if c.device_kind and kind.startswith(
            c.device_kind)), None)
        if chip is None:
            record["compile_only"] = dict(status="skipped", reason=f"no target for {kind!r}")
            return record
        topology = topologies.get_topology_desc(platform="cuda", topology="1x1x1",
                                                target_config=gpu_target_config(chip))
        mesh = sharding.single_device_mesh(topology.devices[0])
        abstract = jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), (state, batch),
            (state_shardings(config, optimizer, mesh), jax.tree_util.tree_map(
                lambda _: sharding.batch_sharding(mesh), batch)))
        start = time.perf_counter()
        compiled_only = make_train_step(config, optimizer, mesh=mesh).lower(*abstract).compile()
        record["compile_only"] = dict(status="ok", target=chip.name,
                                      compile_s=time.perf_counter() - start,
                                      **memory_figures(compiled_only))
    except Exception as error:  # a finding, recorded
        record["compile_only"] = dict(status="error",
                                      error=f"{type(error).__name__}: {error}"[:1000])
    return record


# ---------------------------------------------------------------- (d, e) decoding at a budget
_decode_runs: dict = {}


def decode_step_time(config: ModelConfig, batch: int, context: int, steps: int) -> dict:
    """Median time of one decode step of `batch` sequences over a full `context`-slot bf16
    cache (every slot attended), params in bf16 as served; memoized per (config, batch)."""
    key = (config, batch, context)
    if key in _decode_runs:
        return _decode_runs[key]
    model = Transformer(config)

    def step(params, cache, tokens_B1):
        positions_B1 = jnp.full_like(tokens_B1, context - 1)  # every slot is attended
        logits, cache = model.apply({"params": params}, tokens_B1, positions_B1, None, cache)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)[:, None], cache

    step = jax.jit(step, donate_argnums=(1,))  # the cache is updated in place
    params = fresh_params(config)
    cache = init_cache(config, batch, context, jnp.bfloat16)
    cache_bytes, param_bytes = kv_bytes(cache), sum(
        x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
    tokens = jnp.ones((batch, 1), jnp.int32)
    start = time.perf_counter()
    tokens, cache = step(params, cache, tokens)
    jax.block_until_ready(tokens)
    first_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        tokens, cache = step(params, cache, tokens)
        jax.block_until_ready(tokens)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    run = dict(batch=batch, context=context, step_s=step_s, step_s_repeats=times,
               first_step_s_with_compile=first_s, tokens_per_s=batch / step_s,
               cache_bytes=cache_bytes, param_bytes=param_bytes,
               bytes_read_per_step=cache_bytes + param_bytes)
    del params, cache, tokens
    gc.collect()
    _decode_runs[key] = run
    return run


def serving_model(s) -> ModelConfig:
    """The paper model (or the tiny twin) as served: bf16 weights, bf16 compute."""
    shapes = s.train["config"]
    return paper_model({**shapes, "param_dtype": "bfloat16",
                        "max_seq_len": max(s.context, shapes.get("max_seq_len", 0))})


def check_decode_roofline(s) -> dict:
    config = serving_model(s)
    cap = capacity(config, s.budget_bytes, s.context, "bfloat16")
    batch = cap["cla"]["max_batch_at_context"]
    if batch < 1:
        return dict(status="fail", reason=f"not one sequence of {s.context} tokens fits "
                    f"{s.budget_bytes} bytes", capacity=cap)
    run = decode_step_time(config, batch, s.context, s.decode_steps)
    kind = jax.devices()[0].device_kind
    bandwidth = by_device_kind(HBM_BYTES_PER_S, kind)
    rate = run["bytes_read_per_step"] / run["step_s"]
    fraction = rate / bandwidth if bandwidth else None
    return dict(status="ok" if run["tokens_per_s"] > 0 else "fail",
                budget_bytes=s.budget_bytes, kv_bytes_per_token=kv_bytes_per_token(config),
                capacity=cap, **run, bytes_per_s=rate, hbm_bytes_per_s=bandwidth,
                roofline_fraction=fraction,
                roofline_reason=None if bandwidth else f"no HBM bandwidth known for {kind!r}",
                model=config.to_dict())


def check_cla2_vs_cla1(s) -> dict:
    runs = {}
    for name, config in (("cla2", serving_model(s)), ("cla1", without_cla(serving_model(s)))):
        batch = capacity(config, s.budget_bytes, s.context, "bfloat16")["cla"][
            "max_batch_at_context"]
        runs[name] = dict(kv_bytes_per_token=kv_bytes_per_token(config), groups=list(
            config.groups), **decode_step_time(config, batch, s.context, s.decode_steps))
    ratio = runs["cla2"]["tokens_per_s"] / runs["cla1"]["tokens_per_s"]
    return dict(status="ok" if ratio > 0 else "fail", budget_bytes=s.budget_bytes,
                context=s.context, runs=runs, cla2_over_cla1_tokens_per_s=ratio,
                cla2_over_cla1_batch=runs["cla2"]["batch"] / runs["cla1"]["batch"])


# ---------------------------------------------------------------- driver
def run_section(report: dict, name: str, fn, deadline: float, needs_s: float, out) -> None:
    left = deadline - time.monotonic()
    if left < needs_s:
        report["sections"][name] = dict(status="skipped", reason=(
            f"time budget: {max(left, 0):.0f} s left, the section needs about {needs_s:.0f} s"))
    else:
        start, start_cpu = time.perf_counter(), time.process_time()
        try:
            result = fn()
        except Exception as error:  # recorded; the other sections still run
            result = dict(status="error", error=f"{type(error).__name__}: {error}"[:2000],
                          traceback=traceback.format_exc()[-4000:])
        gc.collect()
        report["sections"][name] = dict(result, seconds=time.perf_counter() - start,
                                        cpu_seconds=time.process_time() - start_cpu)
    report["summary"] = {k: v["status"] for k, v in report["sections"].items()}
    report["path"] = str(write_results(report, out))
    print(f"{name}: {report['sections'][name]['status']}", flush=True)


def main(args) -> dict:
    small = args.small or jax.default_backend() == "cpu"
    s = sizes(small, args)
    deadline = STARTED + args.time_budget_s
    report = dict(benchmark="device_check", date=today(), environment=environment(),
                  what="kernel correctness, decode == forward, 1B train step tokens/s and MFU, "
                       "decode roofline at a KV budget, CLA2 vs CLA1 decode at that budget",
                  settings=dict(small=small, time_budget_s=args.time_budget_s,
                                platform=jax.default_backend(),
                                budget_bytes=s.budget_bytes, context=s.context,
                                train_batch=s.train["batch"], seq_len=s.train["seq_len"]),
                  sections={})
    # The train step tries remat policies only while the decode sections keep their time.
    train_deadline = deadline - s.needs_s["decode_roofline"] - s.needs_s["cla2_vs_cla1_decode"]
    checks = dict(kernels=lambda: check_kernels(s),
                  decode_equals_forward=lambda: check_decode_equals_forward(s),
                  train_step=lambda: check_train_step(s, train_deadline),
                  decode_roofline=lambda: check_decode_roofline(s),
                  cla2_vs_cla1_decode=lambda: check_cla2_vs_cla1(s))
    for name in SECTIONS:
        run_section(report, name, checks[name], deadline, s.needs_s[name], args.out)
    report["total_seconds"] = time.monotonic() - STARTED
    report["path"] = str(write_results(report, args.out))
    print(f"wrote {report['path']} ({report['total_seconds']:.0f} s): {report['summary']}")
    return report


if __name__ == "__main__":
    main(ARGS)
