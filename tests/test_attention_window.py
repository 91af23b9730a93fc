"""Sliding-window (local) attention, `attend(..., window=W)`: query i sees key j iff also
0 <= i - j < W. Every kernel against a plain-NumPy reference of windowed causal attention
over packed documents (MHA, GQA, MQA; windows below, at and above the block sizes; T not a
multiple of the blocks), blockwise's gradients against jax.grad of a jnp reference, the
blocks outside the window skipped (blockwise) or dropped from the grid (splash), and the
windowed TPU and GPU paths compiled for their targets."""
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cla_jax import sharding
from cla_jax.aot import hlo, stack, targets
from cla_jax.model import attention, pallas_attention
from cla_jax.model.attention import SegmentMask, attend, blockwise_attention

HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}  # query heads, KV heads
T, H = 37, 8
BLOCK_Q, BLOCK_KV = 8, 16  # T = 37: 5 query blocks and 3 key blocks, the last ones ragged
WINDOWS = (1, 3, BLOCK_Q, BLOCK_KV, 50)  # below, at each block size, above T


def packed_segments(b: int, t: int):
    """[B, T] ids: row 0 holds documents [0, 10) and [10, 30) (across block boundaries), then
    padding (segment 0); row 1 a 3-token document and one of the rest. Further rows repeat."""
    segments = np.ones((b, t), np.int32)
    segments[0::2, 10:30], segments[0::2, 30:], segments[1::2, 3:] = 2, 0, 4
    return segments


def inputs(heads: str, b=2, t=T, h=H, seed=0):
    """q, k, v, a cotangent for the output, and the packed mask (positions: row indices)."""
    n, kv_heads = HEADS[heads]
    rng = np.random.default_rng(seed)
    q, k, v, cotangent = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in (
        (b, t, n, h), (b, t, kv_heads, h), (b, t, kv_heads, h), (b, t, n, h)))
    positions = np.tile(np.arange(t, dtype=np.int32), (b, 1))
    return (q, k, v), cotangent, SegmentMask(jnp.asarray(positions),
                                             jnp.asarray(packed_segments(b, t)))


def visible(mask: SegmentMask, window):
    """[B, T, T] NumPy: the same segment and 0 <= position i - position j < window."""
    seg, pos = np.asarray(mask.segment_ids_BT), np.asarray(mask.positions_BT)
    age = pos[:, :, None] - pos[:, None, :]
    return ((seg[:, :, None] == seg[:, None, :]) & (age >= 0)
            & (age < (np.inf if window is None else window)))


