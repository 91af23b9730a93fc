"""Compiling for TPU and GPU targets on this CPU host (cla_jax.aot, cla-compile): facts read
from the programs the real compilers (libtpu; the CUDA plugin with Triton and cuDNN) made, each
with a negative control that shows the check can fail.

The compile stack is installed by `make test` (`make compile-stack`) into .venv/compile-stack
and put on sys.path by conftest.py before jax starts; its absence fails these tests."""
import dataclasses
import json
import math
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

from cla_jax import sharding
from cla_jax.aot import hlo, report, stack, targets
from cla_jax.aot.programs import Setup, paged_step, serve_step, train
from cla_jax.config import ModelConfig
from cla_jax.model import abstract_params
from configs import default

ROOT = pathlib.Path(__file__).resolve().parents[1]
# A small MQA-CLA2 model whose dims differ from T = 1024 and its multiples, so that a buffer's
# shape says what it holds; head_dim 128 (TPU lanes); T above blockwise's 512-token block.
MODEL = ModelConfig(vocab_size=3000, d_model=192, num_layers=4, num_heads=4, num_kv_heads=1,
                    head_dim=128, mlp_dim=320, kv_sharing=2, max_seq_len=1024,
                    dtype="bfloat16", param_dtype="float32", attention="auto",
                    remat="dots_no_batch", loss_chunk_size=128)
T = 1024
ROWS = 2  # per batch shard


def train_settings():
    settings = default.get_config().train
    settings.grad_accum_steps = 1
    return settings


@pytest.fixture(scope="module")
def devices():
    """Compile-only devices: a TPU v5p-8 slice (4 chips) and a node of 8 H100s."""
    for platform in ("tpu", "gpu"):
        stack.check(platform)  # a missing stack fails here, naming the pin to install
    return {name: targets.compile_devices(targets.by_name(name)) for name in ("v5p-8", "8xh100")}


def setup_for(devices, model=MODEL, mesh=None, **changes):
    mesh = sharding.make_mesh(mesh or {"fsdp": -1}, devices)
    fields = dict(model=model, train=train_settings(), mesh=mesh, seq_len=T, batch_per_shard=ROWS,
                  decode_batch_per_shard=4, prompt_len=256, max_new_tokens=256,
                  cache_dtype="bfloat16", serve_param_dtype="bfloat16")
    return Setup(**{**fields, **changes})


def compiled(name, setup, target_name):
    result, _ = report.compile_program(name, setup, targets.by_name(target_name),
                                       [0] * setup.mesh.size)
    assert result["status"] == "ok", result
    return result


@pytest.fixture(scope="module")
def train_reports(devices):
    """The train step on both targets with `auto` kernels and the chunked loss, and (the
    negative control) with dense XLA attention and whole logits."""
    dense = MODEL.replace(attention="xla", loss_chunk_size=0)
    return {(target, kind): compiled("train", setup_for(devices[target], model), target)
            for target in devices for kind, model in (("flash", MODEL), ("dense", dense))}


def test_kernel_choice_and_interpret_mode_follow_the_target_platform(devices, train_reports):
    for target, platform in (("v5p-8", "tpu"), ("8xh100", "gpu")):
        with sharding.activate(sharding.make_mesh({"fsdp": -1}, devices[target])):
            assert sharding.platform() == platform != jax.default_backend()
    assert "tpu_custom_call" in train_reports["v5p-8", "flash"]["kernels"]  # splash, Mosaic
    assert "__gpu$xla.gpu.triton" in train_reports["8xh100", "flash"]["kernels"]  # Pallas
    for target in ("v5p-8", "8xh100"):  # negative control: no kernel asked for, none there
        assert not {"tpu_custom_call", "__gpu$xla.gpu.triton"} & set(
            train_reports[target, "dense"]["kernels"])


