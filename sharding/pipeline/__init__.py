"""Pipeline-parallel schedules as data.

  schedules.py  schedule(name, pp, microbatches) -> Schedule: per-rank op lists for 1f1b, zb1p,
                dualpipe, dualpipev (the last two replayed from the official DualPipe step())
                and the stage layout (stage_of, next_hop, prev_hop, global_microbatch)
  validate.py   validate(s): every op once, F/B/W order, link order, no deadlock;
                timeline(s, cost): start/end of every op; lockstep(s): the tick table an
                executor iterates over
  simulate.py   simulate(s, F, B, W, FB): makespan, bubbles, peak activations, timeline plot;
                python -m sharding.pipeline.simulate

These three are pure Python: importing this package does not import JAX (the executor that
runs a schedule under shard_map imports them, not the other way round).
"""

from sharding.pipeline.schedules import NAMES, Schedule, parts, schedule
from sharding.pipeline.validate import lockstep, timeline, validate

__all__ = ["NAMES", "Schedule", "lockstep", "parts", "schedule", "timeline", "validate"]
