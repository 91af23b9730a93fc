"""Config validation, layer-group patterns and the paper's KV accounting (Table 1)."""
import importlib
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import cla_jax
from cla_jax.config import ConfigError, ModelConfig
from cla_jax.model import Transformer, abstract_params

PAPER_DIR = pathlib.Path(__file__).parents[1] / "configs" / "paper"

# Brandon et al. 2024, Table 1: model -> (d_head, query heads, KV heads, KV layers, bytes/token).
TABLE_1 = {
    "1b_h128_mha": (128, 16, 16, 20, 163840),
    "1b_h128_gqa4": (128, 16, 4, 20, 40960),
    "1b_h128_gqa2": (128, 16, 2, 20, 20480),
    "1b_h128_mqa": (128, 16, 1, 20, 10240),
    "1b_h64_mqa": (64, 32, 1, 20, 5120),
    "1b_h46_mqa": (46, 45, 1, 20, 3680),
    "1b_h32_mqa": (32, 64, 1, 20, 2560),
    "1b_h512_mqa_cla2": (512, 4, 1, 10, 20480),
    "1b_h256_mqa_cla2": (256, 8, 1, 10, 10240),
    "1b_h128_mqa_cla2": (128, 16, 1, 10, 5120),
    "1b_h90_mqa_cla2": (90, 23, 1, 10, 3600),
    "1b_h64_mqa_cla2": (64, 32, 1, 10, 2560),
    "1b_h256_gqa4_cla2": (256, 8, 4, 10, 40960),
    "1b_h128_gqa4_cla2": (128, 16, 4, 10, 20480),
    "1b_h128_gqa2_cla2": (128, 16, 2, 10, 10240),
    "1b_h128_mqa_cla3": (128, 16, 1, 7, 3584),
    "1b_h128_mqa_cla4": (128, 16, 1, 5, 2560),
    "1b_h128_mqa_cla2_keepends": (128, 16, 1, 11, 5632),
    "1b_h128_mqa_cla2_densefront": (128, 16, 1, 11, 5632),
    "1b_h128_mqa_cla2_denseback": (128, 16, 1, 11, 5632),
}
# 3B models (d_model 3072, 32 layers): name -> (d_head, heads, KV layers, KV bytes/token at
# 16 bit). Table 5 compares H128-MQA-CLA2 with H64-MQA at 8192 bytes; Table 7 H64-MQA-CLA2 with
# H32-MQA at 4096.
PAPER_3B = {
    "3b_h128_mqa": (128, 24, 32, 16384),
    "3b_h128_mqa_cla2": (128, 24, 16, 8192),
    "3b_h64_mqa": (64, 48, 32, 8192),
    "3b_h64_mqa_cla2": (64, 48, 16, 4096),
    "3b_h32_mqa": (32, 96, 32, 4096),
}


def load_paper(name):
    return importlib.import_module(f"configs.paper.{name}").get_config()


def small(**changes):
    base = dict(vocab_size=50, d_model=16, num_layers=4, num_heads=4, num_kv_heads=2,
                head_dim=8, mlp_dim=24)
    return ModelConfig(**{**base, **changes})


def test_every_paper_model_has_a_config_file():
    files = {p.stem for p in PAPER_DIR.glob("*.py")} - {"__init__", "common"}
    assert files == set(TABLE_1) | set(PAPER_3B)


def independent_param_count(d, layers, heads, kv_heads, d_head, ffn, vocab, groups, tied):
    """Counted tensor by tensor, the way one would by hand."""
    total = vocab * d + (0 if tied else d * vocab) + d          # embed, unembed, final norm
    for size in groups:
        for i in range(size):
            total += d + d                                     # attention norm, MLP norm
            total += d * heads * d_head + heads * d_head * d   # W_q, W_o
            total += d * ffn * 2 + ffn * d                     # gate, up, down
            if i == 0:
                total += 2 * d * kv_heads * d_head             # W_k, W_v
                total += d if size > 1 else 0                  # separate K/V norm
    return total


@pytest.mark.parametrize("name", sorted(TABLE_1))
def test_table1_kv_bytes_params_and_cache(name):
    d_head, heads, kv_heads, kv_layers, paper_bytes = TABLE_1[name]
    model = ModelConfig.from_dict(load_paper(name).model)
    assert (model.head_dim, model.num_heads, model.num_kv_heads) == (d_head, heads, kv_heads)
    assert model.num_kv_layers == kv_layers
    assert cla_jax.kv_bytes_per_token(model) == paper_bytes
    assert cla_jax.kv_bytes_per_token(model, bytes_per_element=4) == 2 * paper_bytes

    # The cache, built abstractly at bf16, holds exactly batch x length x bytes/token.
    cache = jax.eval_shape(lambda: cla_jax.init_cache(model, 3, 64, jnp.bfloat16))
    assert cla_jax.kv_bytes(cache) == 3 * 64 * paper_bytes
    assert sum(s.key.shape[0] for s in cache.stages) == kv_layers

    params = nn.meta.unbox(cla_jax.abstract_params(model))  # no 1B allocation
    counted = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    expected = independent_param_count(2048, 20, heads, kv_heads, d_head, 5472, 50304,
                                       model.groups, tied=False)
    assert counted == expected == cla_jax.num_params(model)
    assert 0.9e9 < counted < 1.3e9


