"""The blockwise (flash-style) kernel against the reference kernel with packed documents, its
memory, and what `attention=auto` picks. Tiny shapes and blocks, so several blocks and a
ragged last block are exercised in a few small compiles."""
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_model import make_config, make_params
from test_precision import BF16_U, packed_batch

import cla_jax
from cla_jax.model import attention
from cla_jax.model.attention import SegmentMask, blockwise_attention

BLOCK_Q, BLOCK_KV = 8, 16   # T = 37: 5 query blocks (the last ragged), 3 key blocks
HEADS = {"gqa": (4, 2), "mqa": (4, 1)}  # query heads, KV heads


def packed_inputs(kv, dtype=jnp.float32, b=2, t=37, h=8, seed=0):
    """q, k, v and a cotangent for the output, and a mask of packed documents: row 0 holds
    segments 1 [0, 10) and 2 [10, 30), which crosses key and query block boundaries, then
    padding (segment 0); row 1 a 3-token document and one of 34."""
    n, kv_heads = HEADS[kv]
    rng = np.random.RandomState(seed)
    q, w = (jnp.asarray(rng.randn(b, t, n, h), dtype) for _ in range(2))
    k, v = (jnp.asarray(rng.randn(b, t, kv_heads, h), dtype) for _ in range(2))
    segments = np.ones((b, t), np.int32)
    segments[0, 10:30], segments[0, 30:], segments[1, 3:] = 2, 0, 4
    mask = SegmentMask(jnp.asarray(np.tile(np.arange(t), (b, 1))), jnp.asarray(segments))
    return (q, k, v), w, mask


def dense_attention(q_BTNH, k_BSKH, v_BSKH, mask: SegmentMask):
    """Plain softmax attention, written here from the mask's definition: query i sees key j
    iff same segment id and position j <= position i; KV head k serves query heads kG..kG+G-1."""
    b, t, n, h = q_BTNH.shape
    kv_heads = k_BSKH.shape[2]
    seg, pos = mask.segment_ids_BT, mask.positions_BT
    visible = (seg[:, :, None] == seg[:, None, :]) & (pos[:, None, :] <= pos[:, :, None])
    q = q_BTNH.reshape(b, t, kv_heads, n // kv_heads, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k_BSKH, preferred_element_type=jnp.float32,
                        precision="highest") / np.sqrt(h)
    probs = jax.nn.softmax(jnp.where(visible[:, None, None], scores, -jnp.inf), axis=-1)
    out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(v_BSKH.dtype), v_BSKH,
                     preferred_element_type=jnp.float32, precision="highest")
    return out.reshape(b, t, n, h).astype(q_BTNH.dtype)


@functools.partial(jax.jit, static_argnums=(0, 1))
def output_and_grads(kernel, dtype, q, k, v, w, mask):
    """The kernel's output on the inputs cast to `dtype`, and the gradients of <out, w>
    with respect to q, k, v."""
    def run(q, k, v):
        q, k, v = (x.astype(dtype) for x in (q, k, v))
        if kernel == "blockwise":
            return blockwise_attention(q, k, v, mask, block_q=BLOCK_Q, block_kv=BLOCK_KV)
        return dense_attention(q, k, v, mask)
    out, pullback = jax.vjp(run, q, k, v)
    return (out,) + pullback(w.astype(out.dtype))


@pytest.mark.parametrize("kv", sorted(HEADS))
def test_blockwise_equals_reference_with_packed_documents(kv):
    inputs, w, mask = packed_inputs(kv)
    got = output_and_grads("blockwise", jnp.float32, *inputs, w, mask)
    want = output_and_grads("reference", jnp.float32, *inputs, w, mask)
    # The same float32 sums in another order (measured: within 3e-6 of the largest entry).
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5 * np.abs(b).max(), err_msg=name)