def numpy_attention(q_BTNH, k_BSKH, v_BSKH, mask: SegmentMask, window):
    """Windowed causal attention over packed documents in float64 NumPy, a loop over heads:
    KV head n // G serves query head n."""
    q, k, v = (np.asarray(x, np.float64) for x in (q_BTNH, k_BSKH, v_BSKH))
    groups = q.shape[2] // k.shape[2]
    seen = visible(mask, window)
    out = np.zeros_like(q)
    for n in range(q.shape[2]):
        scores = np.einsum("bth,bsh->bts", q[:, :, n], k[:, :, n // groups]) / np.sqrt(q.shape[3])
        scores = np.where(seen, scores, -np.inf)
        probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        out[:, :, n] = np.einsum("bts,bsh->bth", probs, v[:, :, n // groups])
    return out


def jnp_attention(q_BTNH, k_BSKH, v_BSKH, mask: SegmentMask, window):
    """The same in float32 jnp, for jax.grad: every KV head repeated to its query heads."""
    groups = q_BTNH.shape[2] // k_BSKH.shape[2]
    k, v = (jnp.repeat(x, groups, axis=2) for x in (k_BSKH, v_BSKH))
    scores = jnp.einsum("btnh,bsnh->bnts", q_BTNH, k, precision="highest") / np.sqrt(
        q_BTNH.shape[3])
    scores = jnp.where(visible(mask, window)[:, None], scores, -jnp.inf)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(scores, axis=-1), v,
                      precision="highest")


def assert_close(got, want, tolerance=2e-5, what=""):
    """Within `tolerance` of the reference's largest |entry|, or of 1 where that is less (a
    window of 1 leaves each query its own value: dq is 0)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    error = np.abs(got - want).max() / max(np.abs(want).max(), 1.0)
    assert error < tolerance, (what, error)


def blockwise(q, k, v, mask, window):
    return blockwise_attention(q, k, v, mask, block_q=BLOCK_Q, block_kv=BLOCK_KV, window=window)


@pytest.mark.parametrize("heads", sorted(HEADS))
def test_every_cpu_kernel_equals_numpy_windowed_attention(heads):
    (q, k, v), _, mask = inputs(heads)
    for window in WINDOWS:
        want = numpy_attention(q, k, v, mask, window)
        dense = jnp.asarray(visible(mask, window))
        for kind in ("reference", "xla"):  # the caller's dense mask carries the window
            assert_close(attend(q, k, v, dense, kind=kind, window=window), want,
                         what=(kind, window))
        assert_close(jax.jit(blockwise, static_argnums=4)(q, k, v, mask, window), want,
                     what=("blockwise", window))
        # SegmentMask.dense(window) is the test's mask.
        np.testing.assert_array_equal(mask.dense(window), dense)


@pytest.mark.parametrize("heads", sorted(HEADS))
def test_blockwise_gradients_equal_jax_grad_of_a_jnp_reference(heads):
    inputs_qkv, cotangent, mask = inputs(heads, seed=1)

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def output_and_grads(fn, window, q, k, v):
        out, pullback = jax.vjp(lambda q, k, v: fn(q, k, v, mask, window), q, k, v)
        return (out, *pullback(cotangent))

    for window in WINDOWS:
        got = output_and_grads(blockwise, window, *inputs_qkv)
        want = output_and_grads(jnp_attention, window, *inputs_qkv)
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
            assert_close(a, b, what=(name, window))


def test_attend_runs_blockwise_with_a_window_through_its_default_blocks(monkeypatch):
    monkeypatch.setattr(attention, "BLOCK", BLOCK_Q)  # read when traced: several blocks
    (q, k, v), _, mask = inputs("gqa")
    assert_close(attend(q, k, v, mask, kind="blockwise", window=5),
                 numpy_attention(q, k, v, mask, 5))


def test_blockwise_skips_key_blocks_behind_the_window_not_just_masks_them():
    """NaN keys and values in key block 0 poison every block pair that reads them, masked or
    not (0 x NaN): with window 8 (= the blocks), query blocks 2 and later, whose every query
    is at least 8 positions past key 7, stay finite, outputs and gradients, only if the
    kernel never touches block 0 for them. Query block 1 reads it (its window reaches back
    into block 0) and is poisoned, which shows the poison works."""
    (q, k, v), cotangent, _ = inputs("gqa", t=40)
    mask = SegmentMask(*(jnp.asarray(x) for x in (np.tile(np.arange(40), (2, 1)),
                                                  np.ones((2, 40), np.int32))))
    window, block = 8, 8
    poisoned = [x.at[:, :block].set(jnp.nan) for x in (k, v)]

    def output_and_grads(k, v):
        def run(q, k, v):
            return blockwise_attention(q, k, v, mask, block_q=block, block_kv=block,
                                       window=window)
        out, pullback = jax.vjp(run, q, k, v)
        return (out, *pullback(cotangent))

    got = jax.jit(output_and_grads)(*poisoned)
    want = jax.jit(output_and_grads)(k, v)
    past = 2 * block  # the first query (and key) the poisoned block is out of reach of
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert np.isfinite(a[:, past:]).all(), name
        np.testing.assert_array_equal(a[:, past:], b[:, past:], err_msg=name)
    assert np.isnan(got[0][:, block:past]).all()  # the poison reaches the queries that read it


def test_window_none_is_global_attention_as_before():
    (q, k, v), _, mask = inputs("gqa")
    want = numpy_attention(q, k, v, mask, None)
    for kind in ("blockwise", "splash"):
        def run(**window):
            return jax.jit(functools.partial(attend, kind=kind, **window))(q, k, v, mask)
        unwindowed = run()
        np.testing.assert_array_equal(run(window=None), unwindowed)
        assert_close(unwindowed, want, what=kind)
        # A window at least T long changes nothing.
        assert_close(run(window=T), unwindowed, 1e-6, what=kind)
    np.testing.assert_array_equal(mask.dense(None), visible(mask, None))
    np.testing.assert_array_equal(mask.dense(), mask.dense(None))


# ---------------------------------------------------------------- Pallas, interpreted on CPU
SPLASH_T = 200  # padded to 256: two 128-blocks, the second ragged
SPLASH_WINDOWS = (5, 128, 300)  # below, at, above the block


@pytest.mark.parametrize("heads", sorted(HEADS))
def test_splash_with_a_window_equals_numpy_windowed_attention(heads):
    """Outputs for every window; q, k, v gradients (against jax.grad of the jnp reference)
    for the window below the block."""
    (q, k, v), cotangent, mask = inputs(heads, t=SPLASH_T, h=32)

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def output_and_grads(fn, window, q, k, v):
        out, pullback = jax.vjp(lambda q, k, v: fn(q, k, v, mask, window), q, k, v)
        return (out, *pullback(cotangent))

    def splash(q, k, v, mask, window):
        return pallas_attention.tpu_splash_attention(q, k, v, mask.segment_ids_BT,
                                                     interpret=True, block=128, window=window)

    for window in SPLASH_WINDOWS:
        got = jax.jit(functools.partial(attend, kind="splash", window=window))(q, k, v, mask)
        assert_close(got, numpy_attention(q, k, v, mask, window), what=window)
    got = output_and_grads(splash, SPLASH_WINDOWS[0], q, k, v)
    want = output_and_grads(jnp_attention, SPLASH_WINDOWS[0], q, k, v)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close(a, b, what=name)


def test_splash_drops_the_blocks_outside_the_window_from_its_grid():
    """T = 1024 in 128-blocks: causal splash visits 36 of 64 block pairs, each query block
    over up to 8 key blocks; a 128-token window only a block and the one before (15 pairs, a
    grid 2 key blocks wide), in the backward's dK/dV pass too."""
    def grid(window):
        kernel = pallas_attention._splash_kernel(4, 1024, False, 128, True, window)
        blocks = np.asarray(kernel.fwd_mask_info.block_mask)
        return blocks.shape[1:], np.count_nonzero(blocks), kernel.dkv_mask_info.block_mask.shape

    assert grid(None) == ((8, 8), 36, (1, 8, 8))
    assert grid(128) == ((8, 2), 15, (1, 2, 8))


def test_pallas_gpu_with_a_window_runs_blockwise_and_says_so(caplog, monkeypatch):
    """jax's Triton mha has no sliding window: a local layer asked to run pallas_gpu runs the
    blockwise kernel (logged once), never the Triton kernel; without a window it still runs
    the Triton kernel (interpreted here)."""
    monkeypatch.setattr(attention, "_logged_choices", set())
    (q, k, v), _, mask = inputs("mqa", t=64, h=16)
    calls = []
    triton = pallas_attention.gpu_flash_attention
    monkeypatch.setattr(pallas_attention, "gpu_flash_attention",
                        lambda *args, **kwargs: calls.append(1) or triton(*args, **kwargs))
    with caplog.at_level(logging.INFO):
        for _ in range(2):
            got = attend(q, k, v, mask, kind="pallas_gpu", window=6)
            assert_close(got, numpy_attention(q, k, v, mask, 6))
    assert not calls
    notes = [r.getMessage() for r in caplog.records if "model.attention runs" in r.getMessage()]
    assert notes == ["model.attention runs blockwise attention: a sliding window, which "
                     "pallas_gpu (jax's Triton mha) lacks"], notes
    assert_close(attend(q, k, v, mask, kind="pallas_gpu"), numpy_attention(q, k, v, mask, None))
    assert calls
    with pytest.raises(ValueError, match="no sliding window"):
        attention.pallas_attention("pallas_gpu", q, k, v, mask, window=6)


# ---------------------------------------------------------------- cuDNN
def causal_inputs(dtype, b=2, t=48, seed=3):
    """q [B, T, 4, 16], MQA k, v, and the plain causal mask (one document a row)."""
    (q, k, v), _, _ = inputs("mqa", b=b, t=t, h=16, seed=seed)
    positions = np.tile(np.arange(t, dtype=np.int32), (b, 1))
    mask = SegmentMask(jnp.asarray(positions), jnp.ones((b, t), jnp.int32))
    return tuple(x.astype(dtype) for x in (q, k, v)), mask


def test_the_cudnn_window_means_ours_in_jax_dot_product_attention():
    """The `local_window_size` the cudnn kind passes, run by jax's XLA implementation of the
    same call (its documented window semantics; cuDNN's own run needs a GPU)."""
    (q, k, v), mask = causal_inputs(jnp.float32)
    assert attention.causal_window(None) is None and attention.causal_window(7) == (6, 0)
    for window in (1, 7, 16, 100):
        got = attention.cudnn_attention(q, k, v, None, causal_only=True, window=window,
                                        implementation="xla")
        assert_close(got, numpy_attention(q, k, v, mask, window), what=window)


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="cuDNN flash attention runs on an NVIDIA GPU only")
def test_cudnn_with_a_window_equals_numpy_windowed_attention_on_gpu():
    (q, k, v), mask = causal_inputs(jnp.bfloat16, t=256)
    for window in (1, 7, 64, 300):
        got = attend(q, k, v, None, kind="cudnn", causal_only=True, window=window)
        assert_close(got, numpy_attention(q, k, v, mask, window), 2e-2, what=window)


def test_windows_are_checked():
    (q, k, v), _, mask = inputs("mqa", t=16)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="int >= 1"):
            attend(q, k, v, mask, kind="blockwise", window=bad)


# ---------------------------------------------------------------- compiled for TPU and GPU
AOT_T, AOT_WINDOW = 1024, 256


@pytest.fixture(scope="module")
def devices():
    """Compile-only devices, as tests/test_aot.py makes them: a TPU v5p-8 slice, an H100.
    The compile stack (`make compile-stack`) is needed: its absence fails here, naming it."""
    for platform in ("tpu", "gpu"):
        stack.check(platform)
    return {name: targets.compile_devices(targets.by_name(name)) for name in ("v5p-8", "1xh100")}


def compiled_hlo(device, kind: str, *, causal_only=False, window=AOT_WINDOW) -> str:
    """The optimized HLO of fwd+bwd of `attend(kind, window)` in bf16 (MQA, head_dim 128,
    packed segment ids unless causal_only) compiled for one compile-only device."""
    mesh = sharding.make_mesh({"fsdp": 1}, [device])
    spec = functools.partial(jax.ShapeDtypeStruct, sharding=sharding.replicated(mesh))
    q = spec((2, AOT_T, 4, 128), jnp.bfloat16)
    ids = spec((2, AOT_T), jnp.int32)

    def loss(q, positions, segments):
        with sharding.activate(mesh):
            mask = (None if causal_only else SegmentMask(positions, segments))
            out = attend(q, q[:, :, :1], q[:, :, 1:2], mask, kind=kind,
                         causal_only=causal_only, window=window)
        return jnp.sum(out.astype(jnp.float32))

    return jax.jit(jax.grad(loss)).lower(q, ids, ids).compile().as_text()


def test_windowed_splash_compiles_to_the_tpu_kernel(devices):
    kernels = hlo.Program(compiled_hlo(devices["v5p-8"][0], "splash")).kernels()
    assert "tpu_custom_call" in kernels, kernels
    # Negative control: blockwise is plain XLA, no Pallas call.
    assert "tpu_custom_call" not in hlo.Program(
        compiled_hlo(devices["v5p-8"][0], "blockwise")).kernels()


def test_windowed_gpu_paths_compile_for_h100(devices):
    """pallas_gpu with a window compiles as blockwise (no Triton call; without a window
    the Triton kernel is there); causal cuDNN carries the window as cuDNN's
    sliding_window_length, W itself."""
    h100 = devices["1xh100"][0]
    local = hlo.Program(compiled_hlo(h100, "pallas_gpu")).kernels()
    assert "__gpu$xla.gpu.triton" not in local, local
    assert "__gpu$xla.gpu.triton" in hlo.Program(
        compiled_hlo(h100, "pallas_gpu", window=None)).kernels()
    text = compiled_hlo(h100, "cudnn", causal_only=True)
    assert {"__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"} <= set(
        hlo.Program(text).kernels())
    assert f'"sliding_window_length":{AOT_WINDOW}' in text.replace(" ", ""), [
        line for line in text.splitlines() if "sliding_window" in line][:2]
