"""What a compiled program does, read from its optimized HLO text (`compiled.as_text()`).

XLA's compiled programs are the facts this module reads; nothing here runs them:

- `kernels`: the custom-call targets (Pallas/Mosaic `tpu_custom_call`, Triton
  `__gpu$xla.gpu.triton`, cuDNN `__cudnn$fmha...`, cuBLAS GEMMs).
- `collectives`: every all-gather, reduce-scatter, all-reduce, all-to-all and
  collective-permute, with its dtype, shapes, bytes, group size, whether its group spans
  slices (the data-centre network) and how many times a step runs it: a collective inside a
  while loop's body runs once per trip (XLA's `known_trip_count`). On TPU a reduce-scatter
  is an all-reduce inside a computation named `all-reduce-scatter...` that keeps one slice of
  the sum: it is reported as the reduce-scatter it is.
- `buffers`: the result shape of every instruction outside fusions (fused instructions live in
  registers or on-chip memory, not in HBM), for shape checks such as "no [T, S] scores".

Bytes communicated per device use the ring algorithms' counts: an all-gather or all-to-all
receives (n-1)/n of its result, a reduce-scatter sends (n-1)/n of its input, an all-reduce
twice that, a collective-permute its whole result.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict

import numpy as np

DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
               "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
               "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+)$")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\]")
_CALLED = re.compile(r"\b(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_CALLED_LIST = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
# Where an in-place update's new values are among its operands (the rest: target, indices).
_UPDATES = {"dynamic-update-slice": slice(1, 2), "scatter": slice(2, None)}
_TRIP_COUNT = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')


@dataclasses.dataclass(frozen=True)
class Array:
    """One array of an HLO shape: its dtype and dimensions."""
    dtype: str
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def bytes(self) -> int:
        return self.size * DTYPE_BYTES.get(self.dtype, 4)

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(map(str, self.shape))}]"


@dataclasses.dataclass
class Instruction:
    """One instruction of an HLO computation, as parsed from the compiled program's text."""
    name: str
    opcode: str
    results: list[Array]      # the result's arrays (several for a tuple)
    operands: list[str]       # operand instruction names
    text: str                 # the attributes after the operands
    computation: str


@dataclasses.dataclass
class Collective:
    """One collective of a compiled program (all-reduce, all-gather, ...): what each device
    sends and receives, and over how many devices."""
    kind: str                 # one of COLLECTIVES
    dtype: str
    inputs: list[Array]       # per device, before
    outputs: list[Array]      # per device, after
    group_size: int
    crosses_slices: bool      # its group holds devices of more than one slice or node
    runs_per_step: int        # 1, or the product of the trip counts of the loops around it
    in_loop: bool
    computation: str
    source: str               # the jax op it came from (HLO metadata op_name), if given

    @property
    def input_bytes(self) -> int:
        return sum(a.bytes for a in self.inputs)

    @property
    def output_bytes(self) -> int:
        return sum(a.bytes for a in self.outputs)

    @property
    def bytes_per_run(self) -> float:
        """Bytes one device sends or receives per run (ring algorithms)."""
        n = self.group_size
        share = (n - 1) / n if n > 1 else 0.0
        if self.kind == "all-gather" or self.kind == "all-to-all":
            return self.output_bytes * share
        if self.kind == "reduce-scatter":
            return self.input_bytes * share
        if self.kind == "all-reduce":
            return 2 * self.input_bytes * share
        return float(self.output_bytes)  # collective-permute

    @property
    def bytes_per_step(self) -> float:
        return self.bytes_per_run * self.runs_per_step

    def to_dict(self) -> dict:
        return dict(kind=self.kind, dtype=self.dtype,
                    inputs=[str(a) for a in self.inputs], outputs=[str(a) for a in self.outputs],
                    group_size=self.group_size, crosses_slices=self.crosses_slices,
                    in_loop=self.in_loop, runs_per_step=self.runs_per_step,
                    bytes_per_run=self.bytes_per_run, bytes_per_step=self.bytes_per_step,
                    source=self.source)


def _split_top_level(text: str, sep: str = ",") -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _parse_instruction(rhs: str) -> tuple[str, str, list[str], str] | None:
    """'TYPE opcode(operands), attrs' -> (type text, opcode, operand names, attrs)."""
    depth = 0
    for i, ch in enumerate(rhs):  # the type ends at the first space outside brackets
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == " " and depth == 0:
            type_text, rest = rhs[:i], rhs[i + 1:]
            break
    else:
        return None
    match = re.match(r"([\w\-$]+)\(", rest)
    if not match:
        return None
    depth, end = 0, None
    for i in range(match.end() - 1, len(rest)):
        if rest[i] == "(":
            depth += 1
        elif rest[i] == ")":
            depth -= 1
            if depth == 0:
                end = i
                break
    operands_text = rest[match.end():end]
    operands = [re.sub(r"^.*%", "", p.strip()) for p in _split_top_level(operands_text)
                if p.strip()]
    return type_text, match[1], operands, rest[end + 1:] if end is not None else ""


