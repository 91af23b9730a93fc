"""Collectives in the compute dtype, gradients summed in float32 (DESIGN.md section 1: bf16
compute, fp32 master weights, fp32 gradient reduction): a sharded step gathers its FSDP
weight shards as bf16 and sums its weight gradients across devices in float32.

The HLO read is XLA's program right after SPMD partitioning, where the collectives and their
dtypes are decided. The CPU backend later runs every bf16 op in float32 (its
float-normalization pass), collectives included, so the final `compile().as_text()` of a CPU
program shows only float32 and would hide the difference; GPUs keep bf16 collectives.
"""
import pathlib
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cla_jax import sharding
from cla_jax.config import ModelConfig
from cla_jax.model.layers import embedding_lookup, weight_matmul
from cla_jax.train.state import abstract_state
from cla_jax.train.step import make_train_step

COLLECTIVE = re.compile(r"= (?P<shapes>.*?) (?P<op>all-gather|all-reduce|reduce-scatter)"
                        r"(?:-start)?\(")
FLOATS = {"bf16", "f16", "f32", "f64"}


def partitioned_hlo(jitted, *args) -> str:
    """The HLO text of `jitted(*args)` just after XLA's SPMD partitioner."""
    with tempfile.TemporaryDirectory() as tmp:
        # A persistent-cache hit would skip the compile, and with it the dump.
        enabled = jax.config.jax_enable_compilation_cache
        jax.config.update("jax_enable_compilation_cache", False)
        try:
            jitted.lower(*args).compile(compiler_options={
                "xla_dump_to": tmp, "xla_dump_hlo_pass_re": "spmd-partitioning"})
        finally:
            jax.config.update("jax_enable_compilation_cache", enabled)
        dumps = sorted(pathlib.Path(tmp).glob("*after_spmd-partitioning*.txt"))
        assert dumps, "XLA wrote no HLO after SPMD partitioning"
        return dumps[-1].read_text()


def collectives(hlo: str) -> list[tuple[str, str, str]]:
    """(op, float dtype, result shapes) of every float all-gather / all-reduce /
    reduce-scatter (a combined one counts once per dtype it carries)."""
    found = []
    for line in hlo.splitlines():
        match = COLLECTIVE.search(line)
        if match:
            dtypes = set(re.findall(r"\b([a-z]+\d+)\[", match["shapes"])) & FLOATS
            found += [(match["op"], dtype, match["shapes"]) for dtype in sorted(dtypes)]
    return found


def dtypes_of(found, *ops):
    return sorted({dtype for op, dtype, _ in found if op in ops})


def test_sharded_train_step_gathers_bf16_weights_and_sums_float32_gradients():
    config = ModelConfig(vocab_size=128, d_model=64, num_layers=2, num_heads=4, num_kv_heads=1,
                         head_dim=16, mlp_dim=128, kv_sharing=2, max_seq_len=16,
                         dtype="bfloat16", attention="xla")
    mesh = sharding.make_mesh({"fsdp": 8})
    optimizer = optax.sgd(0.1)
    batch_sharding = sharding.batch_sharding(mesh)
    batch = {name: jax.ShapeDtypeStruct((8, 16), jnp.float32 if name == "weights" else jnp.int32,
                                        sharding=batch_sharding)
             for name in ("inputs", "targets", "positions", "segment_ids", "weights")}
    found = collectives(partitioned_hlo(make_train_step(config, optimizer, mesh=mesh),
                                        abstract_state(config, optimizer, mesh), batch))

    gathers = [f for f in found if f[0] == "all-gather"]
    # Every weight matrix of the one layer group (q, out, k, v, gate, up, down x 2 layers, minus
    # the second layer's k and v) plus the embedding and the unembedding: at least 12.
    assert len(gathers) >= 12, found
    assert dtypes_of(found, "all-gather") == ["bf16"], gathers
    reductions = [f for f in found if f[0] in ("all-reduce", "reduce-scatter")]
    assert any("[" in shapes and "[]" not in shapes for _, _, shapes in reductions), reductions
    assert dtypes_of(found, "all-reduce", "reduce-scatter") == ["f32"], reductions


def matmul_loss(project):
    def loss(w_DF, x_BD):
        return jnp.sum(project(x_BD, w_DF).astype(jnp.float32) ** 2)
    return loss


