"""The model config: a typed, validated, frozen view of an ml_collections ConfigDict.

The layer-group pattern is the CLA part. Layers are cut into consecutive groups; the first
layer of a group (the producer) projects K/V and every layer of the group attends with them.
A *stage* is a run of consecutive groups of one size; each stage becomes one `nn.scan`.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

from cla_jax.errors import UserError

ATTENTION_KINDS = ("auto", "xla", "blockwise", "cudnn", "pallas_gpu", "splash", "reference")
# model.remat -> the jax.checkpoint_policies policy a layer group saves its activations by in
# the backward pass (None: no remat). Named here once, as strings, so this module needs no jax.
REMAT_POLICIES = {"none": None, "full": "nothing_saveable", "dots": "checkpoint_dots",
                  "dots_no_batch": "checkpoint_dots_with_no_batch_dims"}
DTYPES = ("float32", "bfloat16", "float16")
# model.rope_scaling: how the RoPE frequencies are stretched for long contexts, as transformers'
# rope types of the same names (Llama 3.1/3.2 use llama3).
ROPE_SCALINGS = ("default", "linear", "llama3")


class ConfigError(UserError):
    """A config value is wrong; the message says which and how to fix it."""


def parse_group_sizes(pattern: Any) -> tuple[int, ...]:
    """'1,2x9,1' or (1, 2, ..., 1) -> tuple of ints. 'NxK' means K groups of size N."""
    if isinstance(pattern, str):
        sizes: list[int] = []
        for part in pattern.replace(" ", "").split(","):
            match = re.fullmatch(r"(\d+)(?:[x*](\d+))?", part)
            if not match:
                raise ConfigError(
                    f"model.group_sizes: cannot parse {part!r} in {pattern!r}; "
                    "write sizes like '1,2x9,1' (2x9 = nine groups of two layers)")
            sizes += [int(match[1])] * int(match[2] or 1)
        return tuple(sizes)
    try:
        return tuple(int(s) for s in pattern)
    except (TypeError, ValueError):
        raise ConfigError(
            f"model.group_sizes must be a list of ints or a string like '1,2x9,1', "
            f"got {pattern!r}") from None


def groups_for_sharing(num_layers: int, kv_sharing: int) -> tuple[int, ...]:
    """CLA-k over num_layers: groups of k, the last one shorter when k does not divide depth.

    This is the paper's uneven CLA3 over 20 layers: 6 groups of 3 and one of 2 (7 producers).
    """
    full, rest = divmod(num_layers, kv_sharing)
    return (kv_sharing,) * full + ((rest,) if rest else ())


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes the model's parameters and computation."""

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    kv_sharing: int = 1
    group_sizes: tuple[int, ...] | None = None
    rope_base: float = 10000.0
    rope_scaling: str = "default"
    rope_scaling_factor: float = 1.0          # linear and llama3
    rope_low_freq_factor: float = 1.0         # llama3 only, as the next two
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    norm_eps: float = 1e-5
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    init_std: float = 0.01275
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention: str = "auto"
    remat: str = "none"
    # Positions per chunk of the training and eval loss (cla_jax/model/loss.py): the float32
    # logits exist for [batch, loss_chunk_size, vocab] at a time. 0: whole [batch, T, vocab].
    loss_chunk_size: int = 128

    def __post_init__(self):
        _validate(self)

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "ModelConfig":
        """Builds from a ConfigDict (or dict); unknown keys are an error, not ignored."""
        cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - names)
        if unknown:
            raise ConfigError(
                f"model config has unknown field(s) {unknown}; valid fields: {sorted(names)}")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.default is dataclasses.MISSING and f.name not in cfg)
        if missing:
            raise ConfigError(f"model config is missing required field(s) {missing}")
        pattern = cfg.get("group_sizes")
        # "" (the ConfigDict default, so the flag stays a string) means: use kv_sharing.
        cfg["group_sizes"] = parse_group_sizes(pattern) if pattern not in (None, "") else None
        return cls(**cfg)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["group_sizes"] is not None:
            d["group_sizes"] = list(d["group_sizes"])
        return d

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @property
    def groups(self) -> tuple[int, ...]:
        """Size of every layer group, in order; one K/V producer per group."""
        if self.group_sizes is not None:
            return tuple(self.group_sizes)
        return groups_for_sharing(self.num_layers, self.kv_sharing)

    @property
    def stages(self) -> tuple[tuple[int, int], ...]:
        """(group_size, num_groups) for each run of consecutive equal-sized groups."""
        stages: list[list[int]] = []
        for size in self.groups:
            if stages and stages[-1][0] == size:
                stages[-1][1] += 1
            else:
                stages.append([size, 1])
        return tuple((size, count) for size, count in stages)

    @property
    def num_kv_layers(self) -> int:
        """Layers that produce (and cache) K/V: one per group."""
        return len(self.groups)