def test_cudnn_attention_compiles_to_cudnn_fused_attention(devices):
    from cla_jax.model import attention

    mesh = sharding.make_mesh({"fsdp": 1}, devices["8xh100"][:1])
    x = jax.ShapeDtypeStruct((2, T, 4, 128), jnp.bfloat16, sharding=sharding.replicated(mesh))

    def kernels(kind):
        def loss(q):
            causal = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (2, T, T))
            with sharding.activate(mesh):
                out = attention.attend(q, q[:, :, :1], q[:, :, :1], causal, kind=kind,
                                       causal_only=True)
            return jnp.sum(out.astype(jnp.float32))
        return hlo.Program(jax.jit(jax.grad(loss)).lower(x).compile().as_text()).kernels()

    assert {"__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"} <= set(kernels("cudnn"))
    assert not any(k.startswith("__cudnn") for k in kernels("xla"))  # negative control


def test_no_scores_or_logits_buffer_under_flash_attention_and_the_chunked_loss(train_reports):
    for target in ("v5p-8", "8xh100"):
        assert train_reports[target, "flash"]["suspicious_buffers"] == []
        # Negative control: dense attention keeps [.., T, S] scores, whole logits [.., T, V].
        kinds = {b["kind"] for b in train_reports[target, "dense"]["suspicious_buffers"]}
        assert kinds == {"scores", "logits"}, train_reports[target, "dense"]["suspicious_buffers"]


def fsdp_weight_sizes(model, mesh):
    """Element counts (per layer for scanned stacks) of every weight split over fsdp."""
    boxed = abstract_params(model)
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
    sizes = set()
    for box, where in zip(jax.tree_util.tree_leaves(boxed, is_leaf=is_box),
                          jax.tree_util.tree_leaves(sharding.param_shardings(boxed, mesh))):
        if "fsdp" in str(where.spec):
            shape = box.value.shape
            sizes.add(math.prod(shape[1:]) if box.names[0] == "layers" else math.prod(shape))
    return sizes


def gradient_reduction_problems(result, weight_sizes) -> list[str]:
    """What is wrong with how a train step reduces its FSDP weights' gradients: each must be
    reduce-scattered in float32, never all-reduced whole, and each weight gathered in bf16."""
    problems, scattered = [], set()
    for c in result["collectives"]:
        for array in c["inputs"] if c["kind"] != "all-gather" else c["outputs"]:
            dtype, dims = array.rstrip("]").split("[")
            size = math.prod(int(d) for d in dims.split(",") if d)
            if c["kind"] == "all-reduce" and size >= min(weight_sizes):
                # (several gradients may be concatenated into one all-reduce)
                problems.append(f"all-reduce of whole weight gradients {array}")
            if size not in weight_sizes:
                continue
            if c["kind"] == "reduce-scatter":
                scattered.add(size)
                if dtype != "f32":
                    problems.append(f"{dtype} reduce-scatter {array}")
            elif c["kind"] == "all-gather" and dtype != "bf16":
                problems.append(f"{dtype} all-gather of a weight {array}")
    problems += [f"no reduce-scatter of {s} elements" for s in sorted(weight_sizes - scattered)]
    return problems


def test_fsdp_gradients_are_reduce_scattered_in_float32_and_weights_gathered_in_bf16(devices,
                                                                                       train_reports):
    setup = setup_for(devices["8xh100"])
    sizes = fsdp_weight_sizes(MODEL, setup.mesh)
    d, h = MODEL.d_model, MODEL.head_dim  # q and out; k and v; gate, up, down; the tables
    assert sizes == {d * MODEL.num_heads * h, d * h, d * MODEL.mlp_dim, MODEL.vocab_size * d}
    assert gradient_reduction_problems(train_reports["8xh100", "flash"], sizes) == []
    # Negative controls: float32 compute gathers float32 weights; a pure data-parallel mesh
    # all-reduces whole gradients.
    f32 = compiled("train", setup_for(devices["8xh100"], MODEL.replace(dtype="float32")),
                   "8xh100")
    assert any("float32" in p or "f32 all-gather" in p
               for p in gradient_reduction_problems(f32, sizes))
    data_parallel = compiled("train", setup_for(devices["8xh100"], mesh={"data": 8, "fsdp": 1}),
                             "8xh100")
    assert any("all-reduce of whole weight gradients" in p
               for p in gradient_reduction_problems(data_parallel, sizes))


