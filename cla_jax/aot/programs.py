"""The project's programs as (jitted function, abstract arguments) on a mesh of any devices:
compile-only TPU or GPU devices as readily as this host's. Nothing is allocated: params,
optimizer state, batches and caches are ShapeDtypeStructs carrying their shardings, and each
jitted function is the very one training, evaluation, `decoding.generate` and the serving
engine run.

    program = PROGRAMS["train"](setup)          # -> Program(fn, args, ...)
    compiled = program.fn.lower(*program.args).compile()
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from cla_jax import sharding
from cla_jax.config import ModelConfig, kv_bytes_per_token, train_flops_per_token
from cla_jax.model import abstract_params

BATCH_FIELDS = ("inputs", "targets", "positions", "segment_ids", "weights")


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every program is built from. Batches count rows per batch shard of the mesh
    (data x fsdp, over all slices): a program's global batch is that times the shards."""
    model: ModelConfig
    train: object          # the config's `train` block (optimizer settings, grad accumulation)
    mesh: Mesh
    seq_len: int           # training / evaluation sequence length
    batch_per_shard: int   # train and eval rows per batch shard
    decode_batch_per_shard: int   # generate's prompts / the engine's slots per batch shard
    prompt_len: int        # generate's prompt and the engine's prefill bucket
    max_new_tokens: int    # generate's new tokens
    cache_dtype: str       # "bfloat16", "float32", "float16" or "int8"
    serve_param_dtype: str  # the params' dtype as served (training keeps model.param_dtype)
    steps_per_call: int = 4  # the engine's decode steps per call

    @property
    def batch_shards(self) -> int:
        return sharding.num_batch_shards(self.mesh)

    @property
    def serve_model(self) -> ModelConfig:
        return self.model.replace(param_dtype=self.serve_param_dtype)


@dataclasses.dataclass
class Program:
    """A jitted program to compile for a target, with its abstract arguments and the work one
    step does (model FLOPs and tokens), for the roofline."""
    name: str
    fn: Callable               # a jitted function
    args: tuple                # abstract arguments, shardings included
    model_flops: float         # per step, all devices, by the project's formula
    tokens: int                # tokens a run processes (trained, scored or generated)
    shape_check: dict          # see `_shape_check`
    cache_bytes: int = 0       # per device, for the in-place check of decode programs


