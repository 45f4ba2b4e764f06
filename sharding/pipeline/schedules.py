"""Pipeline schedules as data: what each rank runs, in order, for one training step.

A schedule is a list per rank of ops, run one after another:

  ("F", mb, chunk)    forward of micro-batch `mb` through the stage that `chunk` holds
  ("B", mb, chunk)    backward for the stage input only; its weight gradient comes later
  ("W", mb, chunk)    the deferred weight gradient of an earlier B (first in, first out)
  ("BW", mb, chunk)   full backward (input and weight gradients)
  ("FB", (mb_f, mb_b), (chunk_f, chunk_b))
                      a forward of one micro-batch overlapped with another's full backward

Every rank holds `chunks` model stages. Which stage a (rank, chunk) holds, where its forward
output goes and where its input gradient goes are methods of `Schedule`, so the executor and the
validator never special-case a schedule by name:

  1f1b, zb1p  chunk 0 only; rank r holds stage r. zb1p (ZB-H1) splits every backward into B and
              W and defers W on rank r by r ops, so the cool-down waits are filled with W work.
  dualpipe    two copies of the model; chunk = direction. Direction 0 is fed at rank 0 with the
              first half of the micro-batches, direction 1 at rank PP−1 with the second half;
              rank r holds stage r of copy 0 and stage PP−1−r of copy 1. Micro-batch ids count
              within a direction (0..M/2−1).
  dualpipev   one copy cut into 2·PP stages folded into a V: rank r holds stages r (chunk 0)
              and 2PP−1−r (chunk 1); the hand-off PP−1 → PP stays on rank PP−1, input and loss
              are both on rank 0. Micro-batch ids are global.

DualPipe and DualPipeV are replayed from the official deepseek-ai/DualPipe `step()` loops
(dualpipe/dualpipe.py, dualpipe/dualpipev.py) with the same per-chunk counters, so each op here
is the op the official code runs at that point; see `_replay_dualpipe`.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Sequence

NAMES = ("1f1b", "zb1p", "dualpipe", "dualpipev")
KINDS = ("F", "B", "W", "BW", "FB")


@dataclasses.dataclass(frozen=True)
class Schedule(Sequence):
    """Per-rank op lists plus the stage layout; `s[r]` is rank r's ops, `len(s) == pp`.

    Attributes:
      name: one of NAMES.
      pp: number of ranks.
      microbatches: M, the micro-batches of the global batch.
      num_stages: model stages (pp, or 2·pp for dualpipev).
      chunks: stages held per rank (1 for 1f1b/zb1p, 2 otherwise).
      ops: ops[r] is rank r's ordered tuple of ops (see the module docstring).
    """

    name: str
    pp: int
    microbatches: int
    num_stages: int
    chunks: int
    ops: tuple[tuple[tuple, ...], ...]

    def __len__(self) -> int:
        return len(self.ops)

    def __getitem__(self, rank):
        return self.ops[rank]

    @property
    def chunk_microbatches(self) -> int:
        """Micro-batches that pass through each (rank, chunk): M/2 for dualpipe, else M."""
        return self.microbatches // 2 if self.name == "dualpipe" else self.microbatches

    def copy_of(self, chunk: int) -> int:
        """Which model copy a chunk belongs to: the direction for dualpipe, else 0."""
        return chunk if self.name == "dualpipe" else 0

    def stage_of(self, rank: int, chunk: int) -> int:
        """Model stage held by (rank, chunk): 0 = embedding side, num_stages − 1 = loss side."""
        if chunk == 0:
            return rank
        return self.num_stages - 1 - rank

    def holder(self, copy: int, stage: int) -> tuple[int, int] | None:
        """The (rank, chunk) holding `stage` of model copy `copy`; None outside the model.

        Chunk 0 of rank r holds stage r of copy 0; every other stage is some rank's chunk 1,
        counted from the loss end (dualpipe copy 1: stage s on rank PP−1−s; dualpipev: stage
        s ≥ PP on rank 2PP−1−s).
        """
        if not 0 <= stage < self.num_stages:
            return None
        if copy == 0 and stage < self.pp:
            return stage, 0
        return self.num_stages - 1 - stage, 1

    def next_hop(self, rank: int, chunk: int) -> tuple[int, int] | None:
        """Where this stage's forward output goes; None for the last stage."""
        return self.holder(self.copy_of(chunk), self.stage_of(rank, chunk) + 1)

    def prev_hop(self, rank: int, chunk: int) -> tuple[int, int] | None:
        """Where this stage's input gradient goes; None for stage 0."""
        return self.holder(self.copy_of(chunk), self.stage_of(rank, chunk) - 1)

    def global_microbatch(self, chunk: int, mb: int) -> int:
        """Index into the M micro-batches of the global batch."""
        return self.copy_of(chunk) * self.chunk_microbatches + mb