def test_the_unembedding_gradient_is_reduced_once_per_step_not_per_loss_chunk(train_reports):
    vocab_sized = [c for target in ("v5p-8", "8xh100")
                   for c in train_reports[target, "flash"]["collectives"]
                   if c["kind"] in ("all-reduce", "reduce-scatter") and c["dtype"] == "f32"
                   and any(f"{MODEL.d_model},{MODEL.vocab_size}]" in a for a in c["inputs"])]
    assert len(vocab_sized) == 2, vocab_sized  # one per target
    assert all(c["runs_per_step"] == 1 and not c["in_loop"] for c in vocab_sized)
    # Negative control: a loop that sums a gradient across devices in every iteration, as the
    # loss did before, is seen as one reduction per trip.
    loop_hlo = hlo.Program(LOOPED_REDUCTION)
    looped = [c for c in loop_hlo.collectives() if c.kind == "all-reduce"]
    assert looped and looped[0].in_loop and looped[0].runs_per_step == 16


def test_a_decode_step_updates_the_cache_in_place(devices):
    # 128 slots of 1024 tokens: the cache is most of what the step touches.
    for cache_dtype in ("bfloat16", "int8"):
        setup = setup_for(devices["8xh100"], cache_dtype=cache_dtype, decode_batch_per_shard=16,
                          prompt_len=512, max_new_tokens=512)
        program = serve_step(setup)
        figures = report.memory(program.fn.lower(*program.args).compile())
        # The donated cache is written where it lies: its bytes are aliased to the output.
        assert figures["alias"] >= program.cache_bytes > 0, (figures, program.cache_bytes)
        if cache_dtype == "bfloat16":  # no second copy of it either (int8 dequantises one
            assert figures["temp"] < program.cache_bytes, figures  # group at a time to bf16)
    # Negative control: the same step without donating its state writes a new cache.
    step = program.fn.fn
    undonated = jax.jit(step.__wrapped__, static_argnums=(3, 4))
    figures = report.memory(undonated.lower(*program.args, *program.fn.static).compile())
    assert figures["alias"] < program.cache_bytes


def test_the_paged_step_compiles_for_tpu_and_gpu_with_their_kernels_and_in_place(devices):
    """The paged engine's step at its largest shapes (sequences of 1024 tokens decoding and a
    256-token prompt chunk) on both targets: the decode rows run jax's Pallas paged-attention
    kernel (Mosaic on TPU, Triton on GPU), and the donated block pool is written where it
    lies, with no second copy of it; the negative controls: the XLA path has no kernel, and
    undonated, the step writes a new pool."""
    kernel = {"v5p-8": "tpu_custom_call", "8xh100": "__gpu$xla.gpu.triton"}
    for name in ("v5p-8", "8xh100"):
        for attention in ("auto", "xla"):
            setup = setup_for(devices[name], model=MODEL.replace(attention=attention),
                              decode_batch_per_shard=16, prompt_len=256, max_new_tokens=768)
            program = paged_step(setup)
            compiled = program.fn.lower(*program.args).compile()
            kernels = hlo.Program(compiled.as_text()).kernels()
            assert (kernel[name] in kernels) == (attention == "auto"), (name, kernels)
            figures = report.memory(compiled)
            assert figures["alias"] >= program.cache_bytes > 0, (name, figures)
            assert figures["temp"] < program.cache_bytes, (name, attention, figures)
    undonated = jax.jit(program.fn.fn.__wrapped__, static_argnums=3)
    figures = report.memory(undonated.lower(*program.args, *program.fn.static).compile())
    assert figures["alias"] < program.cache_bytes


