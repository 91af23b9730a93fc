"""Sharded = unsharded: loss, gradients, a train step and decoding on 8 virtual CPU devices
against one device; checkpoints restored onto other meshes; bad meshes refused up front."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from test_model import make_config, make_params

from cla_jax import sharding
from cla_jax.config import ConfigError
from cla_jax.decoding import Sampling, generate
from cla_jax.model import abstract_params
from cla_jax.model.loss import token_nll
from cla_jax.train.optimizer import make_optimizer
from cla_jax.train.state import init_state
from cla_jax.train.step import make_train_step
from configs import default

MESHES = {"data8": dict(data=8), "fsdp8": dict(fsdp=8), "2x2x2": dict(data=2, fsdp=2, tensor=2),
          "fsdp4_tensor2": dict(fsdp=4, tensor=2)}
# Same model in float32 on one device or eight: only the order of the sums differs. The loss
# is a sum over ~115 tokens; each gradient leaf must match to 1e-4 of its largest entry.
LOSS_RTOL, GRAD_TOL = 1e-5, 1e-4


def assert_close_per_leaf(actual, expected, tol=GRAD_TOL):
    def check(path, a, b):
        a, b = np.asarray(a), np.asarray(b)
        scale = max(np.abs(b).max(), 1e-30)
        assert np.abs(a - b).max() <= tol * scale, (jax.tree_util.keystr(path),
                                                    np.abs(a - b).max(), scale)
    jax.tree_util.tree_map_with_path(check, actual, expected)


def model(kv):  # CLA2 over 4 layers; dims divisible by every mesh axis above
    return make_config("cla2", kv, vocab_size=64, attention="auto")


def packed_batch(batch=8, length=16, vocab=64, seed=0):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(3, vocab, (batch, length + 1)).astype(np.int32)
    segments = np.where(np.arange(length) < length // 2, 1, 2)[None].repeat(batch, 0)
    positions = np.concatenate([np.arange(length // 2)] * 2)[None].repeat(batch, 0)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": positions,
            "segment_ids": segments.astype(np.int32),
            "weights": (rng.rand(batch, length) > 0.1).astype(np.float32)}


def loss_and_grads(config, params, batch, mesh):
    def loss(p, b):
        with sharding.activate(mesh):
            return jnp.sum(token_nll(config, p, b) * b["weights"])

    params_sharding = sharding.param_shardings(abstract_params(config), mesh)
    return jax.jit(jax.value_and_grad(loss),
                   in_shardings=(params_sharding, sharding.batch_sharding(mesh)),
                   out_shardings=(sharding.replicated(mesh), params_sharding))(
        jax.device_put(params, params_sharding), sharding.global_batch(batch, mesh))


def is_split(array) -> bool:
    return array.sharding.shard_shape(array.shape) != array.shape


@pytest.mark.parametrize("kv", ["mqa", "gqa"])
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_sharded_loss_and_gradients_equal_one_device(kv, mesh_name):
    config, batch = model(kv), packed_batch()
    params = make_params(config)
    loss1, grads1 = loss_and_grads(config, params, batch, sharding.single_device_mesh())
    mesh = sharding.make_mesh(MESHES[mesh_name])
    loss8, grads8 = loss_and_grads(config, params, batch, mesh)

    np.testing.assert_allclose(loss8, loss1, rtol=LOSS_RTOL)
    assert_close_per_leaf(grads8, grads1)
    # The layout is the one the rules ask for, not a silent replication.
    query = grads8["stage_0"]["layer_0"]["query"]["kernel"]  # [layers, embed, heads, head_dim]
    key = grads8["stage_0"]["layer_0"]["key"]["kernel"]      # [layers, embed, kv_heads, head_dim]
    assert is_split(query) == (mesh.shape["fsdp"] > 1 or mesh.shape["tensor"] > 1)
    kv_spec = key.sharding.spec[2] if len(key.sharding.spec) > 2 else None
    assert kv_spec == ("tensor" if kv == "gqa" and mesh.shape["tensor"] > 1 else None)
    assert not is_split(loss8)
    assert is_split(sharding.global_batch(batch, mesh)["inputs"])


def test_sharded_train_step_equals_one_device():
    config = model("gqa")
    optimizer = make_optimizer(default.get_config().train)
    states = []
    for mesh in (sharding.single_device_mesh(), sharding.make_mesh(dict(fsdp=4, tensor=2))):
        state = init_state(config, optimizer, 0, mesh)
        step = make_train_step(config, optimizer, grad_accum_steps=2, mesh=mesh)
        for seed in range(2):
            state, metrics = step(state, sharding.global_batch(packed_batch(seed=seed), mesh))
        states.append((jax.device_get(state), jax.device_get(metrics), state))
    (one, metrics1, _), (eight, metrics8, sharded) = states
    np.testing.assert_allclose(metrics8["loss"], metrics1["loss"], rtol=LOSS_RTOL)
    assert_close_per_leaf(eight.params, one.params)
    # Adam moments live in the same shards as their params.
    mu = sharded.opt_state[1][0].mu["stage_0"]["layer_0"]["query"]["kernel"]
    assert mu.sharding == sharded.params["stage_0"]["layer_0"]["query"]["kernel"].sharding
    assert is_split(mu)


@pytest.mark.parametrize("kv", ["mqa", "gqa"])
def test_sharded_decoding_equals_one_device(kv):
    config = model(kv).replace(max_seq_len=32)
    params = make_params(config, seed=1)
    prompts = [[5, 9, 2], [7, 1, 3, 3, 8, 4], [11], [4, 4], [9, 8, 7, 6], [3], [12, 13], [60]]
    greedy = Sampling(temperature=0)
    expected, _ = generate(config, params, prompts, 6, greedy)
    for name, axes in MESHES.items():
        mesh = sharding.make_mesh(axes)
        shardings = sharding.param_shardings(abstract_params(config), mesh)
        tokens, cache = generate(config, jax.device_put(params, shardings), prompts, 6, greedy,
                                 mesh=mesh)
        np.testing.assert_array_equal(tokens, expected, err_msg=name)
        assert is_split(cache.stages[0].key) == (mesh.shape["data"] * mesh.shape["fsdp"] > 1
                                                 or (kv == "gqa" and mesh.shape["tensor"] > 1))


def test_decoding_a_batch_the_mesh_does_not_divide_replicates_it():
    config = model("mqa").replace(max_seq_len=32)
    params = make_params(config, seed=1)
    expected, _ = generate(config, params, [[5, 9, 2]], 5, Sampling(temperature=0))
    mesh = sharding.make_mesh(dict(data=8))
    tokens, _ = generate(config, jax.device_put(params, sharding.replicated(mesh)), [[5, 9, 2]],
                         5, Sampling(temperature=0), mesh=mesh)
    np.testing.assert_array_equal(tokens, expected)


def test_mesh_fills_minus_one_and_reads_the_flag_syntax():
    assert sharding.mesh_shape({"fsdp": -1}, 8) == ((1, 8, 1), (1, 1, 1))
    assert sharding.mesh_shape({"data": 2, "tensor": -1}, 8) == ((2, 1, 4), (1, 1, 1))
    assert sharding.mesh_shape({"data": -1, "dcn_data": 2}, 8, 2) == ((4, 1, 1), (2, 1, 1))
    assert sharding.parse_mesh("data=2, tensor=-1") == {"data": 2, "fsdp": 1, "tensor": -1}
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert sharding.data_share(mesh) == (0, 1)  # one process holds every row
    assert sharding.make_mesh({"fsdp": -1}, jax.devices()[:4]).size == 4


@pytest.mark.parametrize("spec, fragment", [
    (dict(data=3, fsdp=-1), "cannot fill -1: 8 devices per slice are not divisible by 3"),
    (dict(data=2, fsdp=2), "needs 4 devices but 8 are available"),
    (dict(data=-1, fsdp=-1), "at most one -1"),
    (dict(data=8, dcn_data=2), "multiply to 2 but there are 1 slices/processes"),
    (dict(data=8, pipeline=2), "unknown mesh axes ['pipeline']"),
])
def test_bad_mesh_shapes_are_one_clear_error(spec, fragment):
    with pytest.raises(ConfigError) as error:
        sharding.make_mesh(spec)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_bad_mesh_flag_is_one_clear_error():
    with pytest.raises(ConfigError, match="bad mesh entry 'tensr=2'"):
        sharding.parse_mesh("data=2,tensr=2")


def test_axis_that_does_not_divide_a_weight_is_refused_but_kv_heads_replicate(caplog,
                                                                             monkeypatch):
    monkeypatch.setattr(sharding, "_LOGGED_NOTES", set())  # notes are logged once per process
    mesh = sharding.make_mesh(dict(tensor=8))
    with pytest.raises(ConfigError) as error:
        sharding.param_shardings(abstract_params(model("mqa")), mesh)
    message = str(error.value)
    assert "mesh axis tensor=8 does not divide the 'heads' dimension (4)" in message
    assert "model.num_heads" in message
    # MQA on tensor=2: one KV head cannot split; it is replicated, with a note in the log.
    config = make_config("cla2", "mqa", vocab_size=64, num_heads=8, head_dim=4)
    shardings = sharding.param_shardings(abstract_params(config), sharding.make_mesh(
        dict(fsdp=4, tensor=2)))
    key = shardings["stage_0"]["layer_0"]["key"]["kernel"]
    assert "tensor" not in jax.tree_util.tree_leaves(tuple(key.spec))
    assert "model.num_kv_heads=1 is not divisible by mesh tensor=2" in caplog.text


def test_batch_that_the_mesh_does_not_divide_is_refused():
    with pytest.raises(ConfigError, match=r"the batch size \(6\) is not divisible by the "
                                          r"mesh's data x fsdp = 4"):
        sharding.check_batch(6, sharding.make_mesh(dict(data=2, fsdp=2, tensor=2)))


def test_params_restore_onto_a_smaller_mesh(tmp_path):
    import orbax.checkpoint as ocp

    from cla_jax import checkpoint

    config = model("gqa")
    mesh8 = sharding.make_mesh(dict(fsdp=8))
    shardings8 = sharding.param_shardings(abstract_params(config), mesh8)
    params = jax.device_put(make_params(config), shardings8)
    manager = ocp.CheckpointManager(tmp_path, item_names=("params",))
    manager.save(1, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
    manager.wait_until_finished()
    batch = packed_batch()
    expected, _ = loss_and_grads(config, params, batch, mesh8)
    for mesh in (sharding.make_mesh(dict(data=2, tensor=2), jax.devices()[:4]),
                 sharding.single_device_mesh(jax.devices()[5])):
        restored = checkpoint.restore_params_onto(tmp_path, 1, config, mesh)
        leaf = restored["stage_0"]["layer_0"]["mlp"]["up"]["kernel"]
        assert leaf.sharding.mesh == mesh and leaf.sharding.device_set == set(mesh.devices.flat)
        loss, _ = loss_and_grads(config, restored, batch, mesh)
        np.testing.assert_allclose(loss, expected, rtol=LOSS_RTOL)
        jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(restored),
                               jax.device_get(nn.meta.unbox(params)))


@pytest.mark.parametrize("mesh, fragment", [
    (dict(data=1, fsdp=1, tensor=8), "mesh axis tensor=8 does not divide the 'vocab' dimension "
                                     "(260) of embed/embedding"),
    (dict(data=1, fsdp=-1, tensor=3), "cannot fill -1"),
    (dict(data=8, fsdp=1, tensor=1), "the micro batch, train.batch_size / "
                                     "train.grad_accum_steps, (4) is not divisible"),
])
def test_training_on_a_bad_mesh_stops_before_building_data_or_compiling(tmp_path, corpus_glob,
                                                                        mesh, fragment):
    from cla_jax.train.loop import train_and_evaluate
    from test_train import tiny_config

    config = tiny_config(corpus_glob, grad_accum_steps=2)
    config.mesh.update(mesh)
    with pytest.raises(ConfigError) as error:
        train_and_evaluate(config, tmp_path / "run", tmp_path / "cache")
    assert fragment in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