def _validate(c: ModelConfig) -> None:
    def fail(msg: str):
        raise ConfigError(msg)

    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "mlp_dim", "max_seq_len"):
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            fail(f"model.{name} must be a positive integer, got {value!r}")
    if c.num_heads % c.num_kv_heads:
        fail(f"model.num_heads ({c.num_heads}) must be a multiple of model.num_kv_heads "
             f"({c.num_kv_heads}): each K/V head serves an equal number of query heads")
    if c.head_dim % 2:
        fail(f"model.head_dim ({c.head_dim}) must be even: RoPE rotates pairs of dimensions")
    if c.group_sizes is not None:
        if c.kv_sharing != 1:
            fail(f"model.group_sizes ({list(c.group_sizes)}) and model.kv_sharing "
                 f"({c.kv_sharing}) both set the layer groups; set model.kv_sharing=1 to "
                 "use the explicit pattern")
        if not c.group_sizes or any(s <= 0 for s in c.group_sizes):
            fail(f"model.group_sizes must be positive sizes, got {list(c.group_sizes)}")
        if sum(c.group_sizes) != c.num_layers:
            fail(f"model.group_sizes {list(c.group_sizes)} sums to {sum(c.group_sizes)} "
                 f"layers but model.num_layers is {c.num_layers}")
    elif isinstance(c.kv_sharing, bool) or not isinstance(c.kv_sharing, int) \
            or not 1 <= c.kv_sharing <= c.num_layers:
        fail(f"model.kv_sharing must be an integer from 1 (no CLA) to num_layers "
             f"({c.num_layers}), got {c.kv_sharing!r}")
    if not c.rope_base > 1:
        fail(f"model.rope_base must be > 1, got {c.rope_base!r}")
    _validate_rope_scaling(c)
    if not 0 < c.norm_eps < 1:
        fail(f"model.norm_eps must be in (0, 1), got {c.norm_eps!r}")
    if not c.init_std > 0:
        fail(f"model.init_std must be > 0, got {c.init_std!r}")
    for name in ("dtype", "param_dtype"):
        if getattr(c, name) not in DTYPES:
            fail(f"model.{name} must be one of {DTYPES}, got {getattr(c, name)!r}")
    if c.attention not in ATTENTION_KINDS:
        fail(f"model.attention must be one of {ATTENTION_KINDS}, got {c.attention!r}")
    if c.remat not in REMAT_POLICIES:
        fail(f"model.remat must be one of {tuple(REMAT_POLICIES)}, got {c.remat!r}")
    if isinstance(c.loss_chunk_size, bool) or not isinstance(c.loss_chunk_size, int) \
            or c.loss_chunk_size < 0:
        fail(f"model.loss_chunk_size must be an integer >= 0 (positions per loss chunk; 0 = "
             f"unchunked), got {c.loss_chunk_size!r}")


def _validate_rope_scaling(c: ModelConfig) -> None:
    if c.rope_scaling not in ROPE_SCALINGS:
        raise ConfigError(f"model.rope_scaling must be one of {ROPE_SCALINGS}, got "
                          f"{c.rope_scaling!r}")
    applies_to = {"rope_scaling_factor": ("linear", "llama3"), "rope_low_freq_factor": ("llama3",),
                  "rope_high_freq_factor": ("llama3",), "rope_original_max_len": ("llama3",)}
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    for name, kinds in applies_to.items():
        if c.rope_scaling not in kinds and getattr(c, name) != defaults[name]:
            raise ConfigError(f"model.{name} is {getattr(c, name)!r}, but it only applies to "
                              f"model.rope_scaling {' or '.join(kinds)} (it is "
                              f"{c.rope_scaling!r}); leave it at {defaults[name]!r}")
    if c.rope_scaling == "default":
        return
    if not c.rope_scaling_factor >= 1:
        raise ConfigError(f"model.rope_scaling_factor must be >= 1 (how many times longer the "
                          f"context is stretched), got {c.rope_scaling_factor!r}")
    if c.rope_scaling == "llama3":
        if not 0 < c.rope_low_freq_factor < c.rope_high_freq_factor:
            raise ConfigError(
                "model.rope_low_freq_factor and model.rope_high_freq_factor must satisfy "
                f"0 < low < high, got {c.rope_low_freq_factor!r} and "
                f"{c.rope_high_freq_factor!r}")
        value = c.rope_original_max_len
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError("model.rope_original_max_len (the pretraining context length "
                              f"llama3 scaling starts from) must be a positive integer, got "
                              f"{value!r}")


def kv_bytes_per_token(config: ModelConfig, bytes_per_element: int = 2) -> int:
    """KV-cache bytes per token: K and V x kv_heads x head_dim x producing layers x bytes."""
    return 2 * config.num_kv_heads * config.head_dim * config.num_kv_layers * bytes_per_element


def train_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token, forward + backward (3 x forward), as MFU counts them (PaLM,
    appendix B): 6 per weight of every matmul (projections, SwiGLU, unembedding; not the
    embedding lookup or norms) plus attention's QK^T and PV, 6 x 2 x heads x head_dim x seq_len
    per layer, counted over the whole square (XLA's attention computes the masked half too)."""
    d, h = config.d_model, config.head_dim
    matmul_weights = (config.num_layers * (2 * d * config.num_heads * h + 3 * d * config.mlp_dim)
                      + config.num_kv_layers * 2 * d * config.num_kv_heads * h
                      + d * config.vocab_size)
    attention = config.num_layers * 2 * config.num_heads * h * seq_len
    return 6.0 * (matmul_weights + attention)


def num_params(config: ModelConfig) -> int:
    """Parameter count from the config alone (no arrays are built)."""
    d, h = config.d_model, config.head_dim
    per_layer = (2 * d                                    # attention and MLP norms
                 + 2 * d * config.num_heads * h            # query and output projections
                 + 3 * d * config.mlp_dim)                 # SwiGLU gate, up, down
    kv_projection = 2 * d * config.num_kv_heads * h
    shared_groups = sum(1 for size in config.groups if size > 1)
    embeddings = config.vocab_size * d * (1 if config.tie_embeddings else 2)
    return (config.num_layers * per_layer
            + config.num_kv_layers * kv_projection
            + shared_groups * d                            # the producer's separate K/V norm
            + d                                            # final norm
            + embeddings)