def parts(entry: tuple) -> list[tuple[str, int, int]]:
    """The single ops of a schedule entry: an FB pair is its F and its full backward BW."""
    kind, mb, chunk = entry
    if kind == "FB":
        return [("F", mb[0], chunk[0]), ("BW", mb[1], chunk[1])]
    return [entry]


# ------------------------------------------------------------------ 1F1B and ZB-H1

def _one_f_one_b(pp: int, rank: int, m: int) -> list[tuple]:
    """1F1B on one rank: pp−1−rank warm-up forwards, then alternate F and BW, then drain."""
    warmup = pp - 1 - rank
    ops = [("F", i, 0) for i in range(warmup)]
    for i in range(m - warmup):
        ops += [("F", warmup + i, 0), ("BW", i, 0)]
    ops += [("BW", i, 0) for i in range(m - warmup, m)]
    return ops


def _zb_h1(pp: int, rank: int, m: int) -> list[tuple]:
    """ZB-H1 on one rank: 1F1B's order with each BW split into B and W.

    Rank r keeps r weight gradients deferred (a W runs only while more than r are pending), so
    the last rank ends with pp W ops and each rank upstream with one fewer: those W's run while
    the rank would otherwise wait for the next input gradient, removing 2W per stage from the
    1F1B bubble (Qi et al., "Zero Bubble Pipeline Parallelism", 2023).
    """
    pending: deque[int] = deque()
    ops: list[tuple] = []

    def backward(i: int) -> None:
        ops.append(("B", i, 0))
        pending.append(i)
        if len(pending) > rank:
            ops.append(("W", pending.popleft(), 0))

    for op in _one_f_one_b(pp, rank, m):
        if op[0] == "F":
            ops.append(op)
        else:
            backward(op[1])
    ops += [("W", i, 0) for i in pending]
    return ops


# ------------------------------------------------------------------ DualPipe and DualPipeV

class _Replay:
    """The official DualPipe bookkeeping on one rank, recording ops instead of running them.

    `phase_to_chunk` maps the `phase` argument of the official `_forward_chunk` etc. to our
    chunk (DualPipe flips it on the second half of the ranks: `phase ^= is_in_second_half`).
    Micro-batch ids come from the official `current_f_chunk_id` / `current_b_chunk_id`
    counters, one per chunk; deferred weight gradients go through a FIFO like
    `WeightGradStore` (a zero-bubble backward flushes one entry; `_weight_chunk` pops the oldest).
    """

    def __init__(self, phase_to_chunk):
        self.chunk = phase_to_chunk
        self.f = [0, 0]
        self.b = [0, 0]
        self.deferred: deque[tuple[int, int]] = deque()
        self.ops: list[tuple] = []

    def forward(self, phase: int) -> None:
        c = self.chunk(phase)
        self.ops.append(("F", self.f[c], c))
        self.f[c] += 1

    def backward(self, phase: int, enable_zb: bool = False) -> None:
        c = self.chunk(phase)
        mb = self.b[c]
        self.b[c] += 1
        if enable_zb:
            self.ops.append(("B", mb, c))
            self.deferred.append((mb, c))
        else:
            self.ops.append(("BW", mb, c))

    def weight(self) -> None:
        mb, c = self.deferred.popleft()
        self.ops.append(("W", mb, c))

    def forward_backward(self, phase0: int, phase1: int) -> None:
        c0, c1 = self.chunk(phase0), self.chunk(phase1)
        self.ops.append(("FB", (self.f[c0], self.b[c1]), (c0, c1)))
        self.f[c0] += 1
        self.b[c1] += 1


