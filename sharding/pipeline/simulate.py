"""Simulated step time, bubbles and activation memory of a pipeline schedule.

  python -m sharding.pipeline.simulate --schedule=dualpipe --pp=8 --microbatches=20
  python -m sharding.pipeline.simulate --schedule=1f1b --pp=4 --microbatches=8 --json
  python -m sharding.pipeline.simulate --schedule=dualpipev --pp=4 --microbatches=10 \\
      --F=1 --B=2 --W=1 --FB=3 --plot=timeline.png

Costs as in the DualPipe paper's table: F a forward chunk, B the FULL backward (input and
weight gradients), W the weight-gradient part of it, FB an overlapped forward+backward pair
(default F + B). So BW costs B, a split B (input gradient only) B − W, W costs W, FB costs FB.
Communication is free; each op starts when its rank is free and its inputs are done.

What the simulator reproduces exactly (tests/test_pipeline_schedules.py, pp 2..16, several
micro-batch counts; bubble = makespan − a rank's busy time):
  1f1b       (PP−1)(F+B) on every rank, for any costs and M ≥ PP: each rank is busy M(F+B)
             and the makespan is (M+PP−1)(F+B). Peak activations PP−r on rank r.
  zb1p       (PP−1)(F+B−2W) on every rank when W ≤ F and W ≤ B−W (the ZB paper's setting is
             F = B−W = W); with a larger W every rank's bubble is bigger. Peak PP−r.
  dualpipe   (PP/2−1)(F&B+B−3W) as the maximum over ranks when F = B−W, W ≤ F and
             max(F,B) ≤ F&B ≤ F+B; on every rank when F&B = F+B (then every rank is busy
             M(F+B); with F&B < F+B a rank running more overlapped pairs is busy less and idles
             more, e.g. the middle ranks run their first pair as a separate F and BW). Peak
             activations PP+1 on every rank. F=1, B=2, W=1, F&B=3, PP=8, M=20: makespan 66,
             6 idle units on every rank. With F ≠ B−W the formula is not exact.
  dualpipev  the same with PP = 2·ranks (peak 2·ranks+1 activations).
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

from dsv3_jax import cli
from sharding.pipeline.schedules import NAMES, Schedule, parts, schedule
from sharding.pipeline.validate import timeline, validate

PROG = "sharding.pipeline.simulate"
COLORS = {"F": "#f2b134", "B": "#6fa8dc", "W": "#93c47d", "BW": "#3d78c5", "FB": "#c27ba0"}
LABELS = {"F": "F forward", "B": "B input grad", "W": "W weight grad", "BW": "BW full backward",
          "FB": "FB overlapped F + BW"}


def costs(F: float = 1.0, B: float = 2.0, W: float = 1.0, FB: float | None = None) -> dict:
    """Time per entry kind; B is the full backward, so a split B (input grad only) is B − W."""
    if min(F, B, W) < 0 or W > B:
        raise ValueError(f"costs need F, B, W >= 0 and W <= B, got F={F} B={B} W={W}")
    return {"F": F, "B": B - W, "W": W, "BW": B, "FB": F + B if FB is None else FB}


def peak_activations(s: Schedule) -> list[int]:
    """Most micro-batch activations held at once per rank: +1 at each F, −1 when that
    micro-batch's B or BW on the same stage is done (W needs no activations here). In an FB
    pair the forward's activation exists before the backward's is freed."""
    peaks = []
    for ops in s.ops:
        held = peak = 0
        for entry in ops:
            ps = parts(entry)
            held += sum(kind == "F" for kind, _, _ in ps)
            peak = max(peak, held)
            held -= sum(kind in ("B", "BW") for kind, _, _ in ps)
        peaks.append(peak)
    return peaks


def simulate(s: Schedule, F: float = 1.0, B: float = 2.0, W: float = 1.0,
             FB: float | None = None) -> dict:
    """Makespan, per-rank bubble and peak activations of `s` under the given op costs.

    Returns:
      dict with `makespan`, `bubble` (per rank: makespan − busy time), `busy` and
      `peak_activations` (per rank), `max_bubble`, and `timeline` (per rank, a list of
      (start, end, entry)).
    """
    cost = costs(F, B, W, FB)
    times = timeline(s, lambda entry: cost[entry[0]])
    makespan = max((spans[-1][1] for spans in times if spans), default=0.0)
    busy = [sum(end - start for start, end in spans) for spans in times]
    bubble = [makespan - b for b in busy]
    return {"schedule": s.name, "pp": s.pp, "microbatches": s.microbatches,
            "costs": {"F": F, "B": B, "W": W, "FB": cost["FB"]},
            "makespan": makespan, "bubble": bubble, "max_bubble": max(bubble),
            "busy": busy, "peak_activations": peak_activations(s),
            "timeline": [[(a, b, e) for (a, b), e in zip(spans, ops)]
                         for spans, ops in zip(times, s.ops)]}


def table(result: dict) -> str:
    """The human-readable report: one line per rank."""
    lines = [f"{result['schedule']}  pp={result['pp']}  microbatches={result['microbatches']}  "
             f"costs={result['costs']}",
             f"makespan {result['makespan']:g}   max bubble {result['max_bubble']:g}",
             f"{'rank':>4}  {'busy':>8}  {'bubble':>8}  {'peak activations':>16}"]
    for r, (busy, bub, peak) in enumerate(zip(result["busy"], result["bubble"],
                                              result["peak_activations"])):
        lines.append(f"{r:>4}  {busy:>8g}  {bub:>8g}  {peak:>16d}")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """A per-rank timeline like the DualPipe README figure, saved to `path`.

    One row per rank, a box per op coloured by kind, its micro-batch inside (f/b for an FB
    pair); chunk 1 (dualpipe: direction 1, dualpipev: the V's second arm) is hatched, an FB
    pair by the chunk of its forward.
    """
    import matplotlib  # optional: only --plot needs it (pyproject's `test` extra has it)

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.patches import Patch

    pp, makespan = result["pp"], result["makespan"]
    fig, ax = plt.subplots(figsize=(max(8.0, makespan * 0.25), 0.5 * pp + 1.5))
    for rank, spans in enumerate(result["timeline"]):
        for start, end, (kind, mb, chunk) in spans:
            second = chunk == 1 or (kind == "FB" and chunk[0] == 1)
            ax.barh(rank, end - start, left=start, height=0.8, color=COLORS[kind],
                    edgecolor="black", linewidth=0.5, hatch="//" if second else None)
            text = f"{mb[0]}/{mb[1]}" if kind == "FB" else str(mb)
            ax.text((start + end) / 2, rank, text, ha="center", va="center", fontsize=6)
    ax.set_yticks(range(pp), [f"rank {r}" for r in range(pp)])
    ax.invert_yaxis()
    ax.set_xlim(0, makespan)
    ax.set_xlabel("time")
    ax.set_title(f"{result['schedule']}  pp={pp}  microbatches={result['microbatches']}  "
                 f"makespan {makespan:g}  max bubble {result['max_bubble']:g}")
    used = {e[0] for spans in result["timeline"] for _, _, e in spans}
    handles = [Patch(color=COLORS[k], label=LABELS[k]) for k in COLORS if k in used]
    handles.append(Patch(facecolor="white", edgecolor="black", hatch="//",
                         label="chunk 1 (FB: its F)"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=6,
              fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------ command line

flags.DEFINE_string("schedule", "dualpipe", f"one of {', '.join(NAMES)}")
flags.DEFINE_integer("pp", 8, "pipeline ranks")
flags.DEFINE_integer("microbatches", 20, "micro-batches per step (the whole global batch)")
flags.DEFINE_float("F", 1.0, "time of a forward chunk")
flags.DEFINE_float("B", 2.0, "time of a FULL backward chunk (input + weight gradients)")
flags.DEFINE_float("W", 1.0, "time of the weight-gradient part of B")
flags.DEFINE_float("FB", None, "time of an overlapped forward+backward pair (default F + B)")
flags.DEFINE_bool("json", False, "print one JSON object instead of the table")
flags.DEFINE_string("plot", None, "save a timeline figure (PNG) to this path")
FLAGS = flags.FLAGS


def main(argv) -> None:
    if len(argv) > 1:
        cli.fail(PROG, f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        s = schedule(FLAGS.schedule, FLAGS.pp, FLAGS.microbatches)
        validate(s)
        result = simulate(s, FLAGS.F, FLAGS.B, FLAGS.W, FLAGS.FB)
    except ValueError as e:
        cli.fail(PROG, cli.first_line(e))
    if FLAGS.plot:
        plot(result, FLAGS.plot)
    if FLAGS.json:
        print(json.dumps({k: v for k, v in result.items() if k != "timeline"}))
    else:
        print(table(result))
        if FLAGS.plot:
            print(f"timeline saved to {FLAGS.plot}", file=sys.stderr)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser(PROG))
