"""The model config: a typed, validated, frozen view of an ml_collections ConfigDict.

The KV-sharing map is the CLA part, and its generalisation. Every layer has an attention
type, global or local (a sliding window of `local_window` tokens), and a K/V source: itself
(a *producer*, which projects and caches K/V) or an earlier producer of the same type, whose
K/V it attends with (a *consumer*, no K/V weights, no cache). Shorthands expand to the map:

    kv_sharing=k          CLA-k: each run of same-type layers cut into groups of k
    group_sizes="1,2x9,1" explicit consecutive groups (the first layer of each produces)
    layer_types="5:1"     five local layers, then one global, repeated (or letters "llg..")
    kv_sources="last:8"   the last 8 layers reuse the K/V of the last producer of their type
                          before them (Gemma 3n, YOCO); or one source index per layer

The map becomes a `plan` of stages, each one `nn.scan` over identical steps of consecutive
layers (`plan_stages`): compile time follows the pattern, not the depth.
"""
from __future__ import annotations

import dataclasses
import functools
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


def parse_layer_types(spec: str, num_layers: int) -> str:
    """model.layer_types -> one letter per layer, "g" (global) or "l" (local). "" = all
    global; "5:1" = five local then one global, repeated over the depth; or the letters."""
    spec = spec.replace(" ", "").replace(",", "").lower()
    if not spec:
        return "g" * num_layers
    ratio = re.fullmatch(r"(\d+):(\d+)", spec)
    if ratio:
        period = "l" * int(ratio[1]) + "g" * int(ratio[2])
        if not period:
            raise ConfigError(f"model.layer_types {spec!r}: the ratio needs a layer")
        return (period * num_layers)[:num_layers]
    if set(spec) - {"l", "g"} or len(spec) != num_layers:
        raise ConfigError(
            f"model.layer_types {spec!r}: write a local:global ratio such as '5:1', or one "
            f"letter per layer (l = local, g = global), {num_layers} letters")
    return spec


@dataclasses.dataclass(frozen=True)
class StepLayer:
    """One layer of a scan step. `source` is where its K/V come from: "self" (it produces
    them), "step" (the step's layer `ref` produces them) or "outer" (layer `ref`, a producer
    of an earlier stage, whose K/V that stage hands over: a scan-invariant input)."""
    window: int | None  # local: the last `window` positions; None: global
    source: str = "self"
    ref: int = 0
    shared: bool = False  # a producer whose K/V other layers use too: it gets a K/V norm


@dataclasses.dataclass(frozen=True)
class Stage:
    """`steps` repetitions of the same consecutive layers, one `nn.scan` (layers first ...
    first + steps x len(layers) - 1). `exports`: the step positions of producers whose K/V
    a later stage uses (the stage then has one step)."""
    first: int
    steps: int
    layers: tuple[StepLayer, ...]
    exports: tuple[int, ...] = ()

    @property
    def producers(self) -> tuple[int, ...]:
        """Step positions of the layers that produce (and cache) K/V, in order."""
        return tuple(i for i, layer in enumerate(self.layers) if layer.source == "self")

    @property
    def num_layers(self) -> int:
        return self.steps * len(self.layers)

    @property
    def outer_refs(self) -> tuple[int, ...]:
        """The earlier stages' producers (layer indices) whose K/V this stage's steps use."""
        return tuple(sorted({layer.ref for layer in self.layers if layer.source == "outer"}))


# A producer followed by more consumers than this, once, hands its K/V to a stage of its own
# consumers instead of unrolling them in its step (YOCO, "last N share"): compile time then
# stays flat in N.
MAX_UNROLLED_CONSUMERS = 3