def test_the_gather_then_cast_pattern_is_caught_and_weight_matmul_is_not():
    """Negative control: a weight gathered, then cast (the pattern before issue 16) moves
    float32 and sums its gradient in bf16; `weight_matmul` does the opposite."""
    mesh = sharding.make_mesh({"fsdp": 8})
    w = jax.ShapeDtypeStruct((64, 32), jnp.float32, sharding=NamedSharding(mesh, P("fsdp")))
    x = jax.ShapeDtypeStruct((16, 64), jnp.float32, sharding=NamedSharding(mesh, P("fsdp")))

    def gather_then_cast(x_BD, w_DF):
        w_DF = sharding.constrain(w_DF, (None, None)).astype(jnp.bfloat16)
        return x_BD.astype(jnp.bfloat16) @ w_DF

    def cast_then_gather(x_BD, w_DF):
        return weight_matmul(x_BD, w_DF, ("embed", "mlp"), jnp.bfloat16)

    def traced(project):
        def grad(w_DF, x_BD):
            with sharding.activate(mesh):
                return jax.grad(matmul_loss(project))(w_DF, x_BD)
        return jax.jit(grad, out_shardings=NamedSharding(mesh, P("fsdp")))

    before = collectives(partitioned_hlo(traced(gather_then_cast), w, x))
    assert dtypes_of(before, "all-gather") == ["f32"], before
    assert "bf16" in dtypes_of(before, "all-reduce", "reduce-scatter"), before
    after = collectives(partitioned_hlo(traced(cast_then_gather), w, x))
    assert dtypes_of(after, "all-gather") == ["bf16"], after
    assert dtypes_of(after, "all-reduce", "reduce-scatter") == ["f32"], after


def test_weight_matmul_values_and_float32_gradient():
    rng = np.random.RandomState(0)
    x = rng.standard_normal((24, 16)).astype(np.float32)
    w = rng.standard_normal((16, 2, 4)).astype(np.float32)
    g = rng.standard_normal((24, 8)).astype(np.float32)
    for dtype in (jnp.float32, jnp.bfloat16):
        y, vjp = jax.vjp(lambda x, w: weight_matmul(x, w, ("embed", "heads", "head_dim"),
                                                    dtype), x, w)
        plain, plain_vjp = jax.vjp(lambda x, w: x.astype(dtype) @ w.reshape(16, 8).astype(dtype),
                                   x, w)
        # The same values forward (cast, then gather == gather, then cast).
        np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(plain, np.float32))
        (dx, dw), (plain_dx, _) = vjp(g.astype(dtype)), plain_vjp(g.astype(dtype))
        np.testing.assert_array_equal(np.asarray(dx, np.float32),
                                      np.asarray(plain_dx, np.float32))
        # The weight's gradient: float32, x^T g of the compute-dtype values to float32
        # precision (a bf16 result would be off by up to 2^-9 relative).
        as_used = [np.asarray(jnp.asarray(a, dtype), np.float64) for a in (x, g)]
        want = (as_used[0].T @ as_used[1]).reshape(w.shape)
        assert dw.dtype == jnp.float32
        np.testing.assert_allclose(dw, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_embedding_lookup_values_and_float32_gradient():
    rng = np.random.RandomState(1)
    table = rng.standard_normal((11, 8)).astype(np.float32)
    tokens = np.array([[1, 1, 3, 1], [1, 9, 0, 1]], np.int32)  # token 1 five times
    g = rng.standard_normal((2, 4, 8)).astype(np.float32)
    rows, vjp = jax.vjp(lambda t: embedding_lookup(t, tokens, ("vocab", "embed"),
                                                   jnp.bfloat16), table)
    np.testing.assert_array_equal(np.asarray(rows, np.float32),
                                  np.asarray(jnp.asarray(table[tokens], jnp.bfloat16),
                                             np.float32))
    (d_table,) = vjp(jnp.asarray(g, jnp.bfloat16))
    want = np.zeros(table.shape)
    np.add.at(want, tokens, np.asarray(jnp.asarray(g, jnp.bfloat16), np.float64))
    assert d_table.dtype == jnp.float32
    np.testing.assert_allclose(d_table, want, rtol=1e-6, atol=1e-6)