def temp_bound(model: ModelConfig, rows: int, t: int, devices: int) -> int:
    """Bytes of temporaries a flash-attention, chunked-loss train step may need per device:
    the activations a layer saves (bf16: the residual, norms, q, k, v, attention output,
    SwiGLU's three) for every layer, a layer group's gathered bf16 weights twice (forward and
    backward) and float32 gradients of one group, one loss chunk's float32 logits and their
    gradient, the gathered embedding tables and the unembedding's float32 gradient, and the
    optimizer's update of this device's share of the params (float32, three moments' worth).
    The Triton kernel keeps K and V repeated to every query head (2 x heads x head_dim more a
    token). Nothing in it grows with T x S or T x vocab."""
    d, h = model.d_model, model.head_dim
    per_token = (3 * d + 2 * model.num_heads * h + 2 * model.num_kv_heads * h +
                 3 * model.mlp_dim + 2 * model.num_heads * h)
    activations = model.num_layers * rows * t * per_token * 2
    group = max(model.groups) * (2 * d * model.num_heads * h + 3 * d * model.mlp_dim) + \
        2 * d * model.num_kv_heads * h
    weights = group * (2 * 2 + 4)
    loss = 4 * rows * model.loss_chunk_size * model.vocab_size * 4
    tables = 2 * model.vocab_size * d * 2 + model.vocab_size * d * 4
    params = sum(x.size for x in jax.tree_util.tree_leaves(abstract_params(model))) // devices
    return activations + weights + loss + tables + 3 * params * 4


def test_train_step_temporaries_stay_below_a_bound_derived_from_the_config(train_reports):
    for target, chips in (("v5p-8", 4), ("8xh100", 8)):
        bound = temp_bound(MODEL, ROWS, T, chips)
        assert train_reports[target, "flash"]["memory"]["temp"] < bound, target
        # Negative control: dense attention and whole logits do not fit the bound.
        assert train_reports[target, "dense"]["memory"]["temp"] > bound, target


def test_largest_batch_is_the_boundary_between_fitting_and_not(devices):
    tiny = MODEL.replace(d_model=64, num_heads=2, head_dim=32, mlp_dim=128, vocab_size=500,
                         max_seq_len=128)
    setup = setup_for(devices["8xh100"][:1], tiny, seq_len=128)
    # An H100 of 24 MiB: a handful of rows fit (about 4.4 MiB of state, 0.8 MiB a row).
    chip = dataclasses.replace(targets.CHIPS["H100-SXM"], hbm_bytes=24 * 2**20)
    target = dataclasses.replace(targets.by_name("1xh100"), chip=chip)
    found = report.largest_batch("train", setup, target, [0])
    usable = chip.hbm_bytes * report.USABLE_FRACTION
    peaks = {int(k): v for k, v in found["peaks"].items()}
    largest = found["largest"]
    assert largest >= 2 and peaks[largest] <= usable < peaks[largest + 1], found
    # A batch far past the memory is a verdict in the report, not a crash.
    too_big, _ = report.compile_program(
        "train", dataclasses.replace(setup, batch_per_shard=4 * largest), target, [0])
    assert too_big["status"] == "ok" and too_big["fits"] is False


def run_cla_compile(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "cla_jax.scripts.compile", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, **kwargs)


def test_cla_compile_reports_every_program(tmp_path):
    out = tmp_path / "report.json"
    run = run_cla_compile("--config=configs/default.py", "--target=8xh100",
                          "--programs=train,eval,prefill,generate,serve_step,paged_step",
                          "--seq_len=256", f"--out={out}")
    assert run.returncode == 0, run.stderr[-3000:]
    entry = json.loads(out.read_text())["targets"][0]
    assert entry["target"] == "8xh100" and entry["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert set(entry["programs"]) == {"train", "eval", "prefill", "generate", "serve_step",
                                      "paged_step"}
    for result in entry["programs"].values():
        assert result["status"] == "ok" and result["fits"], result
        assert result["memory"]["peak"] > 0 and result["roofline"]["step_s_lower_bound"] > 0
    assert "train      peak" in run.stdout and "(fits)" in run.stdout