def make_setup(config, target, devices, *, mesh_spec: dict | None = None,
               batch_per_shard: int | None = None, seq_len: int | None = None,
               decode_batch_per_shard: int = 8, prompt_len: int | None = None,
               max_new_tokens: int | None = None, cache_dtype: str = "bfloat16",
               serve_param_dtype: str = "bfloat16") -> Setup:
    """A run config (its `model`, `train` and `mesh` blocks) on a target's devices. The mesh
    is `mesh_spec`, else the config's; a target of several slices or nodes puts data
    parallelism across them (dcn_data) unless the mesh already spans them. The train batch
    defaults to train.batch_size over the batch shards; prompts and new tokens to half of
    model.max_seq_len each."""
    from cla_jax.config import ConfigError

    model = ModelConfig.from_dict(config.model)
    spec = dict(mesh_spec or config.get("mesh") or {"fsdp": -1})
    if target.slices > 1 and not any(int(spec.get(a, 1)) > 1 for a in sharding.DCN_AXES):
        spec["dcn_data"] = target.slices
    mesh = sharding.make_mesh(spec, devices)
    train = config.train
    batch = batch_per_shard or max(1, train.batch_size // sharding.num_batch_shards(mesh))
    if batch % train.grad_accum_steps:
        raise ConfigError(f"the batch per device ({batch}) is not a multiple of "
                          f"train.grad_accum_steps ({train.grad_accum_steps})")
    return Setup(model=model, train=train, mesh=mesh, seq_len=seq_len or train.seq_len,
                 batch_per_shard=batch, decode_batch_per_shard=decode_batch_per_shard,
                 prompt_len=prompt_len or model.max_seq_len // 2,
                 max_new_tokens=max_new_tokens or model.max_seq_len // 2,
                 cache_dtype=cache_dtype, serve_param_dtype=serve_param_dtype)


def _abstract(tree, shardings):
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _params(model: ModelConfig, mesh: Mesh):
    boxed = abstract_params(model)
    return _abstract(nn.meta.unbox(boxed), sharding.param_shardings(boxed, mesh))


def _batch(setup: Setup) -> dict:
    rows = setup.batch_per_shard * setup.batch_shards
    where = sharding.batch_sharding(setup.mesh)
    return {name: jax.ShapeDtypeStruct((rows, setup.seq_len),
                                       jnp.float32 if name == "weights" else jnp.int32,
                                       sharding=where) for name in BATCH_FIELDS}


def _shape_check(setup: Setup, t: int, s: int, rows: int) -> dict:
    """What a buffer of attention scores ([.., T, S]) or of every token's logits
    ([.., T, vocab]) would look like on one device of this program."""
    model, tensor = setup.model, setup.mesh.shape["tensor"]
    # Weights, their gradients and stacks of them are not scores, whatever their dims.
    weights = {int(np.prod(a.shape[k:])) for a in jax.tree_util.tree_leaves(
        nn.meta.unbox(abstract_params(model))) for k in (0, 1)}
    return dict(weight_sizes=sorted(weights),T=t, S=s, rows_per_device=max(1, rows // setup.batch_shards),
                vocab=model.vocab_size, vocab_local=model.vocab_size // tensor
                if model.vocab_size % tensor == 0 else model.vocab_size,
                d_model=model.d_model, query_groups=model.num_heads // model.num_kv_heads,
                num_layers=model.num_layers)


def train(setup: Setup) -> Program:
    """The training step (`train.step.make_train_step`) of `setup`, over abstract state and
    batch."""
    from cla_jax.train.optimizer import make_optimizer
    from cla_jax.train.state import abstract_state
    from cla_jax.train.step import make_train_step

    optimizer = make_optimizer(setup.train)
    batch = _batch(setup)
    rows = batch["inputs"].shape[0]
    step = make_train_step(setup.model, optimizer, setup.train.grad_accum_steps, setup.mesh)
    tokens = rows * setup.seq_len
    return Program("train", step, (abstract_state(setup.model, optimizer, setup.mesh), batch),
                   train_flops_per_token(setup.model, setup.seq_len) * tokens, tokens,
                   _shape_check(setup, setup.seq_len, setup.seq_len,
                                rows // setup.train.grad_accum_steps))


def evaluate(setup: Setup) -> Program:
    """The evaluation step (`evaluation.make_eval_step`) of `setup`, over abstract params and
    batch."""
    from cla_jax.evaluation import make_eval_step

    step = make_eval_step(setup.model, np.ones(setup.model.vocab_size, np.int32), setup.mesh)
    batch = _batch(setup)
    rows = batch["inputs"].shape[0]
    tokens = rows * setup.seq_len
    return Program("eval", step, (_params(setup.model, setup.mesh), batch),
                   train_flops_per_token(setup.model, setup.seq_len) / 3 * tokens, tokens,
                   _shape_check(setup, setup.seq_len, setup.seq_len, rows))


def _decode_flops(model: ModelConfig, tokens: int, context: int) -> float:
    """Forward FLOPs of `tokens` tokens attending over `context` positions each."""
    return train_flops_per_token(model, context) / 3 * tokens


def generate(setup: Setup) -> Program:
    """`decoding.generate`'s one program: the batched prefill, then the decode loop."""
    from cla_jax import decoding
    from cla_jax.sampling import Sampling

    model = setup.serve_model
    rows = setup.decode_batch_per_shard * setup.batch_shards
    replicated = sharding.replicated(setup.mesh)
    key_words = jax.random.key_data(jax.random.key(0)).shape
    args = (_params(model, setup.mesh),
            jax.ShapeDtypeStruct((rows, setup.prompt_len), jnp.int32, sharding=replicated),
            jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=replicated),
            jax.ShapeDtypeStruct(key_words, jnp.uint32, sharding=replicated))
    fn = jax.jit(lambda *a: decoding._generate(model, setup.max_new_tokens, Sampling(), (),
                                               setup.cache_dtype, setup.mesh, *a))
    context = setup.prompt_len + setup.max_new_tokens
    flops = (_decode_flops(model, rows * setup.prompt_len, setup.prompt_len)
             + _decode_flops(model, rows * setup.max_new_tokens, context))
    return Program("generate", fn, args, flops, rows * setup.max_new_tokens,
                   _shape_check(setup, setup.prompt_len, context, rows),
                   cache_bytes=_cache_bytes(model, rows, context, setup))


def _cache_bytes(model: ModelConfig, rows: int, length: int, setup: Setup,
                 rings: bool = True) -> int:
    """The KV cache's bytes per device (its batch split over the batch shards, its KV heads
    over tensor when they divide). rings: local layers keep a ring of their window (the slot
    cache), else every position (a block pool)."""
    per_element = 1 if setup.cache_dtype == "int8" else jnp.dtype(setup.cache_dtype).itemsize
    per_token = (kv_bytes_per_token(model, per_element, length) if rings else
                 2 * model.num_kv_heads * model.head_dim * per_element * model.num_kv_layers)
    total = round(per_token * rows * length)
    tensor = setup.mesh.shape["tensor"]
    heads_split = tensor if model.num_kv_heads % tensor == 0 else 1
    shards = setup.batch_shards if rows % setup.batch_shards == 0 else 1
    return total // (shards * heads_split)


def _engine(setup: Setup):
    from cla_jax.serving.engine import Engine

    model = setup.serve_model
    slots = setup.decode_batch_per_shard * setup.batch_shards
    max_length = min(model.max_seq_len, setup.prompt_len + setup.max_new_tokens)
    return Engine(model, _params(model, setup.mesh), slots, max_length, setup.cache_dtype,
                  setup.mesh)


def prefill(setup: Setup) -> Program:
    """The serving engine's prefill: one prompt (its bucket of `prompt_len` tokens) into a
    fresh cache, and its first token."""
    from cla_jax.serving.engine import SlotSettings

    engine = _engine(setup)
    replicated = sharding.replicated(setup.mesh)
    key_words = jax.random.key_data(jax.random.key(0)).shape

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)

    settings = SlotSettings(spec((1,), jnp.float32), spec((1,), jnp.int32),
                            spec((1,), jnp.float32), spec((1, *key_words), jnp.uint32))
    args = (engine.params, spec((1, setup.prompt_len), jnp.int32), spec((), jnp.int32), settings)
    return Program("prefill", engine._prefill, args,
                   _decode_flops(engine.config, setup.prompt_len, setup.prompt_len),
                   setup.prompt_len,
                   _shape_check(setup, setup.prompt_len, setup.prompt_len, setup.batch_shards))


def serve_step(setup: Setup) -> Program:
    """The serving engine's decode step over its whole slot pool, `steps_per_call` tokens per
    slot per call, attending over the whole cache (its largest window)."""
    engine = _engine(setup)
    shapes = jax.eval_shape(engine._init_body)
    state = _abstract(shapes, engine._state_shardings)
    active = jax.ShapeDtypeStruct((engine.num_slots,), jnp.bool_,
                                  sharding=sharding.replicated(setup.mesh))
    window, steps = engine.max_length, setup.steps_per_call
    tokens = engine.num_slots * steps
    return Program("serve_step", _Bound(engine._step, window, steps),
                   (engine.params, state, active),
                   _decode_flops(engine.config, tokens, engine.max_length), tokens,
                   _shape_check(setup, 1, engine.max_length, engine.num_slots),
                   cache_bytes=_cache_bytes(engine.config, engine.num_slots, engine.max_length,
                                            setup))


PAGED_BLOCK_SIZE = 16


def _paged_engine(setup: Setup):
    """The paged engine with the slot engine's memory: the slots' max_length positions as
    blocks (+ the null block), up to that many sequences."""
    from cla_jax.serving.paged_engine import PagedEngine

    model = setup.serve_model
    rows = setup.decode_batch_per_shard * setup.batch_shards
    max_length = min(model.max_seq_len, setup.prompt_len + setup.max_new_tokens)
    num_blocks = rows * -(-max_length // PAGED_BLOCK_SIZE) + 1
    return PagedEngine(model, _params(model, setup.mesh), num_blocks, PAGED_BLOCK_SIZE,
                       max_length, max_seqs=rows, cache_dtype=setup.cache_dtype,
                       mesh=setup.mesh, chunk_tokens=setup.prompt_len, prefill_rows=(1,))


def paged_step(setup: Setup) -> Program:
    """The paged engine's step at its largest shapes: every sequence decoding
    `steps_per_call` tokens and one `prompt_len` prompt chunk in the same forward, all
    attending over the whole window, through a pool of the slot engine's memory."""
    engine = _paged_engine(setup)
    pool = _abstract(jax.eval_shape(engine._pool_body), engine._pool_shardings)
    rows, window = engine.max_seqs, engine.window_buckets[-1]
    replicated = sharding.replicated(setup.mesh)
    inputs = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
        engine.empty_inputs(rows, (1, setup.prompt_len), window))
    steps = setup.steps_per_call
    flops = (_decode_flops(engine.config, rows * steps, window)
             + _decode_flops(engine.config, setup.prompt_len, window))
    positions = (engine.num_blocks - 1) * engine.block_size
    return Program("paged_step", _Bound(engine._step, steps), (engine.params, pool, inputs),
                   flops, rows * steps,
                   _shape_check(setup, setup.prompt_len, window, rows),
                   cache_bytes=_cache_bytes(engine.config, 1, positions, setup, rings=False))


class _Bound:
    """A jitted function with trailing static arguments bound: `.lower(*args)` lowers
    fn(*args, *static)."""

    def __init__(self, fn, *static):
        self.fn, self.static = fn, static

    def lower(self, *args):
        return self.fn.lower(*args, *self.static)


PROGRAMS = {"train": train, "eval": evaluate, "prefill": prefill, "generate": generate,
            "serve_step": serve_step, "paged_step": paged_step}