def test_blockwise_in_bfloat16_is_within_bf16_rounding_of_float32():
    inputs, w, mask = packed_inputs("mqa", jnp.bfloat16)  # bf16 values, exact in float32
    got = output_and_grads("blockwise", jnp.bfloat16, *inputs, w, mask)
    want = output_and_grads("reference", jnp.float32, *inputs, w, mask)
    assert got[0].dtype == jnp.bfloat16
    # The probabilities and dS are rounded to bf16 before their matmuls, and every result once
    # (u/2 each): measured 0.7 u (out) to 1.25 u (dq) of each tensor's largest entry, as the
    # reference kernel's own bf16 run.
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        a, b = np.float64(a), np.float64(b)
        error = np.abs(a - b).max() / np.abs(b).max()
        assert 0 < error <= 3 * BF16_U, (name, error / BF16_U)


def test_key_blocks_after_the_query_block_are_skipped_not_just_masked():
    """NaN keys and values in the last key block poison every block that reads them, masked
    or not (0 x NaN); outputs and gradients of the earlier queries stay finite only if the
    kernel never touches the blocks wholly in their future."""
    (q, k, v), w, mask = packed_inputs("gqa")
    early = 2 * BLOCK_KV  # the queries of the 4 query blocks before the last key block
    poisoned = [x.at[:, early:].set(jnp.nan) for x in (k, v)]
    out, dq, _, _ = output_and_grads("blockwise", jnp.float32, q, *poisoned, w, mask)
    want_out, want_dq, _, _ = output_and_grads("reference", jnp.float32, q, k, v, w, mask)
    np.testing.assert_allclose(out[:, :early], want_out[:, :early], rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(dq[:, :early], want_dq[:, :early], rtol=1e-5, atol=2e-5)
    assert np.isnan(out[:, early:]).all()  # the poison does reach the queries that read it


def test_transformer_with_blockwise_equals_reference_on_a_packed_batch(monkeypatch):
    monkeypatch.setattr(attention, "BLOCK", 8)  # T = 16: two blocks; a document ends at 9
    config = make_config("cla2", "gqa")
    params = make_params(config)
    batch = packed_batch(config, batch=4)

    def loss_and_grads(kind):  # traced afresh: the patched block size is read when tracing
        def loss(p):
            logits, _ = cla_jax.Transformer(config.replace(attention=kind)).apply(
                {"params": p}, batch["inputs"], batch["positions"], batch["segment_ids"])
            nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None],
                                       -1)[..., 0]
            return jnp.sum(nll * batch["weights"]) / jnp.sum(batch["weights"])
        return jax.jit(jax.value_and_grad(loss))(params)

    (want_loss, want_grads), (loss, grads) = (loss_and_grads(k) for k in ("reference",
                                                                           "blockwise"))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                           grads, want_grads)


def attention_grad_temp_bytes(kernel, t, b=1, n=2, h=16, layers=2):
    """Temporaries XLA's buffer assignment gives a compiled fwd+bwd of MQA attention applied
    in a scan over `layers` layers, as the model applies it (the masks are the same in every
    layer, which once made jax keep every block pair's mask and probabilities)."""
    q = jax.ShapeDtypeStruct((b, t, n, h), jnp.float32)
    kv = jax.ShapeDtypeStruct((b, t, 1, h), jnp.float32)
    ids = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def loss(q, k, v, positions, segments):
        mask = SegmentMask(positions, segments)

        def layer(x, _):
            kx, vx = k + x[:, :, :1], v - x[:, :, 1:]  # each layer's own K/V
            if kernel == "blockwise":
                return x + blockwise_attention(x, kx, vx, mask, block_q=64, block_kv=64), None
            return x + attention.folded_attention(x, kx, vx, mask.dense()), None
        out = jax.lax.scan(layer, q, None, length=layers)[0]
        return jnp.sum(out * out)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, ids, ids).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_blockwise_training_memory_grows_linearly_with_length():
    # 4x the tokens: a [T, S] buffer would take 16x (the folded kernel: measured 16.0x); the
    # blockwise kernel's temporaries are O(T) arrays plus fixed-size blocks (measured 2.5x).
    blockwise = attention_grad_temp_bytes("blockwise", 1024) / attention_grad_temp_bytes(
        "blockwise", 256)
    dense = attention_grad_temp_bytes("xla", 1024) / attention_grad_temp_bytes("xla", 256)
    assert blockwise <= 5 and dense >= 12, (blockwise, dense)


