"""The dependency rules of a pipeline schedule: checked (`validate`), timed (`timeline`) and laid
out as the lock-step table an executor iterates over (`lockstep`).

An op on (rank, chunk) waits for:
  F(m)      the previous stage's F(m) (its activation), none on stage 0;
  B/BW(m)   the next stage's B/BW(m) (its input gradient); on the last stage its own F(m) (the
            loss); on every stage its own F(m) (the activations it differentiates);
  W(m)      its own B(m).
A rank runs its ops strictly in order; an FB entry starts when both of its halves could. Sends
and receives carry no op of their own: an op's output is on its way when the op is done.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from sharding.pipeline.schedules import KINDS, Schedule, parts


def _where(rank: int, chunk: int) -> str:
    return f"rank {rank} chunk {chunk}"


# ------------------------------------------------------------------ structure

def _check_shape(s: Schedule) -> None:
    if len(s.ops) != s.pp:
        raise ValueError(f"{s.name}: {len(s.ops)} op lists for pp={s.pp} ranks")
    for rank, ops in enumerate(s.ops):
        for i, entry in enumerate(ops):
            if len(entry) != 3 or entry[0] not in KINDS:
                raise ValueError(f"rank {rank} op {i} {entry!r}: not (kind, mb, chunk) with a "
                                 f"kind in {KINDS}")
            if entry[0] == "FB" and not (len(entry[1]) == 2 and len(entry[2]) == 2):
                raise ValueError(f"rank {rank} op {i} {entry!r}: FB takes (mb_f, mb_b), "
                                 f"(chunk_f, chunk_b)")
            for _, mb, chunk in parts(entry):
                if not 0 <= chunk < s.chunks or not 0 <= mb < s.chunk_microbatches:
                    raise ValueError(f"rank {rank} op {i} {entry!r}: chunk must be in "
                                     f"[0, {s.chunks}) and micro-batch in "
                                     f"[0, {s.chunk_microbatches})")


def _check_each_op_once(s: Schedule) -> None:
    """One F per (rank, chunk, mb), and one BW or one B and one W."""
    for rank, ops in enumerate(s.ops):
        count = Counter((kind, mb, chunk) for e in ops for kind, mb, chunk in parts(e))
        for chunk in range(s.chunks):
            for mb in range(s.chunk_microbatches):
                n = {k: count[(k, mb, chunk)] for k in ("F", "B", "W", "BW")}
                full, split = (1, 0, 0), (0, 1, 1)
                if n["F"] == 1 and (n["BW"], n["B"], n["W"]) in (full, split):
                    continue
                got = ", ".join(f"{v} {k}" for k, v in n.items())
                raise ValueError(f"{_where(rank, chunk)} micro-batch {mb}: has {got}; needs "
                                 f"exactly one F and either one BW or one B and one W")


def _check_order_on_rank(s: Schedule) -> None:
    """F(m) before B/BW(m), B(m) before W(m), on each (rank, chunk)."""
    for rank, ops in enumerate(s.ops):
        at = {}
        for i, entry in enumerate(ops):
            for kind, mb, chunk in parts(entry):
                at[(kind, mb, chunk)] = i
        for (kind, mb, chunk), i in at.items():
            before = {"B": "F", "BW": "F", "W": "B"}.get(kind)
            if before and not at[(before, mb, chunk)] < i:
                raise ValueError(f"{_where(rank, chunk)} op {i} {kind} of micro-batch {mb} "
                                 f"does not come after its {before} (op {at[(before, mb, chunk)]})")


def _sequence(s: Schedule, rank: int, chunk: int, kinds: tuple[str, ...]) -> list[int]:
    return [mb for e in s.ops[rank] for k, mb, c in parts(e) if c == chunk and k in kinds]


def _check_links(s: Schedule) -> None:
    """Every link delivers in the order its receiver consumes: activations along next_hop,
    gradients along prev_hop (a FIFO per link, as with ordered point-to-point messages)."""
    for rank in range(s.pp):
        for chunk in range(s.chunks):
            for hop, kinds, what in ((s.next_hop, ("F",), "activations"),
                                     (s.prev_hop, ("B", "BW"), "gradients")):
                to = hop(rank, chunk)
                if to is None:
                    continue
                sent, used = _sequence(s, rank, chunk, kinds), _sequence(s, *to, kinds)
                if sent != used:
                    i = next(i for i, (a, b) in enumerate(zip(sent, used)) if a != b)
                    raise ValueError(f"{what} {_where(rank, chunk)} -> {_where(*to)}: message "
                                     f"{i} carries micro-batch {sent[i]} but the receiver's op "
                                     f"{i} there is for micro-batch {used[i]}")


# ------------------------------------------------------------------ timing

def _needs(s: Schedule, rank: int, part: tuple[str, int, int]) -> list[tuple]:
    """Keys (rank, chunk, 'F' | 'B', mb) that must be done before `part` may start."""
    kind, mb, chunk = part
    if kind == "F":
        prev = s.prev_hop(rank, chunk)
        return [(*prev, "F", mb)] if prev else []
    if kind == "W":
        return [(rank, chunk, "B", mb)]
    nxt = s.next_hop(rank, chunk)
    return [(rank, chunk, "F", mb)] + ([(*nxt, "B", mb)] if nxt else [])


def _done_key(rank: int, part: tuple[str, int, int]) -> tuple:
    kind, mb, chunk = part
    return rank, chunk, {"BW": "B"}.get(kind, kind), mb


def timeline(s: Schedule, cost: Callable[[tuple], float]) -> list[list[tuple[float, float]]]:
    """(start, end) of every entry: each starts when its rank is free and its inputs are done.

    Event-driven with `cost(entry)` time per entry and zero communication time; the result is
    the longest path through the dependency graph, so it does not depend on the order ranks are
    visited. Raises ValueError naming the stuck ops when no rank can advance (deadlock).
    """
    done: dict[tuple, float] = {}
    times: list[list[tuple[float, float]]] = [[] for _ in range(s.pp)]
    free = [0.0] * s.pp
    advanced = True
    while advanced:
        advanced = False
        for rank in range(s.pp):
            while len(times[rank]) < len(s.ops[rank]):
                entry = s.ops[rank][len(times[rank])]
                needs = [k for p in parts(entry) for k in _needs(s, rank, p)]
                if any(k not in done for k in needs):
                    break
                start = max([free[rank]] + [done[k] for k in needs])
                free[rank] = start + cost(entry)
                times[rank].append((start, free[rank]))
                for p in parts(entry):
                    done[_done_key(rank, p)] = free[rank]
                advanced = True
    stuck = [(rank, ops[len(t)]) for rank, (ops, t) in enumerate(zip(s.ops, times))
             if len(t) < len(ops)]
    if stuck:
        what = "; ".join(f"rank {rank} at {entry}" for rank, entry in stuck)
        raise ValueError(f"{s.name} deadlocks: no rank can advance ({what})")
    return times


def lockstep(s: Schedule) -> list[tuple[tuple | None, ...]]:
    """The schedule as lock-step ticks: row t holds each rank's entry run at tick t, or None.

    Every entry takes one tick; what it sends at tick t (activations to next_hop, gradients to
    prev_hop, local hand-offs included) can be used from tick t + 1. Each rank runs its next
    entry at the earliest tick its inputs allow, keeping its order. Raises ValueError on
    deadlock.
    """
    times = timeline(s, lambda entry: 1)
    ticks = max((t[-1][1] for t in times if t), default=0)
    table: list[list[tuple | None]] = [[None] * s.pp for _ in range(int(ticks))]
    for rank, spans in enumerate(times):
        for entry, (start, _) in zip(s.ops[rank], spans):
            table[int(start)][rank] = entry
    return [tuple(row) for row in table]


def validate(s: Schedule) -> None:
    """Raises ValueError (one line naming the rank and op) unless `s` is complete and runnable:
    every needed op exactly once, F before B/BW before W on each stage, every link delivering in
    the order it is consumed, and no deadlock."""
    _check_shape(s)
    _check_each_op_once(s)
    _check_order_on_rank(s)
    _check_links(s)
    timeline(s, lambda entry: 1)