def test_cla_compile_bad_input_is_one_line_naming_the_fix():
    run = run_cla_compile("--config=configs/default.py", "--target=v5p-9")
    assert run.returncode == 2 and "unknown target 'v5p-9'" in run.stderr
    assert "v5p-8" in run.stderr and "8xh100" in run.stderr  # the known ones are listed
    run = run_cla_compile("--config=configs/default.py", "--target=8xh100", "--programs=trian")
    assert run.returncode == 2 and "unknown program(s) ['trian']" in run.stderr


def test_a_stack_that_does_not_match_jax_names_the_pin(monkeypatch):
    monkeypatch.setattr(stack, "_installed_version", lambda package: "0.0.1")
    with pytest.raises(stack.StackError) as raised:
        stack.check("tpu")
    message = str(raised.value)
    assert "libtpu 0.0.1 does not match jax" in message and stack.pins()["libtpu"] in message
    assert "python -m cla_jax.aot.stack install" in message
    monkeypatch.setattr(stack, "_installed_version", lambda package: None)
    with pytest.raises(stack.StackError, match="jax-cuda12-plugin is not installed"):
        stack.check("gpu")


# ------------------------------------------------------------------ reading HLO
LOOPED_REDUCTION = """HloModule looped

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%body (p: (s32[], f32[64,128])) -> (s32[], f32[64,128]) {
  %p = (s32[], f32[64,128]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %g = f32[64,128] get-tuple-element(%p), index=1
  %r = f32[64,128] all-reduce(%g), channel_id=1, replica_groups=[2,4]<=[8], to_apply=%add
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[64,128]) tuple(%next, %r)
}

%cond (p: (s32[], f32[64,128])) -> pred[] {
  %p = (s32[], f32[64,128]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(16)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: f32[64,128]) -> f32[64,128] {
  %a = f32[64,128] parameter(0)
  %zero = s32[] constant(0)
  %t = (s32[], f32[64,128]) tuple(%zero, %a)
  %w = (s32[], f32[64,128]) while(%t), condition=%cond, body=%body
  %out = f32[64,128] get-tuple-element(%w), index=1
  %part = f32[16,128] slice(%out), slice={[0:16], [0:128]}
  %ag = (f32[16,128], f32[64,128]) all-gather-start(%part), channel_id=2, replica_groups=mesh['x'=2,'y'=4] {'y'}, dimensions={0}
  ROOT %done = f32[64,128] all-gather-done(%ag)
}
"""


def test_hlo_reader_counts_loop_trips_groups_and_bytes():
    program = hlo.Program(LOOPED_REDUCTION)
    reduce, gather = program.collectives(slice_of_device=[0, 0, 0, 0, 1, 1, 1, 1])
    # The while loop's condition i < 16 from 0: 16 runs a step.
    assert (reduce.kind, reduce.runs_per_step, reduce.in_loop) == ("all-reduce", 16, True)
    assert reduce.group_size == 4 and not reduce.crosses_slices  # [2,4]<=[8]: {0..3}, {4..7}
    assert reduce.bytes_per_run == 2 * 64 * 128 * 4 * 3 / 4  # ring: 2 (n-1)/n of the input
    assert (gather.kind, gather.runs_per_step, gather.in_loop) == ("all-gather", 1, False)
    assert [str(a) for a in gather.outputs] == ["f32[64,128]"]  # not the async tuple's input
    assert gather.group_size == 4 and not gather.crosses_slices  # along 'y': {0..3}, {4..7}