def test_auto_picks_blockwise_for_long_cpu_training_and_logs_each_choice_once(caplog,
                                                                              monkeypatch):
    monkeypatch.setattr(attention, "_logged_choices", set())
    choose = functools.partial(attention.choose_kernel, "auto", dtype=jnp.float32,
                               causal_only=False)
    with caplog.at_level(logging.INFO):
        for _ in range(2):  # every layer and every trace asks again
            assert choose(seq_len=attention.BLOCK, with_cache=False) == "xla"  # the demo's case
            assert choose(seq_len=attention.BLOCK + 1, with_cache=False) == "blockwise"
            assert choose(seq_len=4 * attention.BLOCK, with_cache=False) == "blockwise"
            assert choose(seq_len=4 * attention.BLOCK, with_cache=True) == "xla"
    picks = [r.getMessage() for r in caplog.records if "model.attention runs" in r.getMessage()]
    assert len(picks) == 3 and len(set(picks)) == 3, picks
    # A cache is attended through a dense mask over its slots, whatever was asked for.
    assert attention.choose_kernel("blockwise", dtype=jnp.float32, seq_len=64,
                                   causal_only=False, with_cache=True) == "xla"
    assert attention.choose_kernel("reference", dtype=jnp.float32, seq_len=4096,
                                   causal_only=False, with_cache=False) == "reference"


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_auto_on_accelerators_picks_a_flash_kernel_for_packed_training(backend, monkeypatch):
    # The platform the program is compiled for (tests/test_aot.py checks that it is the
    # mesh's devices' platform, compile-only TPU and GPU devices included).
    monkeypatch.setattr(attention.sharding, "platform", lambda: backend)
    pallas = {"gpu": "pallas_gpu", "tpu": "splash"}[backend]
    choose = functools.partial(attention.choose_kernel, "auto", seq_len=2048, num_heads=16)
    # Packed documents (training), any length, MQA or GQA: the backend's Pallas kernel.
    for dtype in (jnp.bfloat16, jnp.float32):
        assert choose(dtype=dtype, causal_only=False, with_cache=False, num_kv_heads=1) == pallas
    assert choose(dtype=jnp.bfloat16, causal_only=False, with_cache=False, seq_len=128,
                  num_kv_heads=4) == pallas
    # A plain causal mask in half precision on GPU: cuDNN's flash attention.
    assert choose(dtype=jnp.bfloat16, causal_only=True, with_cache=False, num_kv_heads=1) == (
        "cudnn" if backend == "gpu" else "splash")
    # A cache: the dense kernel over its slots.
    assert choose(dtype=jnp.bfloat16, causal_only=False, with_cache=True, num_kv_heads=1) == "xla"
    # A mesh splitting 12 query heads over tensor=2 but not GQA's 3 KV heads: a shard's
    # query heads would not find their KV heads, so blockwise (which GSPMD partitions) runs.
    mesh = cla_jax.sharding.make_mesh({"data": 4, "fsdp": 1, "tensor": 2})
    with cla_jax.sharding.activate(mesh):
        assert choose(dtype=jnp.bfloat16, causal_only=False, with_cache=False, num_heads=12,
                      num_kv_heads=3) == "blockwise"
        assert choose(dtype=jnp.bfloat16, causal_only=False, with_cache=False,
                      num_kv_heads=2) == pallas  # split 2 ways like the query heads
        assert attention.choose_kernel(pallas, dtype=jnp.bfloat16, seq_len=64, causal_only=False,
                                       with_cache=False, num_heads=12,
                                       num_kv_heads=3) == "blockwise"