def _replay_dualpipe(run: _Replay, H: int, h: int, m: int, middle: bool) -> list[tuple]:
    """The 8 steps of the official `step()`, shared by DualPipe and DualPipeV.

    DualPipe: H = PP/2 (num_half_ranks), h = min(r, PP−1−r) (half_rank), m = M/2
    (half_num_chunks), middle = rank PP/2−1 or PP/2. DualPipeV uses the same loop with H = PP,
    h = r, m = M, middle = the last rank (its step counts are these with those substitutions).
    Phase 0 is the direction that enters on this rank's side ("near"), phase 1 the other.
    Communication (recv/send) carries no op of its own: a message goes out when its op is done.
    """
    for _ in range(2 * (H - h - 1)):                  # step 1: nF0
        run.forward(0)
    for _ in range(h + 1):                            # step 2: nF0F1
        run.forward(0)
        run.forward(1)
    for _ in range(H - h - 1):                        # step 3: nB1W1F1 (zero bubble)
        run.backward(1, enable_zb=True)
        run.weight()
        run.forward(1)
    for i in range(m - 2 * H + h + 1):                # step 4 (main): nF0B1F1B0
        if i == 0 and middle:
            # Official NOTE: "We don't overlap these two chunks to further reduce bubble size."
            run.forward(0)
            run.backward(1)
        else:
            run.forward_backward(0, 1)
        run.forward_backward(1, 0)
    for _ in range(H - h - 1):                        # step 5: nB1F1B0
        run.backward(1)
        run.forward_backward(1, 0)
    step_6 = h + 1                                    # step 6: nB1B0, second half zero bubble
    enable_zb = False
    for i in range(step_6):
        if i == step_6 // 2 and h % 2 == 1:
            enable_zb = True
        run.backward(1, enable_zb=enable_zb)
        if i == step_6 // 2 and h % 2 == 0:
            enable_zb = True
        run.backward(0, enable_zb=enable_zb)
    for _ in range(H - h - 1):                        # step 7: nWB0 (zero bubble)
        run.weight()
        run.backward(0, enable_zb=True)
    for _ in range(h + 1):                            # step 8: nW
        run.weight()
    assert not run.deferred, "official step() asserts WeightGradStore.funcs_queue.empty()"
    return run.ops


def _dualpipe(pp: int, rank: int, m: int) -> list[tuple]:
    second_half = rank >= pp // 2
    run = _Replay(lambda phase: phase ^ second_half)
    middle = rank in (pp // 2 - 1, pp // 2)
    return _replay_dualpipe(run, pp // 2, min(rank, pp - 1 - rank), m // 2, middle)


def _dualpipev(pp: int, rank: int, m: int) -> list[tuple]:
    run = _Replay(lambda phase: phase)
    return _replay_dualpipe(run, pp, rank, m, rank == pp - 1)


# ------------------------------------------------------------------ public entry

def _check(name: str, pp: int, m: int) -> None:
    """Refuses settings the schedule cannot run, naming the rule and the value."""
    if name not in NAMES:
        raise ValueError(f"unknown schedule {name!r}; allowed: {', '.join(NAMES)}")
    min_pp = 2 if name == "dualpipe" else 1
    if pp < min_pp:
        raise ValueError(f"{name} needs pp >= {min_pp}, got pp={pp}")
    if name == "dualpipe":
        if pp % 2:
            raise ValueError(f"dualpipe needs an even pp, got pp={pp}")
        if m % 2 or m < 2 * pp:
            raise ValueError(f"dualpipe needs microbatches even and >= 2*pp={2 * pp}, "
                             f"got microbatches={m}")
    elif name == "dualpipev":
        if m < 2 * pp:
            raise ValueError(f"dualpipev needs microbatches >= 2*pp={2 * pp}, got microbatches={m}")
    elif m < pp:
        raise ValueError(f"{name} needs microbatches >= pp={pp}, got microbatches={m}")


def schedule(name: str, pp: int, microbatches: int) -> Schedule:
    """The schedule `name` for `pp` ranks and `microbatches` micro-batches.

    Raises:
      ValueError: unknown name, or settings the schedule does not support (one line).
    """
    _check(name, pp, microbatches)
    build = {"1f1b": _one_f_one_b, "zb1p": _zb_h1, "dualpipe": _dualpipe,
             "dualpipev": _dualpipev}[name]
    ops = tuple(tuple(build(pp, r, microbatches)) for r in range(pp))
    num_stages = 2 * pp if name == "dualpipev" else pp
    chunks = 1 if name in ("1f1b", "zb1p") else 2
    return Schedule(name, pp, microbatches, num_stages, chunks, ops)