def test_replica_groups_in_all_three_notations():
    assert hlo.replica_groups("replica_groups={{0,2},{1,3}}") == [[0, 2], [1, 3]]
    assert hlo.replica_groups("replica_groups=[2,2]<=[4]") == [[0, 1], [2, 3]]
    assert hlo.replica_groups("replica_groups=[2,2]<=[2,2]T(1,0)") == [[0, 2], [1, 3]]
    assert hlo.replica_groups("replica_groups=mesh['a'=2,'b'=3] {'a'}") == [[0, 3], [1, 4],
                                                                           [2, 5]]
    assert hlo.replica_groups("replica_groups=mesh['a'=2,'b'=3] {'b'}") == [[0, 1, 2],
                                                                           [3, 4, 5]]
    # The mesh's devices in another order: ids [[0, 1, 2], [3, 4, 5]] transposed.
    reordered = "replica_groups=mesh['a'=3,'b'=2], device_ids=([2,3]T(1,0)) {'a'}, dims={0}"
    assert hlo.replica_groups(reordered) == [[0, 1, 2], [3, 4, 5]]
    assert hlo.replica_groups("replica_groups=mesh['a'=3,'b'=2], device_ids=([2,3]T(1,0)) "
                              "{'b'}") == [[0, 3], [1, 4], [2, 5]]


def test_a_tpu_all_reduce_scatter_counts_as_the_reduce_scatter_it_is():
    text = """HloModule m

%all-reduce-scatter.1 (input: f32[8,16]) -> f32[2,16] {
  %input = f32[8,16] parameter(0)
  %ar = f32[8,16] all-reduce(%input), channel_id=1, replica_groups={{0,1,2,3}}, to_apply=%add
  %i = u32[] partition-id()
  ROOT %slice = f32[2,16] dynamic-slice(%ar, %i, %i), dynamic_slice_sizes={2,16}
}

ENTRY %main (a: f32[8,16]) -> f32[2,16] {
  %a = f32[8,16] parameter(0)
  ROOT %f = f32[2,16] fusion(%a), kind=kOutput, calls=%all-reduce-scatter.1
}
"""
    (collective,) = hlo.Program(text).collectives()
    assert collective.kind == "reduce-scatter" and collective.group_size == 4
    assert [str(a) for a in collective.outputs] == ["f32[2,16]"]
    assert collective.bytes_per_run == 8 * 16 * 4 * 3 / 4


def test_hbm_traffic_counts_what_in_place_and_sliced_operations_touch():
    text = """HloModule m

%update (p0: f32[100,64], p1: f32[1,64], p2: s32[]) -> f32[100,64] {
  %p0 = f32[100,64] parameter(0)
  %p1 = f32[1,64] parameter(1)
  %p2 = s32[] parameter(2)
  %zero = s32[] constant(0)
  ROOT %u = f32[100,64] dynamic-update-slice(%p0, %p1, %p2, %zero)
}

%slice (q0: f32[100,64], q1: s32[]) -> f32[1,64] {
  %q0 = f32[100,64] parameter(0)
  %q1 = s32[] parameter(1)
  %zero = s32[] constant(0)
  ROOT %d = f32[1,64] dynamic-slice(%q0, %q1, %zero), dynamic_slice_sizes={1,64}
}

ENTRY %main (a: f32[100,64], b: f32[1,64], i: s32[]) -> (f32[100,64], f32[1,64]) {
  %a = f32[100,64] parameter(0)
  %b = f32[1,64] parameter(1)
  %i = s32[] parameter(2)
  %f = f32[100,64] fusion(%a, %b, %i), kind=kLoop, calls=%update
  %g = f32[1,64] fusion(%f, %i), kind=kLoop, calls=%slice
  %h = f32[1,64] add(%g, %b)
  ROOT %t = (f32[100,64], f32[1,64]) tuple(%f, %h)
}
"""
    row = 64 * 4
    # The update writes one row in place (reading it and the index), the slice reads one row
    # and writes it, the add reads two rows and writes one: never the 100-row buffer.
    assert hlo.Program(text).hbm_traffic() == (2 * row + 4) + (2 * row + 4) + 3 * row


