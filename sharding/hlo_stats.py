"""Per-step statistics of a compiled (SPMD-partitioned) HLO module: collectives and matmul FLOPs.

XLA's own cost analysis counts a `while` body once, however many times it runs, so a scanned
61-layer model reports a fraction of its FLOPs. Here every instruction is weighted by how often
it runs per step: a loop body's trip count is read from its `known_trip_count` annotation, or
else from the integer constant its condition compares against (the form `lax.scan` lowers to),
and multiplies through nested loops, fusions and calls. A conditional contributes its costliest
branch (by matmul FLOPs): per execution, the most a device can do there — in a pipeline tick,
the heaviest op kind any rank runs.

* Collectives: per-device result bytes of each all-to-all, all-gather, reduce-scatter,
  all-reduce and collective-permute (for async pairs the `-done` op's result; the `-start` is
  skipped so nothing counts twice).
* Matmul FLOPs: 2 × output elements × contracted size, for `dot` (lhs contracting dims),
  `convolution` (rhs size over its output-feature dim: TPU lowers matmuls to convolutions) and
  TPU `ragged-dot` kernels (2·m·k·n; the weight gradient of a ragged_dot compiles to a
  convolution dense over the groups, counted as such: g times its ragged work).
* Each collective instruction on its own (`collective_ops`): executions per step, bytes, its
  device groups (`replica_groups` in any of XLA's three spellings, see `parse_replica_groups`)
  and the JAX op it came from (`op_name` metadata).
* Link traffic (`link_bytes`, `traffic_per_device`): the bytes each device must receive over
  its chip-to-chip links per step, from each collective's result bytes and group size.
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Iterator
from typing import NamedTuple

KINDS = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute",
         "ragged-all-to-all")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2,
          "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
          "c128": 16}
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\((.*)\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")
_SHAPE = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")
_PARAM = re.compile(r"([\w.\-]+):\s*(\(?[\w\[\],{}:()\s.]*?\]\S*)")


class Collective(NamedTuple):
    kind: str
    count: int  # executions per step
    bytes: int  # per device per step


class Instruction(NamedTuple):
    name: str
    result: str  # result type text, e.g. "bf16[32,256]{1,0:T(8,128)}"
    op: str
    rest: str  # operands and attributes
    shapes: dict  # the computation's {name: result type text}


def _dims(text: str) -> list[list[int]]:
    return [[int(d) for d in dims.split(",") if d] for _, dims in _SHAPE.findall(text)]


def _shape_bytes(text: str) -> int:
    return sum(math.prod(d) * _BYTES[t] for t, d in
               ((t, [int(x) for x in dims.split(",") if x]) for t, dims in _SHAPE.findall(text)))


def _split_computations(hlo: str) -> tuple[dict[str, list[str]], dict[str, str], str | None]:
    comps: dict[str, list[str]] = {}
    headers: dict[str, str] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            current = m.group(1)
            comps[current], headers[current] = [], m.group(2)
            if line.startswith("ENTRY"):
                entry = current
        elif current is not None:
            if line.strip() == "}":
                current = None
            else:
                comps[current].append(line)
    return comps, headers, entry


def _trip_count(rest: str, comps: dict[str, list[str]]) -> int:
    m = re.search(r"known_trip_count[^0-9]*(\d+)", rest)
    if m:
        return int(m.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", rest)
    for line in comps.get(cond.group(1), []) if cond else []:
        c = re.search(r"s32\[\]\S*\s+constant\((\d+)\)", line)
        if c:
            return int(c.group(1))
    return 1


def _branches(rest: str) -> list[str]:
    """The branch computations of a conditional (`branch_computations={%a, %b}` or
    `true_computation=%a, false_computation=%b`)."""
    listed = re.search(r"branch_computations=\{([^}]*)\}", rest)
    if listed:
        return [b.strip().lstrip("%") for b in listed.group(1).split(",") if b.strip()]
    return re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", rest)


def walk(hlo: str) -> Iterator[tuple[Instruction, int]]:
    """Every instruction reachable from the entry computation, with its executions per step."""
    comps, headers, entry = _split_computations(hlo)
    stack: list[str] = []

    def visit(name: str, multiplier: int):
        if name not in comps or name in stack:
            return
        stack.append(name)
        shapes = {p: t for p, t in _PARAM.findall(headers[name])}
        for line in comps[name]:
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            inst = Instruction(m.group(1), m.group(2), m.group(3), m.group(4), shapes)
            shapes[inst.name] = inst.result
            yield inst, multiplier
            if inst.op == "while":
                body = re.search(r"body=%?([\w.\-]+)", inst.rest)
                if body:
                    yield from visit(body.group(1), multiplier * _trip_count(inst.rest, comps))
            elif inst.op == "conditional":
                branches = [list(visit(b, multiplier)) for b in _branches(inst.rest)]
                if branches:  # the costliest branch: the most one execution can do
                    yield from max(branches, key=lambda insts: sum(
                        t * _instruction_flops(i) for i, t in insts))
            else:
                for callee in re.findall(
                        r"(?:to_apply|calls|branch_computations)=\{?%?([\w.\-]+)", inst.rest):
                    yield from visit(callee, multiplier)
        stack.pop()

    if entry is not None:
        yield from visit(entry, 1)


class CollectiveOp(NamedTuple):
    """One collective instruction of the compiled program."""

    kind: str  # e.g. "all-to-all" (an async pair counts once, as its -start)
    name: str  # the HLO instruction's name
    count: int  # executions per step (loop trip counts applied)
    bytes: int  # per device, per execution (the result's bytes)
    groups: tuple[tuple[int, ...], ...] | None  # device ids per group; None: all devices
    op_name: str  # JAX's op_name metadata ('' when absent): where in the program it came from


_IOTA = re.compile(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")


def _iota(dims: list[int], reshape: list[int], perm: list[int] | None) -> list[int]:
    """iota(prod(reshape)) reshaped to `reshape`, transposed by `perm`, flattened."""
    n = math.prod(reshape)
    ids = list(range(n))
    if perm:
        strides = [math.prod(reshape[i + 1:]) for i in range(len(reshape))]
        shape = [reshape[p] for p in perm]
        ids = []
        for flat in range(n):
            index, rest = [], flat
            for size in reversed(shape):
                index.append(rest % size)
                rest //= size
            index.reverse()
            ids.append(sum(index[k] * strides[perm[k]] for k in range(len(perm))))
    if math.prod(dims) != n:
        raise ValueError(f"iota device list of {n} ids reshaped to {dims}")
    return ids


def parse_replica_groups(rest: str) -> tuple[tuple[int, ...], ...] | None:
    """The device groups of a collective from its attribute text, in any of XLA's spellings:

      replica_groups={{0,1,2,3},{4,5,6,7}}         explicit lists
      replica_groups=[2,4]<=[8]                     iota: [groups, size] of iota(8)
      replica_groups=[4,2]<=[2,2,2]T(1,0,2)         iota reshaped and transposed first
      replica_groups=mesh['axis_0'=2,'axis_1'=4], device_ids=([2,2,2]T(1,0,2)) {'axis_1'}
                                                    a device mesh; groups vary along the axes
                                                    listed in braces
    None for an empty or absent list (one group of all devices).
    Raises:
      ValueError: a form this parser does not know (so no collective goes unchecked).
    """
    m = re.search(r"replica_groups=(\S+)", rest)
    if not m:
        return None
    text = rest[m.start(1):]
    if text.startswith("{}"):
        return None
    if text.startswith("{{"):
        body = text[1:text.index("}}") + 1]
        return tuple(tuple(int(x) for x in g.split(",") if x)
                     for g in re.findall(r"\{([\d,]*)\}", body))
    iota = _IOTA.match(text)
    if iota:
        groups, reshape = [[int(x) for x in g.split(",")] for g in iota.groups()[:2]]
        perm = [int(x) for x in iota.group(3).split(",")] if iota.group(3) else None
        ids = _iota(groups, reshape, perm)
        size = groups[-1]
        return tuple(tuple(ids[i:i + size]) for i in range(0, len(ids), size))
    mesh = re.match(r"mesh\[([^\]]*)\](?:,\s*device_ids=\(([^)]*\)?)\))?\s*\{([^}]*)\}", text)
    if mesh:
        axes = re.findall(r"'([^']+)'=(\d+)", mesh.group(1))
        names, sizes = [a for a, _ in axes], [int(n) for _, n in axes]
        ids = list(range(math.prod(sizes)))
        if mesh.group(2):
            spec = _IOTA.match(f"[{len(ids)}]<=" + mesh.group(2).strip())
            if not spec:
                raise ValueError(f"unknown device_ids in {text[:200]!r}")
            reshape = [int(x) for x in spec.group(2).split(",")]
            perm = [int(x) for x in spec.group(3).split(",")] if spec.group(3) else None
            ids = _iota([len(ids)], reshape, perm)
        within = re.findall(r"'([^']+)'", mesh.group(3))
        if any(a not in names for a in within):
            raise ValueError(f"unknown mesh axes {within} in {text[:200]!r}")
        strides = [math.prod(sizes[i + 1:]) for i in range(len(sizes))]
        found: dict[tuple, list[int]] = collections.defaultdict(list)
        for flat, device in enumerate(ids):
            index = [flat // strides[i] % sizes[i] for i in range(len(sizes))]
            key = tuple(index[i] for i, a in enumerate(names) if a not in within)
            found[key].append(device)
        return tuple(tuple(g) for _, g in sorted(found.items()))
    raise ValueError(f"unknown replica_groups form: {text[:200]!r}")


def collective_ops(hlo: str) -> list[CollectiveOp]:
    """Every collective instruction reachable from the entry computation (see `CollectiveOp`).

    Instructions inside a loop body appear once, with `count` its executions per step. An async
    pair is one op: the -done's result bytes, the -start's groups and metadata.
    Raises:
      ValueError: a collective whose replica groups `parse_replica_groups` cannot read.
    """
    ops, starts = [], {}
    for inst, times in walk(hlo):
        base = inst.op.removesuffix("-done").removesuffix("-start")
        if base not in KINDS:
            continue
        if inst.op.endswith("-start"):
            starts[inst.name] = inst
            continue
        attrs = inst.rest
        if inst.op.endswith("-done"):
            start = starts.get(inst.rest.split(")", 1)[0].split(",")[0].strip().lstrip("%"))
            attrs = start.rest if start is not None else attrs
        name = re.search(r'op_name="([^"]*)"', attrs)
        ops.append(CollectiveOp(base, inst.name, times, _shape_bytes(inst.result),
                                parse_replica_groups(attrs), name.group(1) if name else ""))
    return ops


def link_bytes(kind: str, result_bytes: float, group_size: int) -> float:
    """Bytes one device receives (and sends: these collectives are symmetric) over its links
    for one execution, under a bandwidth-optimal schedule over `group_size` devices. With R the
    result's bytes on each device and n the group size:

      all-gather          R·(n-1)/n   every shard but its own
      all-to-all          R·(n-1)/n   every chunk but the one it keeps (ragged: R is the
                                      output buffer, an upper estimate of the rows it fills)
      reduce-scatter      R·(n-1)     the result is one n-th of the input; a ring passes
                                      n-1 partial sums of it
      all-reduce          2·R·(n-1)/n a reduce-scatter then an all-gather of R
      collective-permute  R           one buffer from a peer (pipeline stages, halos)

    A group of one device moves nothing (every factor but the permute's is 0 at n = 1).
    """
    n = group_size
    factor = {"all-gather": (n - 1) / n, "all-to-all": (n - 1) / n,
              "ragged-all-to-all": (n - 1) / n, "reduce-scatter": n - 1,
              "all-reduce": 2 * (n - 1) / n, "collective-permute": 1.0}[kind]
    return factor * result_bytes


def traffic_per_device(ops: list[CollectiveOp], devices: int) -> dict[str, float]:
    """{kind: link bytes per step} of one device, every kind of `KINDS` (0.0 when absent).

    Each op's group size is its largest replica group (the step waits for the busiest device),
    all `devices` when it lists none; loop trip counts are in `op.count`.
    """
    totals = dict.fromkeys(KINDS, 0.0)
    for op in ops:
        n = max(map(len, op.groups)) if op.groups else devices
        totals[op.kind] += op.count * link_bytes(op.kind, op.bytes, n)
    return totals


def summarize(hlo: str) -> dict[str, Collective]:
    """{kind: Collective} of the collectives a step runs, per device."""
    totals: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for inst, times in walk(hlo):
        base = inst.op.removesuffix("-done").removesuffix("-start")
        if base in KINDS and not inst.op.endswith("-start"):
            totals[base][0] += times
            totals[base][1] += times * _shape_bytes(inst.result)
    return {kind: Collective(kind, *totals[kind]) for kind in KINDS if totals[kind][0]}


def _operands(inst: Instruction) -> list[str]:
    head = inst.rest.split(")", 1)[0]
    return [inst.shapes.get(name.strip().lstrip("%"), "") for name in head.split(",")]


def _convolution_macs(attrs: str, lhs: list[int], rhs: list[int]) -> int:
    """Multiply-adds per output element: input features × the window taps that land on real
    (not dilation-inserted or padding) input. TPU writes a batched matmul as a convolution whose
    batch dims are spatial dims with lhs_dilate = window size: one real tap each."""
    labels = re.search(r"dim_labels=(\w+)_(\w+)->", attrs)
    if not labels:
        return math.prod(rhs)
    lhs_labels, rhs_labels = labels.groups()
    macs = rhs[rhs_labels.index("i")] if "i" in rhs_labels else 1
    window = re.search(r"window=\{([^}]*)\}", attrs)
    fields = dict(f.split("=", 1) for f in window.group(1).split()) if window else {}
    sizes = [int(x) for x in fields.get("size", "").split("x") if x]
    dilations = [int(x) for x in fields.get("lhs_dilate", "").split("x") if x]
    for d, label in enumerate(sorted(c for c in rhs_labels if c.isdigit())):
        size = sizes[d] if d < len(sizes) else rhs[rhs_labels.index(label)]
        dilate = dilations[d] if d < len(dilations) else 1
        lhs_size = lhs[lhs_labels.index(label)] if label in lhs_labels else size
        macs *= max(1, min(-(-size // dilate), lhs_size))
    return macs


def _ragged_dot_flops(inst: Instruction) -> float:
    """A TPU `ragged-dot` kernel (jax.lax.ragged_dot lowered to a Mosaic custom call): its lhs
    [m, k] and rhs [g, k, n] are the last two operand_layout_constraints; each of the m rows
    meets one group's [k, n]: 2·m·n·k (the result [m, n] times k)."""
    listed = re.search(r"operand_layout_constraints=\{(.*?)\}, (?:frontend|metadata)", inst.rest)
    shapes = _dims(listed.group(1)) if listed else []
    out = _dims(inst.result)
    if len(shapes) < 2 or not out or not shapes[-2] or shapes[-2][0] != out[0][0]:
        return 0.0
    return 2.0 * math.prod(out[0]) * (math.prod(shapes[-2]) // shapes[-2][0])


def _instruction_flops(inst: Instruction) -> float:
    """2 × output elements × contracted size of a dot, convolution or TPU ragged-dot kernel; 0
    for anything else."""
    if inst.op == "custom-call" and inst.name.startswith("ragged-dot") \
            and "metadata" not in inst.name:
        return _ragged_dot_flops(inst)
    if inst.op not in ("dot", "convolution"):
        return 0.0
    out = _dims(inst.result)
    operands = [_dims(t) for t in _operands(inst)]
    if not out or len(operands) < 2 or not operands[0] or not operands[1]:
        return 0.0
    if inst.op == "dot":
        lhs = operands[0][0]
        m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", inst.rest)
        contracted = math.prod(lhs[int(i)] for i in m.group(1).split(",") if i) if m else 1
    else:
        contracted = _convolution_macs(inst.rest, operands[0][0], operands[1][0])
    return 2.0 * math.prod(out[0]) * contracted


def matmul_flops(hlo: str) -> float:
    """FLOPs per step per device of every dot and convolution (loop trip counts applied; a
    conditional counts its costliest branch)."""
    return sum(times * _instruction_flops(inst) for inst, times in walk(hlo))
