"""What a compiled program runs per step, read from its optimized HLO text.

Pure text (no JAX): `hlo_stats(compiled.as_text())` gives the collectives (kind, how many times
they run per step, bytes per device, devices per group) and the FLOPs of the matrix products,
each weighted by how often its computation runs. XLA's `cost_analysis()` counts the body of a
while loop once whatever its trip count, so for a model with scanned layers it is short by
about the number of layers; this count is not.

How often a computation runs: the entry once; a while loop's body its trip count times per run
of the loop (XLA's `known_trip_count`, else read from the condition `compare(counter,
constant(N)), direction=LT` that `jax.lax.scan` and `fori_loop` lower to, counting from 0; a
loop whose count cannot be read counts once and is listed in `unread_loops`); a fusion's, call's
or custom call's computation once per run of its caller; each branch of a conditional once (an
upper bound).

Collectives: all-gather, all-reduce, reduce-scatter, all-to-all, ragged-all-to-all,
collective-permute and collective-broadcast, with their `-start` forms (`-done` is the same
transfer). Two XLA:TPU forms are mapped back: a reduce-scatter runs as a fusion whose computation
is named `all-reduce-scatter...` and holds an all-reduce (reported as reduce-scatter); an
asynchronous collective is spread over a start fusion, the continuation fusions that overlap it
with compute, and a done fusion, each holding the same op (marked `async_collective_fusion_config`),
and is counted once, in the computation an `async-collective-start` calls. Bytes per device are
the larger of the op's operands and its result: the gathered size for an all-gather, the input
for a reduce-scatter.

Matmul FLOPs: a dot is 2 x its result's elements x the contracted size; a convolution (how
XLA:TPU writes most matmuls) follows XLA's `HloCostAnalysis`: 2 x input features / feature
groups x output features x batch / batch groups x the valid (kernel, output) position pairs of
each spatial dim; a custom call (a Pallas or Mosaic kernel, such as the grouped matmul of
`jax.lax.ragged_dot`) counts the `cost_estimate` FLOPs its backend config carries.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import NamedTuple

COLLECTIVES = (
    "all-gather",
    "all-reduce",
    "reduce-scatter",
    "all-to-all",
    "ragged-all-to-all",
    "collective-permute",
    "collective-broadcast",
)
_DTYPE_BYTES = {
    "pred": 1,
    "s4": 0.5,
    "u4": 0.5,
    "s8": 1,
    "u8": 1,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\](\{[^}]*\})?")
_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\{$")
_NAME = re.compile(r"%([\w.\-]+)")
# instructions that move no data through HBM (or whose data the instructions using it count;
# an asynchronous op's data is counted at its start, not again at its done: `_traffic`)
_NO_TRAFFIC = frozenset(
    {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional",
     "call", "partition-id", "replica-id", "after-all", "opt-barrier"}
)  # fmt: skip


class Instruction(NamedTuple):
    name: str
    shape: str  # the result's shape text, layouts included
    opcode: str
    operands: tuple[str, ...]  # operand instruction names
    arguments: str  # the text between the parentheses (a constant's value)
    attributes: str  # everything after the operand list
    root: bool  # the computation's result


class Collective(NamedTuple):
    kind: str  # one of COLLECTIVES
    count: int  # runs per step
    bytes: int  # per device per run
    group_size: int  # devices in each of its groups (2 for a permute's pairs; 1 if unread)
    name: str  # the HLO instruction


class HloStats(NamedTuple):
    collectives: list[Collective]
    matmul_flops: float  # per device per step
    memory_bytes: float  # HBM bytes per device per step, read and written by unfused instructions
    loops: dict[str, int]  # while instruction -> trip count
    unread_loops: list[str]  # while instructions whose trip count could not be read


# ------------------------------------------------------------------------------- parsing


def _closing(text: str, start: int) -> int:
    """Index just past the parenthesis that closes the one at `text[start]`."""
    depth = 0
    for index in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[index], 0)
        if depth == 0:
            return index + 1
    raise ValueError(f"unbalanced parentheses in HLO line: {text[:120]}")


def _instruction(line: str) -> Instruction | None:
    match = re.match(r"\s*(ROOT )?%([\w.\-]+) = ", line)
    if match is None:
        return None
    rest = line[match.end() :]
    end = _closing(rest, 0) if rest.startswith("(") else rest.index(" ")
    shape, rest = rest[:end], rest[end:].lstrip()
    opcode_match = re.match(r"([\w\-]+)\(", rest)
    if opcode_match is None:
        return None
    close = _closing(rest, opcode_match.end() - 1)
    arguments = rest[opcode_match.end() : close - 1]
    return Instruction(
        match.group(2),
        shape,
        opcode_match.group(1),
        tuple(_NAME.findall(arguments)),
        arguments,
        rest[close:],
        match.group(1) is not None,
    )


def parse_module(text: str) -> tuple[str, dict[str, list[Instruction]]]:
    """`(entry computation's name, {computation name: its instructions})` of HLO text."""
    computations: dict[str, list[Instruction]] = {}
    entry, current = None, None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(2)
            computations[current] = []
            entry = current if header.group(1) else entry
        elif line.startswith("}"):
            current = None
        elif current is not None:
            instruction = _instruction(line)
            if instruction is not None:
                computations[current].append(instruction)
    if entry is None:
        raise ValueError("the HLO text has no ENTRY computation; pass compiled.as_text().")
    return entry, computations


def array_dims(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """`[(dtype, dims), ...]` of every array in a shape text (one for an array, several for a
    tuple)."""
    return [
        (dtype, tuple(int(d) for d in dims.split(",") if d))
        for dtype, dims, _ in _ARRAY.findall(shape)
    ]


def shape_bytes(shape: str, *, hbm_only: bool = False) -> int:
    """Bytes of the arrays in a shape text; with `hbm_only`, of those in HBM (XLA:TPU writes
    another memory space, such as the VMEM a prefetch fills, as `S(n)` in the layout)."""
    return int(
        sum(
            _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
            for dtype, dims, layout in _ARRAY.findall(shape)
            if not (hbm_only and re.search(r"S\([1-9]", layout))
        )
    )


# ------------------------------------------------------------------------ call structure


def _trip_count(while_op: Instruction, computations: dict) -> int | None:
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', while_op.attributes)
    if known:
        return int(known.group(1))
    condition = re.search(r"condition=%([\w.\-]+)", while_op.attributes)
    body = computations.get(condition.group(1), []) if condition else []
    constants = {
        op.name: int(op.arguments)
        for op in body
        if op.opcode == "constant" and re.fullmatch(r"-?\d+", op.arguments)
    }
    for op in body:
        if op.opcode == "compare" and "direction=LT" in op.attributes:
            bounds = [constants[name] for name in op.operands[1:] if name in constants]
            if bounds:
                return bounds[0]
    return None


def _callees(op: Instruction, computations: dict) -> list[tuple[str, int | None]]:
    """`[(computation, runs per run of op), ...]`; runs None for a loop body of unread count."""
    if op.opcode == "while":
        trips = _trip_count(op, computations)
        body = re.search(r"body=%([\w.\-]+)", op.attributes).group(1)
        return [(body, trips)]
    found = re.findall(r"(?:calls|true_computation|false_computation)=%([\w.\-]+)", op.attributes)
    branches = re.search(r"branch_computations=\{([^}]*)\}", op.attributes)
    if branches:
        found += _NAME.findall(branches.group(1))
    calls = re.search(r"calls=\{([^}]*)\}", op.attributes)
    if calls:
        found += _NAME.findall(calls.group(1))
    return [(name, 1) for name in found if name in computations]


def _runs(entry: str, computations: dict) -> tuple[dict[str, int], dict, list[str], dict]:
    """`(runs per step of each computation, loops, unread loops, callers)`; callers maps a
    computation to the instructions that call it."""
    edges, loops, unread = {}, {}, []
    callers: dict[str, list[Instruction]] = defaultdict(list)
    for name, ops in computations.items():
        edges[name] = []
        for op in ops:
            for callee, times in _callees(op, computations):
                if op.opcode == "while":
                    if times is None:
                        unread.append(op.name)
                    else:
                        loops[op.name] = times
                edges[name].append((callee, 1 if times is None else times))
                callers[callee].append(op)
    order, seen = [], set()

    def visit(name: str) -> None:  # depth-first post-order; the call graph has no cycles
        stack = [(name, iter(edges[name]))]
        seen.add(name)
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                order.append(node)
            elif child[0] not in seen:
                seen.add(child[0])
                stack.append((child[0], iter(edges[child[0]])))

    visit(entry)
    runs = defaultdict(int, {entry: 1})
    for name in reversed(order):
        for callee, times in edges[name]:
            runs[callee] += runs[name] * times
    return dict(runs), loops, unread, callers


# ------------------------------------------------------------------------------ counting


def _group_size(attributes: str, devices: int) -> int:
    """Devices per group of a collective; `replica_groups={}` is one group of all `devices`."""
    if "replica_groups={}" in attributes:
        return devices
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attributes)
    if iota:
        return int(iota.group(2))
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", attributes)
    if mesh:
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", mesh.group(1)))
        return math.prod(int(sizes[axis]) for axis in re.findall(r"'(\w+)'", mesh.group(2)))
    explicit = re.search(r"replica_groups=\{\{([\d,]*)\}", attributes)
    if explicit:
        return len(explicit.group(1).split(","))
    return 2 if "source_target_pairs=" in attributes else 1  # a permute sends pairwise


def _attribute_int(attributes: str, key: str, default: int) -> int:
    found = re.search(key + r"=(\d+)", attributes)
    return int(found.group(1)) if found else default


def _valid_positions(size_in: int, size_kernel: int, size_out: int, window: dict, dim: int) -> int:
    """(kernel, output) position pairs of one spatial dim that read an input element (not
    padding, not a hole of the input's dilation): XLA's `HloCostAnalysis` rule."""

    def field(key: str, default: int) -> int:
        return int(window[key].split("x")[dim]) if key in window else default

    stride, base, dilation = field("stride", 1), field("lhs_dilate", 1), field("rhs_dilate", 1)
    pad_low = int(window["pad"].split("x")[dim].split("_")[0]) if "pad" in window else 0
    count = 0
    for k in range(size_kernel):
        for o in range(size_out):
            undilated = o * stride - pad_low + k * dilation
            count += undilated % base == 0 and 0 <= undilated // base < size_in
    return count


def _conv_flops(op: Instruction, shapes: dict[str, str]) -> float:
    lhs_labels, rhs_labels, out_labels = re.search(
        r"dim_labels=(\w+)_(\w+)->(\w+)", op.attributes
    ).groups()
    (_, lhs), (_, rhs) = (array_dims(shapes[name])[0] for name in op.operands[:2])
    out = array_dims(op.shape)[0][1]
    window_text = re.search(r"window=\{([^}]*)\}", op.attributes)
    window = dict(re.findall(r"(\w+)=([\w_]+)", window_text.group(1))) if window_text else {}
    valid = 1
    for dim, digit in enumerate(sorted(c for c in lhs_labels if c.isdigit())):
        valid *= _valid_positions(
            lhs[lhs_labels.index(digit)],
            rhs[rhs_labels.index(digit)],
            out[out_labels.index(digit)],
            window,
            dim,
        )
    input_features = lhs[lhs_labels.index("f")] // _attribute_int(
        op.attributes, "feature_group_count", 1
    )
    batch = lhs[lhs_labels.index("b")] // _attribute_int(op.attributes, "batch_group_count", 1)
    return 2.0 * input_features * out[out_labels.index("f")] * batch * valid


def _dot_flops(op: Instruction, shapes: dict[str, str]) -> float:
    lhs = array_dims(shapes[op.operands[0]])[0][1]
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", op.attributes)
    dims = [int(d) for d in contracting.group(1).split(",") if d] if contracting else []
    return 2.0 * math.prod(array_dims(op.shape)[0][1]) * math.prod(lhs[d] for d in dims)


def _matmul_flops(op: Instruction, shapes: dict[str, str]) -> float:
    if op.opcode == "dot":
        return _dot_flops(op, shapes)
    if op.opcode == "convolution":
        return _conv_flops(op, shapes)
    if op.opcode == "custom-call":
        estimate = re.search(r'"cost_estimate":\{"flops":"(\d+)"', op.attributes)
        return float(estimate.group(1)) if estimate else 0.0
    return 0.0


_SLICING = frozenset({"dynamic-slice", "slice", "gather"})


def _read_bytes(fused: list[Instruction], name: str, full: int, computations: dict) -> int:
    """Bytes the instructions of a fused computation read of its value `name` (`full` bytes):
    the slices taken of it (through bitcasts and nested fusions); nothing for the buffer a
    dynamic-update-slice writes in place; `full` for any other use."""
    total = 0
    for use in (inner for inner in fused if name in inner.operands):
        if use.opcode in _SLICING and use.operands[0] == name:
            total += shape_bytes(use.shape, hbm_only=True)
        elif use.opcode == "dynamic-update-slice" and use.operands[0] == name:
            continue
        elif use.opcode == "bitcast":
            total += _read_bytes(fused, use.name, full, computations)
        elif use.opcode == "fusion" and (inner := _called(use, computations)) is not None:
            parameters = _parameters(inner)
            for index, operand in enumerate(use.operands):
                if operand == name and index in parameters:
                    total += _read_bytes(inner, parameters[index], full, computations)
        else:
            return full
    return min(total, full)


def _called(op: Instruction, computations: dict) -> list[Instruction] | None:
    called = re.search(r"calls=%([\w.\-]+)", op.attributes)
    return computations.get(called.group(1)) if called else None


def _parameters(fused: list[Instruction]) -> dict[int, str]:
    return {int(inner.arguments): inner.name for inner in fused if inner.opcode == "parameter"}


def _written_bytes(result: Instruction, by_name: dict) -> int:
    """Bytes a fusion writes of one of its results: a dynamic-update-slice (behind bitcasts)
    writes its update in place, anything else its whole shape."""
    while result.opcode == "bitcast" and result.operands[0] in by_name:
        result = by_name[result.operands[0]]
    if result.opcode == "dynamic-update-slice":
        return shape_bytes(by_name[result.operands[1]].shape, hbm_only=True)
    return shape_bytes(result.shape, hbm_only=True)


def _fused_traffic(op: Instruction, fused: list[Instruction], computations: dict, shapes) -> int:
    """HBM bytes a fusion reads and writes: an operand that the fusion only slices counts its
    slices, a buffer it updates in place its update (a scanned layer slices its weights out of
    the stacked arrays and writes its activations into others)."""
    parameters = _parameters(fused)
    total = 0
    for index, operand in enumerate(op.operands):
        full = shape_bytes(shapes.get(operand, ""), hbm_only=True)
        if index in parameters:
            full = _read_bytes(fused, parameters[index], full, computations)
        total += full
    by_name = {inner.name: inner for inner in fused}
    root = next(inner for inner in fused if inner.root)
    results = [by_name[name] for name in root.operands] if root.opcode == "tuple" else [root]
    return total + sum(_written_bytes(result, by_name) for result in results)


def _traffic(op: Instruction, computations: dict, shapes: dict[str, str]) -> int:
    """HBM bytes an unfused instruction reads and writes: its operands and result in HBM;
    slices and in-place updates count their slices; an asynchronous copy or slice (a prefetch
    into VMEM) the data it moves."""
    if op.opcode in _NO_TRAFFIC or op.opcode.endswith("-done"):
        return 0
    operands = sum(shape_bytes(shapes.get(name, "")) for name in op.operands)
    if op.opcode in ("copy-start", "slice-start"):  # its result holds the source and the copy
        return shape_bytes(op.shape) - operands
    if op.opcode == "dynamic-slice":
        return 2 * shape_bytes(op.shape, hbm_only=True)
    if op.opcode == "dynamic-update-slice":
        return 2 * shape_bytes(shapes.get(op.operands[1], ""), hbm_only=True)
    fused = _called(op, computations) if op.opcode == "fusion" else None
    if fused is not None:
        return _fused_traffic(op, fused, computations, shapes)
    in_hbm = sum(shape_bytes(shapes.get(name, ""), hbm_only=True) for name in op.operands)
    return in_hbm + shape_bytes(op.shape, hbm_only=True)


def _collective(op: Instruction, computation: str, shapes: dict[str, str]) -> tuple[str, int]:
    """`(kind, bytes per device)` of a collective op."""
    kind = op.opcode.removesuffix("-start")
    if kind == "all-reduce" and computation.startswith("all-reduce-scatter"):
        kind = "reduce-scatter"
    operand_bytes = sum(shape_bytes(shapes[name]) for name in op.operands if name in shapes)
    result_bytes = shape_bytes(op.shape)
    if op.opcode.endswith("-start"):  # its result holds the operands too
        result_bytes -= operand_bytes
    return kind, max(operand_bytes, result_bytes)


def hlo_stats(text: str) -> HloStats:
    """The collectives and matmul FLOPs per step of an optimized HLO module (see the module
    docstring), from `jax.jit(f).lower(...).compile().as_text()`."""
    entry, computations = parse_module(text)
    runs, loops, unread, callers = _runs(entry, computations)
    found = re.search(r"num_partitions=(\d+)", text[: text.find("\n")])
    partitions = int(found.group(1)) if found else 1
    shapes = {op.name: op.shape for ops in computations.values() for op in ops}
    collectives, flops, memory = [], 0.0, 0.0
    for name, ops in computations.items():
        times = runs.get(name, 0)
        if not times:
            continue
        started = any(op.name.startswith("async-collective-start") for op in callers[name])
        fused = any(op.opcode == "fusion" for op in callers[name])
        for op in ops:
            flops += times * _matmul_flops(op, shapes)
            if not fused:
                memory += times * _traffic(op, computations, shapes)
            if op.opcode.removesuffix("-start") not in COLLECTIVES:
                continue
            if "async_collective_fusion_config" in op.attributes and not started:
                continue  # a continuation or the done part of an asynchronous collective
            kind, size = _collective(op, name, shapes)
            group = _group_size(op.attributes, partitions)
            collectives.append(Collective(kind, times, size, group, op.name))
    return HloStats(collectives, flops, memory, loops, unread)
