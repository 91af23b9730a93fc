"""The Pallas training kernels (GPU Triton flash attention, TPU splash attention), run in
interpret mode on CPU, against a dense causal packed-document reference written here:
forward outputs and the q, k, v gradients of a random-cotangent loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cla_jax.model import pallas_attention


def packed_segment_ids(rng, b: int, t: int):
    """[B, T] ids of several documents a row (1, 2, ...) at random boundaries, then a trailing
    stretch of padding (segment 0)."""
    rows = []
    for _ in range(b):
        used = int(rng.integers(t * 3 // 4, t))  # the rest is padding
        cuts = np.sort(rng.choice(np.arange(1, used), size=3, replace=False))
        row = np.zeros(t, np.int32)
        row[:used] = 1 + np.searchsorted(cuts, np.arange(used), side="right")
        rows.append(row)
    return jnp.asarray(np.stack(rows))


def dense_reference(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT):
    """Plain float32 attention: query i sees key j iff j <= i and same segment id; the G query
    heads of a KV group share its K/V head."""
    b, t, n, h = q_BTNH.shape
    kv_heads = k_BSKH.shape[2]
    q = q_BTNH.astype(jnp.float32).reshape(b, t, kv_heads, n // kv_heads, h)
    k, v = k_BSKH.astype(jnp.float32), v_BSKH.astype(jnp.float32)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, precision="highest") / np.sqrt(h)
    idx = jnp.arange(t)
    mask = ((segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])
            & (idx[None, :] <= idx[:, None]))  # [B, T, S]
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bkgts,bskh->btkgh", probs, v, precision="highest").reshape(b, t, n, h)


def output_and_grads(fn, q, k, v, cotangent):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(cotangent))


def inputs(seed: int, b, t, n, kv_heads, h, dtype):
    rng = np.random.default_rng(seed)
    q, k, v, cotangent = (jnp.asarray(rng.standard_normal(shape), dtype) for shape in (
        (b, t, n, h), (b, t, kv_heads, h), (b, t, kv_heads, h), (b, t, n, h)))
    return q, k, v, cotangent, packed_segment_ids(rng, b, t)


def max_errors(kernel, b, t, n, kv_heads, h, dtype, seed=0, **kernel_kwargs):
    """Max |kernel - reference| over output, dq, dk, dv, each relative to the reference's max
    |value| (so one tolerance fits outputs and gradients of any scale)."""
    q, k, v, cotangent, seg = inputs(seed, b, t, n, kv_heads, h, dtype)
    got = jax.jit(lambda q, k, v, c: output_and_grads(
        lambda q, k, v: kernel(q, k, v, seg, interpret=True, **kernel_kwargs), q, k, v, c))(
            q, k, v, cotangent)
    want = jax.jit(lambda q, k, v, c: output_and_grads(
        lambda q, k, v: dense_reference(q, k, v, seg), q, k, v, c))(
            *(x.astype(jnp.float32) for x in (q, k, v, cotangent)))
    for g, x in zip(got, (q, q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype
    return {name: float(jnp.abs(g.astype(jnp.float32) - w).max() / jnp.abs(w).max())
            for name, g, w in zip(("out", "dq", "dk", "dv"), got, want)}


# (T, N, K, H, kernel kwargs): MHA, GQA, MQA; T a multiple of the blocks or not (padded).
GPU_CASES = [
    (64, 4, 4, 32, dict(block_q=16, block_k=32, block_backward=16)),  # 4 x 2 forward blocks
    (100, 4, 2, 32, {}),   # defaults clipped to 128, padded 100 -> 128; backward 4 blocks
    (96, 4, 1, 64, dict(block_q=32, block_k=32, block_backward=32)),  # MQA, 3 blocks
]
TPU_CASES = [
    (256, 4, 4, 32, dict(block=128)),  # 2 x 2 blocks
    (200, 4, 2, 32, {}),               # default block 256 (200 -> 256), one block
    (200, 4, 1, 64, dict(block=128)),  # MQA kernel, padded 200 -> 256, 2 x 2 blocks
]
F32_TOLERANCE = 1e-5
BF16_TOLERANCE = 2e-2


@pytest.mark.parametrize("t,n,kv_heads,h,kwargs", GPU_CASES)
def test_gpu_flash_attention_matches_reference(t, n, kv_heads, h, kwargs):
    errors = max_errors(pallas_attention.gpu_flash_attention, 2, t, n, kv_heads, h,
                        jnp.float32, **kwargs)
    assert max(errors.values()) < F32_TOLERANCE, errors


@pytest.mark.parametrize("t,n,kv_heads,h,kwargs", TPU_CASES)
def test_tpu_splash_attention_matches_reference(t, n, kv_heads, h, kwargs):
    errors = max_errors(pallas_attention.tpu_splash_attention, 2, t, n, kv_heads, h,
                        jnp.float32, **kwargs)
    assert max(errors.values()) < F32_TOLERANCE, errors


@pytest.mark.parametrize("kernel,kwargs", [
    (pallas_attention.gpu_flash_attention, dict(block_q=32, block_k=32, block_backward=32)),
    (pallas_attention.tpu_splash_attention, dict(block=128)),
])
def test_bfloat16_matches_reference(kernel, kwargs):
    errors = max_errors(kernel, 2, 160, 4, 2, 64, jnp.bfloat16, seed=1, **kwargs)
    assert max(errors.values()) < BF16_TOLERANCE, errors


def test_blocks_are_checked():
    q, k, v, _, seg = inputs(0, 1, 32, 2, 1, 16, jnp.float32)
    with pytest.raises(ValueError, match="powers of two"):
        pallas_attention.gpu_flash_attention(q, k, v, seg, interpret=True, block_q=24)
    with pytest.raises(ValueError, match="multiples of 128"):
        pallas_attention.tpu_splash_attention(q, k, v, seg, interpret=True, block=64)
    k3, v3 = (jnp.concatenate([x] * 3, axis=2) for x in (k, v))  # 3 KV heads, 2 query heads
    with pytest.raises(ValueError, match="not a multiple"):
        pallas_attention.gpu_flash_attention(q, k3, v3, seg)


@pytest.mark.parametrize("kind,kv_heads", [("pallas_gpu", 1), ("splash", 2)])
def test_on_a_mesh_each_device_runs_its_shard(kind, kv_heads):
    """Under a (data 2, fsdp 2, tensor 2) mesh the kernel runs under shard_map on each device's
    batch rows and heads: the same values as one device, and the compiled step moves no
    activations (no all-gather; without shard_map GSPMD gathers q, k, v whole)."""
    from cla_jax import sharding
    from cla_jax.model import attention

    q, k, v, cotangent, seg = inputs(2, 4, 128, 4, kv_heads, 32, jnp.float32)
    mask = attention.SegmentMask(jnp.broadcast_to(jnp.arange(128), seg.shape), seg)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})

    def run(q, k, v, c):
        with sharding.activate(mesh):
            return output_and_grads(
                lambda q, k, v: attention.pallas_attention(kind, q, k, v, mask), q, k, v, c)

    place = {"q": attention.Q_AXES, "kv": attention.KV_AXES}
    args = [jax.device_put(x, sharding.logical_sharding(place[p], x.shape, mesh))
            for x, p in zip((q, k, v, cotangent), ("q", "kv", "kv", "q"))]
    step = jax.jit(run)
    got = step(*args)
    want = jax.jit(lambda q, k, v, c: output_and_grads(
        lambda q, k, v: dense_reference(q, k, v, seg), q, k, v, c))(q, k, v, cotangent)
    for g, w in zip(got, want):
        assert float(jnp.abs(g - w).max() / jnp.abs(w).max()) < F32_TOLERANCE
    hlo = step.lower(*args).compile().as_text()
    assert "all-gather" not in hlo


def test_the_model_trains_through_the_pallas_kernels_as_through_reference():
    """Loss and gradients of a packed batch through a 2-group CLA2 GQA model with
    model.attention = pallas_gpu or splash (interpreted here) equal the reference kernel's."""
    from test_model import make_config, make_params
    from test_precision import packed_batch

    from cla_jax.model.loss import token_nll

    config = make_config("cla2", "gqa", max_seq_len=40)
    params = make_params(config)
    batch = packed_batch(config, seed=3)

    def loss_and_grads(kind):
        cfg = config.replace(attention=kind)
        return jax.jit(jax.value_and_grad(lambda p: jnp.mean(token_nll(cfg, p, batch))))(params)

    want_loss, want_grads = loss_and_grads("reference")
    for kind in ("pallas_gpu", "splash"):
        loss, grads = loss_and_grads(kind)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
        for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
            assert float(jnp.abs(g - w).max()) <= 1e-4 * float(jnp.abs(w).max()) + 1e-7, kind