@pytest.mark.parametrize("name", sorted(PAPER_3B))
def test_3b_configs_build(name):
    d_head, heads, kv_layers, paper_bytes = PAPER_3B[name]
    model = ModelConfig.from_dict(load_paper(name).model)
    assert (model.head_dim, model.num_heads, model.num_kv_heads) == (d_head, heads, 1)
    assert model.num_heads * model.head_dim == model.d_model == 3072
    assert model.num_kv_layers == kv_layers
    assert cla_jax.kv_bytes_per_token(model) == 2 * 1 * d_head * kv_layers * 2 == paper_bytes
    assert 3.0e9 < cla_jax.num_params(model) < 3.6e9


def test_paper_optimizer_settings_are_written_in():
    train = load_paper("1b_h128_mqa_cla2").train
    assert (train.b1, train.b2, train.weight_decay, train.grad_clip) == (0.9, 0.95, 0.1, 1.0)
    assert (train.warmup_fraction, train.final_lr_fraction) == (0.05, 0.1)
    model = load_paper("1b_h128_mqa_cla2").model
    assert (model.init_std, model.dtype, model.param_dtype) == (0.01275, "bfloat16", "float32")


@pytest.mark.parametrize("sharing,layers,groups", [
    (1, 4, (1, 1, 1, 1)), (2, 4, (2, 2)), (3, 20, (3,) * 6 + (2,)), (4, 20, (4,) * 5),
    (3, 5, (3, 2)), (5, 5, (5,)),
])
def test_sharing_factor_groups(sharing, layers, groups):
    assert small(num_layers=layers, kv_sharing=sharing).groups == groups


def test_explicit_pattern_and_stages():
    c = small(num_layers=20, group_sizes=(1,) + (2,) * 9 + (1,))
    assert c.stages == ((1, 1), (2, 9), (1, 1))
    c = ModelConfig.from_dict({**small().to_dict(), "num_layers": 20, "group_sizes": "1,2x9,1"})
    assert c.groups == (1,) + (2,) * 9 + (1,)
    assert small(kv_sharing=2).stages == ((2, 2),)
    assert small(num_layers=5, kv_sharing=3).stages == ((3, 1), (2, 1))


@pytest.mark.parametrize("changes,fragment", [
    (dict(num_heads=6, num_kv_heads=4), "multiple of model.num_kv_heads"),
    (dict(head_dim=7), "must be even"),
    (dict(group_sizes=(2, 1)), "sums to 3 layers but model.num_layers is 4"),
    (dict(group_sizes=(2, 2), kv_sharing=2), "set model.kv_sharing=1"),
    (dict(group_sizes=(2, 0, 2)), "positive sizes"),
    (dict(kv_sharing=0), "kv_sharing must be an integer from 1"),
    (dict(kv_sharing=5), "kv_sharing must be an integer from 1"),
    (dict(d_model=0), "model.d_model must be a positive integer"),
    (dict(num_layers=2.5), "model.num_layers must be a positive integer"),
    (dict(attention="flash"), "model.attention must be one of"),
    (dict(remat="some"), "model.remat must be one of"),
    (dict(dtype="fp8"), "model.dtype must be one of"),
    (dict(rope_base=0.5), "rope_base"),
])
def test_bad_configs_raise_one_clear_line(changes, fragment):
    with pytest.raises(ConfigError) as err:
        small(**changes)
    message = str(err.value)
    assert fragment in message and "\n" not in message


def test_from_dict_rejects_unknown_and_missing_fields():
    with pytest.raises(ConfigError, match="unknown field.*n_layers"):
        ModelConfig.from_dict({**small().to_dict(), "n_layers": 3})
    d = small().to_dict()
    del d["vocab_size"]
    with pytest.raises(ConfigError, match="missing required field.*vocab_size"):
        ModelConfig.from_dict(d)
    with pytest.raises(ConfigError, match="cannot parse '2y3'"):
        ModelConfig.from_dict({**small().to_dict(), "group_sizes": "1,2y3"})


def test_config_round_trips_through_dict():
    c = small(num_layers=6, group_sizes=(1, 2, 2, 1))
    assert ModelConfig.from_dict(c.to_dict()) == c


def _dot_flops(jaxpr) -> float:
    """FLOPs of every dot_general in a jaxpr, entering scans (x length) and nested jaxprs."""
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contract)
        for param in eqn.params.values():
            for sub in (param if isinstance(param, (list, tuple)) else [param]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    times = eqn.params["length"] if eqn.primitive.name == "scan" else 1
                    total += times * _dot_flops(inner)
    return total


@pytest.mark.parametrize("sharing, kv_heads, tie", [(1, 4, False), (2, 1, False), (3, 2, True)])
def test_train_flops_per_token_is_three_times_the_forward_matmuls(sharing, kv_heads, tie):
    model = ModelConfig(vocab_size=96, d_model=32, num_layers=6, num_heads=4, head_dim=16,
                        num_kv_heads=kv_heads, mlp_dim=48, kv_sharing=sharing,
                        tie_embeddings=tie, attention="xla")
    batch, seq = 2, 24
    tokens = jnp.zeros((batch, seq), jnp.int32)
    params = nn.meta.unbox(abstract_params(model))
    jaxpr = jax.make_jaxpr(lambda p: Transformer(model).apply({"params": p}, tokens, tokens))(
        params)
    forward_per_token = _dot_flops(jaxpr.jaxpr) / (batch * seq)
    assert cla_jax.train_flops_per_token(model, seq) == pytest.approx(3 * forward_per_token)
