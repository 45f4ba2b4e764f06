"""Collectives in a compiled (SPMD-partitioned) HLO module: kind, count and bytes per step.

Each collective's bytes are its per-device result size (for async pairs, the `-done` op's
result; the `-start` is skipped so nothing counts twice). Ops inside a `while` body run once per
iteration: the trip count is read from the loop's `known_trip_count` annotation, or else from
the integer constant its condition compares against (the form `lax.scan` lowers to), and
multiplies through nested loops and calls.
"""

from __future__ import annotations

import collections
import re
from typing import NamedTuple

KINDS = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute",
         "ragged-all-to-all")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2,
          "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
          "c128": 16}
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")
_SHAPE = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")


class Collective(NamedTuple):
    kind: str
    count: int  # executions per step
    bytes: int  # per device per step


def _shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _BYTES[dtype]
    return total


def _split_computations(hlo: str) -> tuple[dict[str, list[str]], str | None]:
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            current = m.group(1)
            comps[current] = []
            if line.startswith("ENTRY"):
                entry = current
        elif current is not None:
            if line.strip() == "}":
                current = None
            else:
                comps[current].append(line)
    return comps, entry


def _trip_count(line: str, comps: dict[str, list[str]]) -> int:
    m = re.search(r'known_trip_count[^0-9]*(\d+)', line)
    if m:
        return int(m.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", line)
    for body_line in comps.get(cond.group(1), []) if cond else []:
        c = re.search(r"s32\[\]\S*\s+constant\((\d+)\)", body_line)
        if c:
            return int(c.group(1))
    return 1


def summarize(hlo: str) -> dict[str, Collective]:
    """{kind: Collective} over the module's entry computation and everything it calls."""
    comps, entry = _split_computations(hlo)
    totals: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    seen_stack: list[str] = []

    def visit(name: str, multiplier: int) -> None:
        if name not in comps or name in seen_stack:
            return
        seen_stack.append(name)
        for line in comps[name]:
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            result, op = m.group(1), m.group(2)
            base = op.removesuffix("-done").removesuffix("-start")
            if base in KINDS and not op.endswith("-start"):
                totals[base][0] += multiplier
                totals[base][1] += multiplier * _shape_bytes(result)
            if op == "while":
                trips = _trip_count(line, comps)
                body = re.search(r"body=%?([\w.\-]+)", line)
                if body:
                    visit(body.group(1), multiplier * trips)
            else:
                for callee in re.findall(r"(?:to_apply|calls|branch_computations)=\{?%?([\w.\-]+)",
                                         line):
                    visit(callee, multiplier)
        seen_stack.pop()

    if entry is not None:
        visit(entry, 1)
    return {kind: Collective(kind, *totals[kind]) for kind in KINDS if totals[kind][0]}