def test_the_embedding_gradient_never_moves_every_row_or_the_whole_table(devices):
    """data=2 x fsdp=4: each row's cotangent travels within its data group, and only the data
    groups' table shards are summed."""
    tiny = MODEL.replace(d_model=64, num_heads=2, head_dim=32, mlp_dim=128, vocab_size=512,
                         max_seq_len=128)
    setup = setup_for(devices["8xh100"], tiny, mesh={"data": 2, "fsdp": 4}, seq_len=128)
    rows = ROWS * setup.batch_shards

    whole = {f"{rows},{setup.seq_len},{tiny.d_model}]", f"{tiny.vocab_size},{tiny.d_model}]"}

    def full_gathers(collectives):
        """Collectives over all 8 devices that carry every row of the [rows, T, d_model]
        cotangent or the whole [vocab, d_model] table gradient."""
        return [c for c in collectives if c["group_size"] == 8 and any(
            a.split("[")[1] in whole for a in c["inputs"] + c["outputs"])]

    assert full_gathers(compiled("train", setup, "8xh100")["collectives"]) == []
    # Negative control: the scatter-add left to GSPMD, as the backward pass had it.
    mesh = setup.mesh
    g = jax.ShapeDtypeStruct((rows, setup.seq_len, tiny.d_model), jnp.float32,
                             sharding=sharding.batch_sharding(mesh))
    ids = jax.ShapeDtypeStruct((rows, setup.seq_len), jnp.int32,
                               sharding=sharding.batch_sharding(mesh))

    def scatter_add(g, ids):
        with sharding.activate(mesh):
            table = jnp.zeros((tiny.vocab_size, tiny.d_model)).at[ids].add(g)
            return sharding.constrain(table, ("vocab", "embed"))

    text = jax.jit(scatter_add).lower(g, ids).compile().as_text()
    gathered = [c.to_dict() for c in hlo.Program(text).collectives()]
    assert full_gathers(gathered), gathered  # here: the whole table all-reduced over all 8


def test_local_layers_compile_with_windowed_kernels_and_a_ring_cache_in_place(devices):
    """5:1 local:global (window 256) with CLA2 among the local layers: on TPU the train step
    runs splash attention for both layer types (the local ones with a sliding-window mask);
    on GPU the global layer runs Triton and the local ones blockwise (jax's Triton kernel has
    no window), with no [T, S] scores buffer either way; the decode step writes its donated
    cache, rings included, in place. Negative control: a window-less model's local layers
    would hold a cache entry of max_length slots, not 256."""
    family = MODEL.replace(num_layers=6, layer_types="5:1", local_window=256)
    kernel = {"v5p-8": "tpu_custom_call", "8xh100": "__gpu$xla.gpu.triton"}
    for name in ("v5p-8", "8xh100"):
        result = compiled("train", setup_for(devices[name], family), name)
        assert kernel[name] in result["kernels"], (name, result["kernels"])
        assert result["suspicious_buffers"] == [], (name, result["suspicious_buffers"])
    setup = setup_for(devices["8xh100"], family, decode_batch_per_shard=16, prompt_len=512,
                      max_new_tokens=512)
    program = serve_step(setup)
    figures = report.memory(program.fn.lower(*program.args).compile())
    assert figures["alias"] >= program.cache_bytes > 0, (figures, program.cache_bytes)
    global_twin = serve_step(dataclasses.replace(setup, model=family.replace(
        layer_types="", local_window=0)))
    # Producers: locals 0, 2, 4 (rings of 256) and the global 5, against the all-global CLA2
    # twin's 3 producers of 1024 slots.
    assert program.cache_bytes * 3 * 1024 == global_twin.cache_bytes * (3 * 256 + 1024)