def arrays(type_text: str) -> list[Array]:
    """Every array in a (possibly nested tuple) HLO type, in order; layouts ignored."""
    return [Array(dtype, tuple(int(d) for d in dims.split(",") if d))
            for dtype, dims in _ARRAY.findall(re.sub(r"\{[^{}]*\}", "", type_text))]


class Program:
    """An optimized HLO module, parsed: computations, instructions, calls between them."""

    def __init__(self, hlo_text: str):
        self.computations: dict[str, list[Instruction]] = {}
        self.entry = None
        current = None
        for line in hlo_text.splitlines():
            if not line[:1].isspace() and line.rstrip().endswith("{") and "->" in line:
                header = _COMPUTATION.match(line)
                current = header[2]
                self.computations[current] = []
                if header[1]:
                    self.entry = current
                continue
            if line.strip() == "}":
                current = None
                continue
            match = _INSTRUCTION.match(line)
            if current is None or not match:
                continue
            parsed = _parse_instruction(match[3])
            if parsed is None:
                continue
            type_text, opcode, operands, attrs = parsed
            self.computations[current].append(Instruction(
                match[2], opcode, arrays(type_text), operands, attrs, current))
        self.by_name = {i.name: i for insts in self.computations.values() for i in insts}
        self._runs = self._runs_per_step()

    def _calls(self, inst: Instruction) -> list[tuple[str, int]]:
        """(computation, runs per run of `inst`) for each computation `inst` calls."""
        names = _CALLED.findall(inst.text)
        for group in _CALLED_LIST.findall(inst.text):
            names += [n.strip().lstrip("%") for n in group.split(",") if n.strip()]
        trips = self._trip_count(inst) if inst.opcode == "while" else 1
        return [(n, trips if inst.opcode == "while" else 1) for n in names
                if n in self.computations]

    def _trip_count(self, loop: Instruction) -> int:
        """XLA's known_trip_count; else a scan's condition `i < N` (a counter from 0) gives N;
        else 1 (unknown: counted once)."""
        match = _TRIP_COUNT.search(loop.text)
        if match:
            return int(match[1])
        condition = re.search(r"\bcondition=%?([\w.\-]+)", loop.text)
        body = self.computations.get(condition[1], []) if condition else []
        constants = [int(i.operands[0]) for i in body if i.opcode == "constant" and i.operands
                     and i.operands[0].lstrip("-").isdigit()]
        compares = [i for i in body if i.opcode == "compare" and "direction=LT" in i.text]
        return constants[0] if len(constants) == 1 and len(compares) == 1 else 1

    def _runs_per_step(self) -> dict[str, tuple[int, bool]]:
        """computation -> (runs per program run, whether it is inside a loop)."""
        runs: dict[str, int] = defaultdict(int)
        looped: dict[str, bool] = defaultdict(bool)
        order, seen = [], set()

        def visit(name):  # callees after callers: a reverse post-order
            seen.add(name)
            for inst in self.computations[name]:
                for callee, _ in self._calls(inst):
                    if callee not in seen:
                        visit(callee)
            order.append(name)

        if self.entry is None:
            return {}
        visit(self.entry)
        runs[self.entry] = 1
        body_trips: dict[str, int] = {}  # a while body -> its loop's trips
        for name in reversed(order):
            for inst in self.computations[name]:
                for callee, trips in self._calls(inst):
                    if inst.opcode == "while":
                        body_trips[callee] = trips
                    share = runs[name] * trips
                    if callee.startswith("async_collective_fusion") and name in body_trips:
                        # TPU: a collective fused into a loop body (e.g. the next layer's
                        # weight gather inside a windowed einsum's loop) is one collective
                        # spread over the loop's trips, not one per trip.
                        share = max(1, runs[name] // body_trips[name])
                    runs[callee] += share
                    looped[callee] |= looped[name] or inst.opcode == "while"
        return {name: (runs[name], looped[name]) for name in order}

    def fused_computations(self) -> set[str]:
        return {callee for insts in self.computations.values() for inst in insts
                if inst.opcode == "fusion" for callee, _ in self._calls(inst)}

    def instructions(self, fused: bool = True):
        skip = set() if fused else self.fused_computations()
        for name, insts in self.computations.items():
            if name not in skip:
                yield from insts

    def kernels(self) -> list[str]:
        """Sorted custom-call targets (each once)."""
        targets = set()
        for inst in self.instructions():
            if inst.opcode == "custom-call":
                match = re.search(r'custom_call_target="([^"]+)"', inst.text)
                if match:
                    targets.add(match[1])
        return sorted(targets)

    def buffers(self) -> list[tuple[Array, Instruction]]:
        """(array, instruction) for every array an unfused instruction produces."""
        return [(a, inst) for inst in self.instructions(fused=False)
                if inst.opcode not in ("parameter", "get-tuple-element", "tuple", "bitcast")
                for a in inst.results]

    def hbm_traffic(self) -> float:
        """Bytes one device moves to and from HBM per run, estimated from the program: every
        unfused operation (a fusion, a library call, a copy, a collective) reads its operands
        and writes its results once, as many times as its computation runs, except where an
        operation touches only part of a buffer: a dynamic slice reads only the slice, an
        in-place dynamic update or scatter reads and writes only the update. Control flow
        and views (while, call, tuple, get-tuple-element, bitcast, parameter, constant) move
        nothing themselves. On-chip caches can only lower the real figure."""
        views = ("parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while",
                 "call", "conditional", "after-all", "partition-id", "replica-id")
        total = 0.0
        for inst in self.instructions(fused=False):
            if inst.opcode in views or inst.opcode.endswith("-done"):
                continue
            runs, _ = self._runs.get(inst.computation, (1, False))
            callee = next((c for c, _ in self._calls(inst)), "")
            if inst.opcode == "fusion" and callee.startswith("async_collective_fusion"):
                runs = self._runs.get(callee, (runs, False))[0]  # see _runs_per_step
            total += self._bytes_moved(inst) * runs
        return total

    def _bytes_moved(self, inst: Instruction) -> float:
        operands = [sum(a.bytes for a in self._result_of(o)) for o in inst.operands]
        results = sum(a.bytes for a in inst.results)
        if inst.opcode.endswith("-start"):  # ((operands), results, context): operands once
            inputs = [a for o in inst.operands for a in self._result_of(o)]
            if inst.results[:len(inputs)] == inputs:
                results = sum(a.bytes for a in inst.results[len(inputs):] if a.shape)
        if inst.opcode == "dynamic-slice":
            return 2 * results
        if inst.opcode in ("dynamic-update-slice", "scatter"):
            return 2 * sum(operands[_UPDATES[inst.opcode]]) + sum(operands[1:]) - sum(
                operands[_UPDATES[inst.opcode]])
        if inst.opcode != "fusion":
            return results + sum(operands)
        fused = next((callee for callee, _ in self._calls(inst)), None)
        body = self.computations.get(fused, [])
        params = {i.name: int(i.operands[0]) for i in body if i.opcode == "parameter"
                  and i.operands and i.operands[0].isdigit()}
        users = defaultdict(list)
        for i in body:
            for position, name in enumerate(i.operands):
                users[name].append((i, position))
        read = list(operands)
        for name, index in params.items():  # parameters read only through dynamic slices
            uses = users.get(name, [])
            if index < len(read) and uses and all(
                    u.opcode == "dynamic-slice" and pos == 0 for u, pos in uses):
                read[index] = sum(a.bytes for u, _ in uses for a in u.results)
        written = 0.0
        for element in self._root_elements(body, inst):
            target = self._in_place_target(element, params)
            if target is None:
                written += sum(a.bytes for a in element.results)
                continue
            # Updated in place (a dynamic update or scatter of a parameter): only the update
            # is written, and the rest of that parameter is not read.
            written += sum(a.bytes for name in element.operands[_UPDATES[element.opcode]]
                           for a in self._result_of(name))
            if target < len(read):
                read[target] = 0
        return written + sum(read)

    def _root_elements(self, body: list[Instruction], fusion: Instruction):
        """The instructions a fusion's root is made of: the root, or each element of a root
        tuple, seen through bitcasts."""
        if not body:
            return []
        local = {i.name: i for i in body}
        root, elements = body[-1], []
        for name in (root.operands if root.opcode == "tuple" else [root.name]):
            element = local.get(name)
            while element is not None and element.opcode in ("bitcast", "copy") and \
                    element.operands and element.operands[0] in local:
                element = local[element.operands[0]]
            if element is not None:
                elements.append(element)
        return elements

    @staticmethod
    def _in_place_target(element: Instruction, params: dict[str, int]) -> int | None:
        if element.opcode in _UPDATES and element.operands and element.operands[0] in params:
            return params[element.operands[0]]
        return None

    def collectives(self, slice_of_device: list[int] | None = None) -> list[Collective]:
        """Every collective of the program. slice_of_device[i]: the slice (or node) of the
        device with logical id i (the compiled program's device order); without it no group
        counts as crossing slices."""
        found = []
        for inst in self.instructions():
            kind = inst.opcode.removesuffix("-start")
            if kind not in COLLECTIVES or inst.opcode.endswith("-done"):
                continue
            runs, looped = self._runs.get(inst.computation, (1, False))
            groups = replica_groups(inst.text)
            inputs = [self._result_of(o) for o in inst.operands]
            inputs = [a for group in inputs for a in group]
            outputs = inst.results
            if inst.opcode.endswith("-start"):  # ((inputs), outputs[, context]) or outputs
                outputs = _async_outputs(inst, inputs)
            if kind == "all-reduce" and inst.computation.startswith("all-reduce-scatter"):
                kind = "reduce-scatter"  # TPU: summed, then each device keeps its slice
                outputs = self.computations[inst.computation][-1].results
            group_size = len(groups[0]) if groups else 1
            crosses = bool(slice_of_device) and any(
                len({slice_of_device[d] for d in g if d < len(slice_of_device)}) > 1
                for g in groups)
            source = re.search(r'op_name="([^"]+)"', inst.text)
            found.append(Collective(
                kind, (outputs or inputs)[0].dtype if (outputs or inputs) else "?", inputs,
                outputs, group_size, crosses, runs, looped, inst.computation,
                source[1] if source else ""))
        return found

    def _result_of(self, name: str) -> list[Array]:
        inst = self.by_name.get(name)
        return inst.results if inst else []


def _async_outputs(inst: Instruction, inputs: list[Array]) -> list[Array]:
    """An async collective's result is ((inputs...), outputs...[, u32 context]) or, for
    all-reduce-start, just its outputs: the arrays after the inputs, without u32 scalars."""
    results = [a for a in inst.results if a.shape or a.dtype not in ("u32", "s32")]
    if len(results) > len(inputs) and results[:len(inputs)] == inputs:
        return results[len(inputs):]
    return results


def _device_ids(text: str | None, count: int) -> np.ndarray:
    """A mesh's device order: none given (0..n-1), an iota [dims] optionally transposed
    T(perm), or a list of ids."""
    if not text:
        return np.arange(count)
    iota = re.fullmatch(r"\[([\d,]+)\](?:T\(([\d,]+)\))?", text.strip())
    if iota:
        ids = np.arange(count).reshape([int(x) for x in iota[1].split(",")])
        if iota[2]:
            ids = ids.transpose([int(x) for x in iota[2].split(",")])
        return ids.reshape(-1)
    return np.array([int(x) for x in text.replace(" ", "").split(",") if x])


def replica_groups(text: str) -> list[list[int]]:
    """The device groups of a collective, in any of HLO's three notations: explicit
    {{0,1},{2,3}}, iota [2,2]<=[4] (optionally transposed, T(1,0)), and mesh
    mesh['a'=2,'b'=2] {'b'} (groups along the listed axes; `device_ids=(...)` after the
    axes reorders the devices); source_target_pairs for a
    collective-permute give one group per pair."""
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(((?:\[[\d,]+\]"
                     r"(?:T\([\d,]+\))?)|[\d,\s]+)\))?\s*\{([^}]*)\}", text)
    if mesh:
        axes = re.findall(r"'([^']+)'=(\d+)", mesh[1])
        names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
        chosen = [names.index(a) for a in re.findall(r"'([^']+)'", mesh[3])]
        ids = _device_ids(mesh[2], math.prod(sizes)).reshape(sizes)
        rest = [i for i in range(len(sizes)) if i not in chosen]
        group = math.prod(sizes[i] for i in chosen)
        return ids.transpose(rest + chosen).reshape(-1, group).tolist()
    iota = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
    if iota:
        shape = [int(x) for x in iota[1].split(",")]
        dims = [int(x) for x in iota[2].split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if iota[3]:
            ids = ids.transpose([int(x) for x in iota[3].split(",")])
        return ids.reshape(shape).tolist()
    explicit = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", text)
    if explicit:
        return [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}",
                                                                       explicit[1])]
    pairs = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", text)
    if pairs:
        return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", pairs[1])]
    return []