def plan_stages(windows: tuple, sources: tuple) -> tuple[Stage, ...]:
    """Cuts the layers into stages of identical steps (each stage one nn.scan), greedily:
    from the first layer not yet placed, the step length whose repetitions cover the most
    layers (at least two steps; the shorter step on a tie), or else one step of a producer
    and the consumers right after it. A step is identical to the first when every layer has
    the same type, role and source relative to the step (or the same earlier-stage producer);
    a producer whose K/V layers outside its step use has a one-step stage of its own."""
    num_layers = len(sources)
    users = [[j for j in range(num_layers) if sources[j] == i] for i in range(num_layers)]

    def step_at(start: int, stage_first: int, length: int):
        """The StepLayers of layers start..start+length-1, or None if they cannot be a step
        of a stage beginning at stage_first."""
        layers = []
        for i in range(start, start + length):
            s = sources[i]
            if s == i:
                layers.append(StepLayer(windows[i], "self", 0, len(users[i]) > 1))
            elif s >= start:
                layers.append(StepLayer(windows[i], "step", s - start))
            elif s < stage_first:
                layers.append(StepLayer(windows[i], "outer", s))
            else:
                return None  # a producer in an earlier step of the same stage
        return tuple(layers)

    def leaves_step(start: int, length: int) -> bool:
        return any(u >= start + length for i in range(start, start + length)
                   if sources[i] == i for u in users[i])

    stages, first = [], 0
    while first < num_layers:
        best = None  # (layers covered, -step length, steps)
        for length in range(1, (num_layers - first) // 2 + 1):
            template = step_at(first, first, length)
            if template is None or leaves_step(first, length):
                continue
            steps = 1
            while first + (steps + 1) * length <= num_layers:
                start = first + steps * length
                if step_at(start, first, length) != template or leaves_step(start, length):
                    break
                steps += 1
            if steps >= 2 and (best is None or (steps * length, -length) > best[:2]):
                best = (steps * length, -length, steps)
        if best is None:  # one step: a producer and the consumers right after it
            length = 1
            while (first + length < num_layers and sources[first + length] == first):
                length += 1
            if length > 1 + MAX_UNROLLED_CONSUMERS:  # the producer alone: its consumers
                length = 1                           # then scan as one stage
            steps = 1
        else:
            length, steps = -best[1], best[2]
        layers = step_at(first, first, length)
        exports = tuple(i for i in range(length) if layers[i].source == "self"
                        and leaves_step(first + i, 1) and any(
                            u >= first + length for u in users[first + i]))
        stages.append(Stage(first, steps, layers, exports))
        first += steps * length
    return tuple(stages)


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
    layer_types: str = ""     # "" all global; "5:1" local:global, repeated; or "llg..."
    local_window: int = 0     # tokens a local layer sees (itself included); > 0 with locals
    kv_sources: str = ""      # "" from kv_sharing/group_sizes; "last:N"; or "0,0,2,2,..."
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

    @functools.cached_property
    def layer_windows(self) -> tuple[int | None, ...]:
        """Per layer: its local window, or None for a global layer."""
        return tuple(self.local_window if t == "l" else None
                     for t in parse_layer_types(self.layer_types, self.num_layers))

    @functools.cached_property
    def kv_source_of(self) -> tuple[int, ...]:
        """Per layer: the layer whose K/V it attends with (itself for a producer)."""
        return _kv_sources(self)

    @property
    def producers(self) -> tuple[int, ...]:
        """The layers that project and cache K/V, in order."""
        return tuple(i for i, s in enumerate(self.kv_source_of) if s == i)

    @property
    def groups(self) -> tuple[int, ...]:
        """For every producer, in order, how many layers use its K/V (itself included):
        the CLA group sizes when groups are consecutive."""
        sources = self.kv_source_of
        return tuple(sources.count(p) for p in self.producers)

    @functools.cached_property
    def plan(self) -> tuple[Stage, ...]:
        """The stages the model scans (`plan_stages`)."""
        return plan_stages(self.layer_windows, self.kv_source_of)

    @property
    def stages(self) -> tuple[tuple[int, int], ...]:
        """(layers per step, steps) of each stage; for consecutive groups, (group_size,
        num_groups) of each run of consecutive equal-sized groups."""
        return tuple((len(stage.layers), stage.steps) for stage in self.plan)

    @property
    def num_kv_layers(self) -> int:
        """Layers that produce (and cache) K/V."""
        return len(self.producers)

    @property
    def has_local_layers(self) -> bool:
        return any(w is not None for w in self.layer_windows)


def _kv_sources(c: ModelConfig) -> tuple[int, ...]:
    """Resolves kv_sources (or kv_sharing / group_sizes, and "last:N") to a source per layer."""
    windows, n = c.layer_windows, c.num_layers
    spec = c.kv_sources.replace(" ", "")
    last = 0
    if spec.startswith("last:"):
        if not re.fullmatch(r"last:\d+", spec) or not 0 < int(spec[5:]) < n:
            raise ConfigError(f"model.kv_sources {spec!r}: write 'last:N' with N in [1, "
                              f"{n - 1}] (the last N layers reuse an earlier producer's K/V)")
        last = int(spec[5:])
    elif spec:
        if c.kv_sharing != 1 or c.group_sizes is not None:
            raise ConfigError("model.kv_sources lists every layer's source, so it replaces "
                              "model.kv_sharing and model.group_sizes: set kv_sharing=1 and "
                              "group_sizes=''")
        try:
            sources = tuple(int(x) for x in spec.split(","))
        except ValueError:
            raise ConfigError(f"model.kv_sources {spec!r}: write 'last:N' or one layer index "
                              "per layer, e.g. '0,0,2,2'") from None
        if len(sources) != n:
            raise ConfigError(f"model.kv_sources lists {len(sources)} sources but "
                              f"model.num_layers is {n}")
        _check_sources(sources, windows)
        return sources
    head = n - last
    if c.group_sizes is not None:
        if sum(c.group_sizes) != head:
            tail = f" (the first {head}: the last {last} reuse K/V)" if last else ""
            raise ConfigError(f"model.group_sizes {list(c.group_sizes)} sums to "
                              f"{sum(c.group_sizes)} layers but the groups must cover "
                              f"{head}{tail}; model.num_layers is {n}")
        sizes = c.group_sizes
    else:  # CLA-k within each run of consecutive layers of one type
        sizes, start = [], 0
        for end in range(1, head + 1):
            if end == head or windows[end] != windows[start]:
                sizes += groups_for_sharing(end - start, min(c.kv_sharing, end - start))
                start = end
    sources, first = [], 0
    for size in sizes:
        sources += [first] * size
        first += size
    for i in range(head, n):
        earlier = [p for p in range(head) if sources[p] == p and windows[p] == windows[i]]
        if not earlier:
            raise ConfigError(f"model.kv_sources 'last:{last}': layer {i} "
                              f"({_type_name(windows[i])}) has no earlier "
                              f"{'global' if windows[i] is None else 'local'} producer to "
                              "reuse; make N smaller")
        sources.append(earlier[-1])
    _check_sources(tuple(sources), windows)
    return tuple(sources)


def _type_name(window) -> str:
    return "global" if window is None else f"local, window {window}"


def _check_sources(sources: tuple[int, ...], windows: tuple) -> None:
    for i, s in enumerate(sources):
        if not 0 <= s <= i:
            raise ConfigError(f"model KV map: layer {i} takes K/V from layer {s}, which is not "
                              f"an earlier layer; a source must be in [0, {i}]")
        if sources[s] != s:
            raise ConfigError(f"model KV map: layer {i} takes K/V from layer {s}, which itself "
                              f"reuses layer {sources[s]}'s; point layer {i} at layer "
                              f"{sources[s]}")
        if windows[s] != windows[i]:
            raise ConfigError(f"model KV map: layer {i} ({_type_name(windows[i])}) takes K/V "
                              f"from layer {s} ({_type_name(windows[s])}); a layer reuses "
                              "only a producer of its own attention type")


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
        if sum(c.group_sizes) != c.num_layers and not c.kv_sources.startswith("last:"):
            fail(f"model.group_sizes {list(c.group_sizes)} sums to {sum(c.group_sizes)} "
                 f"layers but model.num_layers is {c.num_layers}")
    elif isinstance(c.kv_sharing, bool) or not isinstance(c.kv_sharing, int) \
            or not 1 <= c.kv_sharing <= c.num_layers:
        fail(f"model.kv_sharing must be an integer from 1 (no CLA) to num_layers "
             f"({c.num_layers}), got {c.kv_sharing!r}")
    for name in ("layer_types", "kv_sources"):
        if not isinstance(getattr(c, name), str):
            fail(f"model.{name} must be a string, got {getattr(c, name)!r}")
    if isinstance(c.local_window, bool) or not isinstance(c.local_window, int) \
            or c.local_window < 0:
        fail(f"model.local_window must be an integer >= 0, got {c.local_window!r}")
    locals_ = "l" in parse_layer_types(c.layer_types, c.num_layers)
    if locals_ and not c.local_window:
        fail(f"model.layer_types {c.layer_types!r} has local layers: set model.local_window "
             "to the tokens each sees (e.g. 128)")
    if c.local_window and not locals_:
        fail(f"model.local_window is {c.local_window} but no layer is local; set "
             "model.layer_types (e.g. '5:1') or local_window=0")
    c.plan  # resolves and checks the KV map  # noqa: B018
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


def kv_bytes_per_token(config: ModelConfig, bytes_per_element: int = 2,
                       context: int | None = None) -> float:
    """KV-cache bytes per token of a `context`-token sequence (default model.max_seq_len):
    K and V x kv_heads x head_dim x bytes for each global producer, and for each local one
    the same x ring / context, its ring of min(local_window, max_seq_len) slots being all it
    keeps (allocated whole, so a context shorter than the ring still pays for the ring).
    An int when every producer is global."""
    per_layer = 2 * config.num_kv_heads * config.head_dim * bytes_per_element
    windows = [config.layer_windows[p] for p in config.producers]
    if all(w is None for w in windows):
        return per_layer * len(windows)
    context = context or config.max_seq_len
    ring = min(config.local_window, config.max_seq_len)
    return per_layer * sum(1 if w is None else ring / context for w in windows)


def train_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token, forward + backward (3 x forward), as MFU counts them (PaLM,
    appendix B): 6 per weight of every matmul (projections, SwiGLU, unembedding; not the
    embedding lookup or norms) plus attention's QK^T and PV, 6 x 2 x heads x head_dim x seq_len
    per layer, counted over the whole square (XLA's attention computes the masked half too);
    a local layer's over its window (the flash kernels skip the blocks outside it)."""
    d, h = config.d_model, config.head_dim
    matmul_weights = (config.num_layers * (2 * d * config.num_heads * h + 3 * d * config.mlp_dim)
                      + config.num_kv_layers * 2 * d * config.num_kv_heads * h
                      + d * config.vocab_size)
    seen = [seq_len if w is None else min(w, seq_len) for w in config.layer_windows]
    attention = sum(seen) * 2 * config.num_heads * h
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
