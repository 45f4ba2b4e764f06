"""Pipeline schedules as data (sharding/pipeline): the DualPipe/DualPipeV replay of the official
deepseek-ai/DualPipe step() loops, the validator's rejections, the lock-step table the executor
iterates over, and the simulator against the published bubble and memory formulas."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from sharding.pipeline import lockstep, schedule, validate
from sharding.pipeline.simulate import simulate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _settings():
    """Every schedule for pp ≤ 16 with a few valid micro-batch counts each."""
    out = []
    for pp in range(1, 17):
        for name, ms in (("1f1b", (pp, pp + 1, 2 * pp + 3)), ("zb1p", (pp, pp + 1, 2 * pp + 3)),
                         ("dualpipe", (2 * pp, 2 * pp + 2, 3 * pp + 2 * (pp % 2 == 0))),
                         ("dualpipev", (2 * pp, 2 * pp + 1, 3 * pp + 2))):
            if name == "dualpipe" and (pp < 2 or pp % 2):
                continue
            out += [(name, pp, m) for m in ms]
    return out


SETTINGS = _settings()


# ------------------------------------------------------------------ schedules

@pytest.mark.parametrize("name", ["1f1b", "zb1p", "dualpipe", "dualpipev"])
def test_validator_passes_every_schedule(name):
    for _, pp, m in [x for x in SETTINGS if x[0] == name]:
        s = schedule(name, pp, m)
        validate(s)
        assert len(s) == pp and list(s) == list(s.ops) and s.pp == pp and s.microbatches == m


@pytest.mark.parametrize("name, pp, m, message", [
    ("dualpipe", 7, 28, "dualpipe needs an even pp, got pp=7"),
    ("dualpipe", 4, 9, "dualpipe needs microbatches even and >= 2*pp=8, got microbatches=9"),
    ("dualpipe", 4, 6, "dualpipe needs microbatches even and >= 2*pp=8, got microbatches=6"),
    ("dualpipe", 0, 4, "dualpipe needs pp >= 2, got pp=0"),
    ("dualpipev", 4, 7, "dualpipev needs microbatches >= 2*pp=8, got microbatches=7"),
    ("dualpipev", 0, 4, "dualpipev needs pp >= 1, got pp=0"),
    ("1f1b", 4, 3, "1f1b needs microbatches >= pp=4, got microbatches=3"),
    ("zb1p", 4, 3, "zb1p needs microbatches >= pp=4, got microbatches=3"),
    ("1f1b", 0, 3, "1f1b needs pp >= 1, got pp=0"),
    ("gpipe", 4, 8, "unknown schedule 'gpipe'; allowed: 1f1b, zb1p, dualpipe, dualpipev"),
])
def test_invalid_settings_are_refused(name, pp, m, message):
    with pytest.raises(ValueError) as e:
        schedule(name, pp, m)
    assert str(e.value) == message


def test_stage_layout():
    dp, dpv = schedule("dualpipe", 4, 8), schedule("dualpipev", 4, 8)
    # DualPipe: rank r holds stage r of copy 0 and stage PP−1−r of copy 1.
    assert [dp.stage_of(r, c) for r in range(4) for c in (0, 1)] == [0, 3, 1, 2, 2, 1, 3, 0]
    assert dp.next_hop(1, 0) == (2, 0) and dp.next_hop(1, 1) == (0, 1)
    assert dp.next_hop(3, 0) is None and dp.next_hop(0, 1) is None
    assert dp.prev_hop(0, 0) is None and dp.prev_hop(3, 1) is None and dp.prev_hop(0, 1) == (1, 1)
    assert [dp.global_microbatch(c, 1) for c in (0, 1)] == [1, 5]
    assert [dp.copy_of(c) for c in (0, 1)] == [0, 1]
    # DualPipeV: a V over 2·PP stages, the turn PP−1 → PP local to the last rank.
    assert [dpv.stage_of(r, c) for r in range(4) for c in (0, 1)] == [0, 7, 1, 6, 2, 5, 3, 4]
    assert dpv.next_hop(3, 0) == (3, 1) and dpv.prev_hop(3, 1) == (3, 0)
    assert dpv.next_hop(0, 1) is None and dpv.prev_hop(0, 0) is None
    assert dpv.global_microbatch(1, 5) == 5 and dpv.copy_of(1) == 0
    assert (dpv.num_stages, dpv.chunks, dp.num_stages, dp.chunks) == (8, 2, 4, 2)
    one = schedule("1f1b", 3, 3)
    assert (one.num_stages, one.chunks, one.next_hop(2, 0), one.prev_hop(1, 0)) == (3, 1, None,
                                                                                    (0, 0))


def test_dualpipe_8_20_follows_the_official_step_by_hand():
    """DualPipe(PP=8, M=20) worked through the official step() by hand: H=4, m=10.

    Rank 0 (half_rank h=0): step 1 2(H−h−1)=6 F0; step 2 one [F0, F1]; step 3 three [B1 (zb),
    W, F1]; step 4 m−2H+h+1=3 [F0∥B1, F1∥B0]; step 5 three [B1, F1∥B0]; step 6 one [B1, B0]:
    i == step_6//2 == 0 with h even switches zb on after B1, so BW1 then B0 (zb); step 7 three
    [W, B0 (zb)]; step 8 one W. Phase = chunk on the first half of the ranks.
    """
    s = schedule("dualpipe", 8, 20)
    rank0 = [("F", i, 0) for i in range(7)] + [("F", 0, 1)]
    for i in range(3):
        rank0 += [("B", i, 1), ("W", i, 1), ("F", i + 1, 1)]
    for i in range(3):
        rank0 += [("FB", (7 + i, 3 + i), (0, 1)), ("FB", (4 + i, i), (1, 0))]
    for i in range(3):
        rank0 += [("BW", 6 + i, 1), ("FB", (7 + i, 3 + i), (1, 0))]
    rank0 += [("BW", 9, 1), ("B", 6, 0)]
    for i in range(3):
        rank0 += [("W", 6 + i, 0), ("B", 7 + i, 0)]
    rank0 += [("W", 9, 0)]
    assert list(s[0]) == rank0 and len(rank0) == 38
    # Rank 3, a middle rank (h=3): no step 1/3/5/7; step 2 four [F0, F1]; step 4 six pairs,
    # the first one not overlapped (F0 then a full B1); step 6 four [B1, B0] with h odd: zb on
    # from i == 2 before B1; step 8 four W, first in first out.
    rank3 = [("F", i, c) for i in range(4) for c in (0, 1)]
    rank3 += [("F", 4, 0), ("BW", 0, 1), ("FB", (4, 0), (1, 0))]
    for i in range(1, 6):
        rank3 += [("FB", (4 + i, i), (0, 1)), ("FB", (4 + i, i), (1, 0))]
    rank3 += [("BW", 6, 1), ("BW", 6, 0), ("BW", 7, 1), ("BW", 7, 0)]
    rank3 += [("B", 8, 1), ("B", 8, 0), ("B", 9, 1), ("B", 9, 0)]
    rank3 += [("W", 8, 1), ("W", 8, 0), ("W", 9, 1), ("W", 9, 0)]
    assert list(s[3]) == rank3 and len(rank3) == 33
    # Entries per rank, summing the 8 steps: 9(H−h−1) + 5(h+1) + 2(m−2H+h+1), plus one on the
    # middle ranks for the split first pair: h=0: 27+5+6, h=1: 18+10+8, h=2: 9+15+10, h=3: 20+12+1.
    assert [len(ops) for ops in s] == [38, 36, 34, 33, 33, 34, 36, 38]


def _flip(op):
    kind, mb, c = op
    return (kind, mb, (c[0] ^ 1, c[1] ^ 1) if kind == "FB" else c ^ 1)


@pytest.mark.parametrize("pp, m", [(2, 4), (4, 8), (8, 20), (16, 40)])
def test_dualpipe_second_half_mirrors_the_first(pp, m):
    """Official `phase ^= is_in_second_half`: rank PP−1−r runs rank r's loop, directions swapped."""
    s = schedule("dualpipe", pp, m)
    for r in range(pp // 2):
        assert list(s[pp - 1 - r]) == [_flip(op) for op in s[r]]


@pytest.mark.parametrize("p, m", [(1, 2), (2, 4), (2, 5), (3, 7), (4, 8), (4, 11), (8, 16),
                                  (8, 21)])
def test_dualpipev_is_the_first_half_of_dualpipe(p, m):
    """Op for op, DualPipeV(P, M) equals ranks 0..P−1 of DualPipe(2P, 2M): there the phase is
    the chunk and each direction counts its own M micro-batches, as DualPipeV's chunks do."""
    assert schedule("dualpipev", p, m).ops == schedule("dualpipe", 2 * p, 2 * m).ops[:p]


def test_one_f_one_b_and_zb_h1_by_hand():
    s = schedule("1f1b", 3, 4)
    assert list(s[0]) == [("F", 0, 0), ("F", 1, 0), ("F", 2, 0), ("BW", 0, 0), ("F", 3, 0),
                          ("BW", 1, 0), ("BW", 2, 0), ("BW", 3, 0)]
    assert list(s[2]) == [op for i in range(4) for op in (("F", i, 0), ("BW", i, 0))]
    z = schedule("zb1p", 3, 4)
    # Rank 0 defers no W, rank 2 keeps two W's pending.
    assert list(z[0])[3:6] == [("B", 0, 0), ("W", 0, 0), ("F", 3, 0)]
    assert list(z[2]) == [("F", 0, 0), ("B", 0, 0), ("F", 1, 0), ("B", 1, 0), ("F", 2, 0),
                          ("B", 2, 0), ("W", 0, 0), ("F", 3, 0), ("B", 3, 0), ("W", 1, 0),
                          ("W", 2, 0), ("W", 3, 0)]


# ------------------------------------------------------------------ validator rejections

def _edit(s, rank, ops):
    return dataclasses.replace(s, ops=s.ops[:rank] + (tuple(ops),) + s.ops[rank + 1:])


def _swap(ops, a, b):
    ops = list(ops)
    i, j = ops.index(a), ops.index(b)
    ops[i], ops[j] = ops[j], ops[i]
    return ops


def test_rejects_w_before_b():
    s = schedule("zb1p", 2, 4)
    bad = _edit(s, 0, _swap(s[0], ("B", 1, 0), ("W", 1, 0)))
    with pytest.raises(ValueError, match=r"rank 0 chunk 0 op \d+ W of micro-batch 1 does not "
                                         r"come after its B"):
        validate(bad)


def test_rejects_a_missing_op():
    s = schedule("dualpipe", 4, 8)
    ops = list(s[2])
    ops.remove(("BW", 2, 1))
    with pytest.raises(ValueError, match=r"rank 2 chunk 1 micro-batch 2: has 1 F, 0 B, 0 W, 0 BW"):
        validate(_edit(s, 2, ops))


def test_rejects_a_duplicated_op():
    s = schedule("1f1b", 2, 4)
    with pytest.raises(ValueError, match=r"rank 1 chunk 0 micro-batch 3: has 2 F"):
        validate(_edit(s, 1, list(s[1]) + [("F", 3, 0)]))


def test_rejects_mismatched_link_order():
    """Rank 1 consumes micro-batches 1 and 2 in swapped order: each op still exists once and
    follows its F, and the dependency walk alone would not stall, but rank 0 sends 0, 1, 2."""
    s = schedule("1f1b", 3, 6)
    bad = _edit(s, 1, _swap(s[1], ("F", 1, 0), ("F", 2, 0)))
    with pytest.raises(ValueError, match=r"activations rank 0 chunk 0 -> rank 1 chunk 0: message "
                                         r"1 carries micro-batch 1 but the receiver's op 1 there "
                                         r"is for micro-batch 2"):
        validate(bad)


def test_rejects_a_deadlock():
    """Rank 0 waits for micro-batch 0's gradient before sending micro-batch 1, while rank 1
    waits for micro-batch 1's activation before running micro-batch 0's backward."""
    s = schedule("1f1b", 2, 2)
    assert list(s[0]) == [("F", 0, 0), ("F", 1, 0), ("BW", 0, 0), ("BW", 1, 0)]
    s = dataclasses.replace(s, ops=(
        (("F", 0, 0), ("BW", 0, 0), ("F", 1, 0), ("BW", 1, 0)),
        (("F", 0, 0), ("F", 1, 0), ("BW", 0, 0), ("BW", 1, 0))))
    with pytest.raises(ValueError, match=r"deadlocks: no rank can advance \(rank 0 at "
                                         r"\('BW', 0, 0\); rank 1 at \('F', 1, 0\)\)"):
        validate(s)
    with pytest.raises(ValueError, match="deadlocks"):
        lockstep(s)


def test_rejects_an_fb_pair_whose_backward_needs_its_own_forward():
    """The last stage's backward needs the forward of the same micro-batch done first."""
    s = schedule("1f1b", 1, 2)
    bad = _edit(s, 0, [("FB", (0, 0), (0, 0)), ("F", 1, 0), ("BW", 1, 0)])
    with pytest.raises(ValueError, match="does not come after its F"):
        validate(bad)


# ------------------------------------------------------------------ lock-step table

def _halves(entry):
    kind, mb, chunk = entry
    return [("F", mb[0], chunk[0]), ("BW", mb[1], chunk[1])] if kind == "FB" else [entry]


def _needs(s, rank, chunk, kind, mb):
    """The dependency rules, restated from the brief in stage numbers (not the hops the code
    uses): F of stage k needs F of stage k−1 of the same copy; B/BW its own F and B/BW of
    stage k+1; W its own B."""
    if kind == "W":
        return [(rank, chunk, "B", mb)]
    stage, copy = s.stage_of(rank, chunk), s.copy_of(chunk)
    if kind == "F":
        return [(*s.holder(copy, stage - 1), "F", mb)] if stage > 0 else []
    later = [(*s.holder(copy, stage + 1), "B", mb)] if stage < s.num_stages - 1 else []
    return [(rank, chunk, "F", mb)] + later


def _check_lockstep(s):
    """The table's properties, checked from the rules, not from the code that built it."""
    table = lockstep(s)
    assert all(len(row) == s.pp for row in table) and any(table[-1])
    tick, at = {}, {}                 # (rank, chunk, 'F' | 'B' | 'W', mb) -> tick; entries
    for rank in range(s.pp):
        column = [(t, row[rank]) for t, row in enumerate(table) if row[rank] is not None]
        assert [e for _, e in column] == list(s[rank])           # each op once, in rank order
        for t, entry in column:
            at[(rank, t)] = entry
            for kind, mb, chunk in _halves(entry):
                tick[(rank, chunk, {"BW": "B"}.get(kind, kind), mb)] = t
    for (rank, t), entry in at.items():
        for kind, mb, chunk in _halves(entry):
            for need in _needs(s, rank, chunk, kind, mb):
                assert tick[need] < t, (rank, t, entry, need)    # usable one tick later
    return table, tick, at


@pytest.mark.parametrize("name, pp, m", [("1f1b", 4, 6), ("zb1p", 4, 6), ("dualpipe", 4, 10),
                                         ("dualpipe", 8, 20), ("dualpipev", 3, 8),
                                         ("dualpipev", 4, 8)])
def test_lockstep_keeps_order_and_dependencies(name, pp, m):
    _check_lockstep(schedule(name, pp, m))


@pytest.mark.parametrize("name, pp, m", [("1f1b", 4, 6), ("zb1p", 4, 6), ("dualpipe", 8, 20),
                                         ("dualpipev", 4, 8)])
def test_lockstep_is_greedy(name, pp, m):
    """Each entry runs at tick 0, right after its rank's previous entry, or exactly one tick
    after the last message it waited for: no entry could have run earlier."""
    s = schedule(name, pp, m)
    _, tick, at = _check_lockstep(s)
    for rank in range(pp):
        ticks = sorted(t for r, t in at if r == rank)
        for prev, t in zip([-1] + ticks, ticks):
            if prev == t - 1:
                continue
            needs = [n for kind, mb, chunk in _halves(at[(rank, t)])
                     for n in _needs(s, rank, chunk, kind, mb)]
            assert max(tick[n] for n in needs) == t - 1, (rank, t, at[(rank, t)])


def test_lockstep_by_hand():
    """1F1B, 2 ranks, 2 micro-batches; a message of tick t is usable at t + 1."""
    assert lockstep(schedule("1f1b", 2, 2)) == [
        (("F", 0, 0), None),
        (("F", 1, 0), ("F", 0, 0)),
        (None, ("BW", 0, 0)),
        (("BW", 0, 0), ("F", 1, 0)),
        (None, ("BW", 1, 0)),
        (("BW", 1, 0), None),
    ]


def test_lockstep_dualpipev_local_hand_off_takes_a_tick():
    """DualPipeV with one rank: stage 0 → 1 on the same rank still waits a tick, so the table
    is just the rank's ops, one per tick."""
    s = schedule("dualpipev", 1, 2)
    assert [row[0] for row in lockstep(s)] == list(s[0])


# ------------------------------------------------------------------ simulator vs formulas

def test_1f1b_bubble_is_pp_minus_1_times_f_plus_b_on_every_rank():
    for pp in range(1, 17):
        for m in (pp, pp + 1, pp + 5):
            for F, B in ((1, 2), (2, 3)):
                r = simulate(schedule("1f1b", pp, m), F=F, B=B, W=1)
                assert r["bubble"] == [(pp - 1) * (F + B)] * pp, (pp, m, F, B)
                assert r["makespan"] == (m + pp - 1) * (F + B)
                assert r["peak_activations"] == [pp - rank for rank in range(pp)]


def test_zb1p_bubble_is_pp_minus_1_times_f_plus_b_minus_2w_on_every_rank():
    for pp in range(1, 17):
        for m in (pp, pp + 1, pp + 5):
            for F, B, W in ((1, 2, 1), (2, 3, 1), (1.5, 3, 1)):    # W <= F and W <= B - W
                r = simulate(schedule("zb1p", pp, m), F=F, B=B, W=W)
                assert r["bubble"] == [(pp - 1) * (F + B - 2 * W)] * pp, (pp, m, F, B, W)
                assert r["peak_activations"] == [pp - rank for rank in range(pp)]


def test_zb1p_formula_needs_w_no_larger_than_f():
    r = simulate(schedule("zb1p", 4, 8), F=1, B=4, W=2)
    assert min(r["bubble"]) > 3 * (1 + 4 - 4)


def _dualpipe_bubble(stages, F, B, W, FB):
    return (stages / 2 - 1) * (FB + B - 3 * W)


def test_dualpipe_bubble_and_memory_on_every_rank():
    """F = B − W, W ≤ F and F&B = F + B: every rank idles (PP/2−1)(F&B+B−3W), holds PP+1."""
    for pp in range(2, 17, 2):
        for m in (2 * pp, 2 * pp + 2, 3 * pp + 2):
            for F, B, W in ((1, 2, 1), (2, 3, 1)):
                r = simulate(schedule("dualpipe", pp, m), F=F, B=B, W=W, FB=F + B)
                bubble = _dualpipe_bubble(pp, F, B, W, F + B)
                assert r["bubble"] == [bubble] * pp, (pp, m, F, B, W)
                assert r["peak_activations"] == [pp + 1] * pp


def test_dualpipev_bubble_and_memory_on_every_rank():
    """The same with PP = 2 × ranks stages: peak 2·ranks+1."""
    for ranks in range(1, 9):
        for m in (2 * ranks, 2 * ranks + 1, 3 * ranks + 2):
            for F, B, W in ((1, 2, 1), (2, 3, 1)):
                r = simulate(schedule("dualpipev", ranks, m), F=F, B=B, W=W, FB=F + B)
                bubble = _dualpipe_bubble(2 * ranks, F, B, W, F + B)
                assert r["bubble"] == [bubble] * ranks, (ranks, m, F, B, W)
                assert r["peak_activations"] == [2 * ranks + 1] * ranks


@pytest.mark.parametrize("name, pp", [("dualpipe", 6), ("dualpipe", 8), ("dualpipev", 4)])
def test_dualpipe_formula_with_a_cheaper_overlap_is_the_max_over_ranks(name, pp):
    """max(F,B) ≤ F&B < F+B: ranks running more overlapped pairs are busy less, so only the
    largest bubble equals the formula."""
    stages = 2 * pp if name == "dualpipev" else pp
    for FB in (2, 2.5):
        r = simulate(schedule(name, pp, 2 * pp + 4), F=1, B=2, W=1, FB=FB)
        assert max(r["bubble"]) == _dualpipe_bubble(stages, 1, 2, 1, FB)
        assert min(r["bubble"]) < max(r["bubble"])


def test_reference_example_dualpipe_8_20():
    r = simulate(schedule("dualpipe", 8, 20), F=1, B=2, W=1, FB=3)
    assert r["makespan"] == 66 and r["bubble"] == [6] * 8 and r["peak_activations"] == [9] * 8


# ------------------------------------------------------------------ command line

def _cli(*args):
    return subprocess.run([sys.executable, "-m", "sharding.pipeline.simulate", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_prints_one_json_object_and_plots(tmp_path):
    png = tmp_path / "timeline.png"
    r = _cli("--schedule=dualpipe", "--pp=8", "--microbatches=20", "--F=1", "--B=2", "--W=1",
             "--FB=3", "--json", f"--plot={png}")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["makespan"] == 66 and out["bubble"] == [6] * 8
    assert out["peak_activations"] == [9] * 8
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [
    (["--schedule=dualpipe", "--pp=7"], "dualpipe needs an even pp, got pp=7"),
    (["--schedule=dualpipev", "--pp=4", "--microbatches=6"], "dualpipev needs microbatches >= "),
    (["--schedule=gpipe"], "unknown schedule 'gpipe'; allowed: 1f1b, zb1p, dualpipe, dualpipev"),
    (["--schedule=1f1b", "--B=1", "--W=2"], "costs need F, B, W >= 0 and W <= B"),
])
def test_cli_bad_input_is_one_line_with_status_2(args, message):
    r = _cli(*args)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith(f"sharding.pipeline.simulate: error: {message}"), lines
