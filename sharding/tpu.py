"""TPU slices described without a TPU attached, and what a program compiled for one costs.

With `libtpu` installed (`pip install -e ".[tpu-aot]"`), JAX describes any TPU topology on a
CPU-only machine; a jitted function lowered from abstract shapes under a mesh of those devices
is compiled by the real TPU compiler. `cost_report` reads the compiled program, per device:
arguments, outputs, temporaries and their sum against HBM; FLOPs of the compiled matmuls with
loop trip counts applied (XLA's cost analysis, reported beside it, counts a scanned layer
stack's body once); the collectives by kind with their bytes per step; and two roofline
estimates of the step time (see `step_time_bounds`) with the MFU each (or a measured time)
implies.

The roofline model, per device and per step:

  compute        = matmul FLOPs / peak bf16 FLOP/s
  HBM            = (argument + output bytes) / HBM bandwidth (each read or written once)
  communication  = Σ over collectives of link bytes / ICI bandwidth, where link bytes are
                   what the device must receive under a bandwidth-optimal schedule over its
                   group of n devices (`hlo_stats.link_bytes`): all-reduce 2·R·(n-1)/n of its
                   result R (a ring's reduce-scatter + all-gather), all-gather and all-to-all
                   R·(n-1)/n, reduce-scatter R·(n-1), collective-permute R
  overlapped     = max(compute, HBM, communication): every collective hidden behind compute
  exposed        = max(compute, HBM) + communication: no collective overlaps anything

ICI bandwidth is the chip's, in one direction, summed over all its links (half the
"bidirectional" figure Google publishes): a device receives while it sends, so received bytes
over the inbound bandwidth is its time. Both figures are bounds of a model, not predictions:
it assumes every collective spreads over all of the chip's links at the published rate, with
no latency, no link contention and no bisection limit (an all-to-all over a large group of a
torus is bisection-bound, so it runs slower), and compute at peak. `overlapped` is a lower
bound on the step; `exposed` is the same model with nothing overlapped, not an upper bound.

Topology names are libtpu's: v4:AxBxC, v5e:AxB, v5p:AxBxC, v6e:AxB (e.g. v5p:2x2x1, v5e:4x4,
v6e:16x16, v5p:8x8x16). On v4 libtpu lists each chip's two TensorCores as two devices; device
figures then get half the chip's HBM and peak.

`python -m sharding.aot` composes this with train.py's step.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from typing import Any

from sharding.hlo_stats import KINDS, collective_ops, matmul_flops, summarize, traffic_per_device

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip figures (Cloud TPU documentation)."""

    name: str
    peak_bf16_flops: float  # FLOP/s
    hbm_bytes: int
    hbm_bandwidth: float  # bytes/s
    ici_bandwidth: float  # bytes/s, one direction, summed over the chip's ICI links


# ICI per chip, one direction. Google's pages give it two ways: "Interchip Interconnect BW" in
# Gbps on the older pages, "bidirectional ICI bandwidth (per chip)" in GBps on the newer, twice
# the former (v5p: 4,800 Gbps = 600 GB/s, 1,200 GBps bidirectional; v5e: 1,600 Gbps, 400 GBps),
# so the Gbps figure is one direction; v5e's and v6e's "all-reduce bandwidth per Pod" / 256
# chips give the one-direction figure too.
#   v5p  600 GB/s  https://cloud.google.com/tpu/docs/v5p (4,800 Gbps; 1,200 GBps bidirectional)
#   v5e  200 GB/s  https://cloud.google.com/tpu/docs/v5e (1,600 Gbps; 400 GBps bidirectional,
#                  4 ports; 51.2 TB/s all-reduce per 256-chip pod)
#   v6e  400 GB/s  https://cloud.google.com/tpu/docs/v6e (800 GBps bidirectional, 4 ports;
#                  102.4 TB/s all-reduce per 256-chip pod). Some third-party tables say
#                  3,584 Gbps (448 GB/s); Google's page says 800 GBps, which is what we use.
#   v4   300 GB/s  https://cloud.google.com/tpu/docs/v4 gives no per-chip figure. We use
#                  6 links x 400 Gb/s per direction (2,400 Gbps), from the TPU v4 paper
#                  (Jouppi et al., ISCA 2023, arXiv:2304.01433). The page's 1.1 PB/s all-reduce
#                  per 4,096-chip pod works out to 269 GB/s per chip, about 10% lower.
CHIPS = {
    "v4": Chip("TPU v4", 275e12, 32 * GiB, 1.2e12, 300e9),
    "v5e": Chip("TPU v5e", 197e12, 16 * GiB, 0.819e12, 200e9),
    "v5p": Chip("TPU v5p", 459e12, int(95.74 * GiB), 2.765e12, 600e9),  # HBM as libtpu reports
    "v6e": Chip("TPU v6e", 918e12, int(31.25 * GiB), 1.64e12, 400e9),  # HBM as libtpu reports
}
_TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})$")
EXAMPLES = "v5p:2x2x1, v5e:4x4, v6e:16x16, v5p:8x8x16"


def parse_topology(name: str) -> tuple[Chip, int]:
    """(chip, number of chips) for a libtpu topology name; ValueError listing what is allowed."""
    m = _TOPOLOGY.match(name or "")
    if not m:
        raise ValueError(f"unknown topology {name!r}; allowed: <generation>:<AxB[xC]> with "
                         f"generation one of {sorted(CHIPS)}, e.g. {EXAMPLES}")
    return CHIPS[m.group(1)], math.prod(int(d) for d in m.group(2).split("x"))


def tpu_devices(name: str) -> list:
    """The devices of a TPU topology (needs libtpu; no TPU attached)."""
    parse_topology(name)
    if importlib.util.find_spec("libtpu") is None:
        raise ValueError("compiling for TPU needs libtpu: install the optional extra with "
                         "`pip install -e \".[tpu-aot]\"`")
    # libtpu looks for a TPU host unless told what it is; these quiet it on a CPU machine.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", name.replace(":", "-"))
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # No chip is opened, so several processes (parallel tests, two planners) may load libtpu.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except Exception as e:  # libtpu's own message says what is wrong with the shape
        raise ValueError(f"libtpu rejected topology {name!r}: "
                         f"{str(e).splitlines()[0][:300]}") from None


class CompilerOutOfMemory(Exception):
    """The TPU compiler refused the program: its buffers exceed HBM."""

    def __init__(self, message: str):
        super().__init__(message)
        m = re.search(r"required for (.+?) \(([\d.]+)([KMGTP]?)\) exceeds available HBM "
                      r"\(([\d.]+)([KMGTP]?)\)", message)
        unit = lambda u: 1024 ** "_KMGTP".find(u or "_") if u else 1
        self.what = m.group(1) if m else "buffers"
        self.required = float(m.group(2)) * unit(m.group(3)) if m else None
        self.available = float(m.group(4)) * unit(m.group(5)) if m else None


def compile_lowered(lowered):
    """`lowered.compile()`, with the compiler's HBM refusal as `CompilerOutOfMemory`."""
    try:
        return lowered.compile()
    except Exception as e:  # XlaRuntimeError: RESOURCE_EXHAUSTED
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        raise CompilerOutOfMemory(str(e).splitlines()[0]) from None


def step_time_bounds(compute_s: float, memory_s: float, traffic: dict[str, float],
                     ici_bandwidth: float) -> dict[str, Any]:
    """The two roofline step times of the module docstring's model, per device.

    Args:
      compute_s, memory_s: FLOPs / peak and (argument + output bytes) / HBM bandwidth, seconds.
      traffic: {kind: link bytes per step} (`hlo_stats.traffic_per_device`).
      ici_bandwidth: bytes/s the device receives over ICI (one direction, all links).
    Returns:
      communication_seconds ({kind: s} for every kind, and "total"), the overlapped bound
      max(compute, HBM, communication), the exposed bound max(compute, HBM) + communication,
      and which term bounds the overlapped one ("compute", "memory" or "communication").
    """
    comm = {kind: traffic.get(kind, 0.0) / ici_bandwidth for kind in KINDS}
    comm["total"] = sum(comm.values())
    terms = {"compute": compute_s, "memory": memory_s, "communication": comm["total"]}
    return {"communication_seconds": comm,
            "roofline_overlapped_step_seconds": max(terms.values()),
            "roofline_exposed_step_seconds": max(compute_s, memory_s) + comm["total"],
            "roofline_bound": max(terms, key=terms.get)}


def cost_report(compiled, chip: Chip, chips: int, devices: int, model_flops_per_step: float,
                hbm_bytes: float | None = None, step_time: float | None = None) -> dict[str, Any]:
    """Memory per device, FLOPs, collectives, roofline bounds and MFU of a compiled program.

    Args:
      compiled: the compiled program (one step).
      chip, chips: the chip and how many the topology has; devices: how many JAX lists.
      model_flops_per_step: the model's own count (e.g. 6·active + attention) for MFU.
      hbm_bytes: HBM budget per device (default: the chip's share).
      step_time: a measured step time in seconds, for its MFU.
    Returns:
      A JSON-able dict. Its step times (seconds, see the module docstring):
      `compute_seconds`, `memory_seconds`, `communication_seconds` ({kind: s, "total": s}),
      `roofline_overlapped_step_seconds`, `roofline_exposed_step_seconds`, and
      `roofline_step_seconds` (= the overlapped one) with `roofline_bound` naming its largest
      term; MFU at each: `mfu_overlapped` (= `mfu_at_roofline`), `mfu_exposed`.
      `collectives` holds each kind's ops and result bytes per step, `link_bytes_per_step` the
      bytes each kind moves over a device's links.
    """
    per_chip = devices // chips  # TensorCores listed as devices per chip (2 on v4)
    hbm = hbm_bytes if hbm_bytes is not None else chip.hbm_bytes / per_chip
    peak, bandwidth = chip.peak_bf16_flops / per_chip, chip.hbm_bandwidth / per_chip
    ici = chip.ici_bandwidth / per_chip  # a chip's devices share its links
    mem = compiled.memory_analysis()
    memory = {"arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes,
              "temporaries": mem.temp_size_in_bytes,
              "aliased (donated, counted once)": mem.alias_size_in_bytes,
              "code": mem.generated_code_size_in_bytes}
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
             - mem.alias_size_in_bytes + mem.generated_code_size_in_bytes)
    hlo = compiled.as_text()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    # XLA's cost analysis counts each while body once; hlo_stats weighs it by its trip count.
    flops = matmul_flops(hlo)
    compute_s = flops / peak
    # Every argument byte is read and every output byte written at least once per step.
    memory_s = (mem.argument_size_in_bytes + mem.output_size_in_bytes) / bandwidth
    traffic = traffic_per_device(collective_ops(hlo), devices)
    bounds = step_time_bounds(compute_s, memory_s, traffic, ici)
    mfu = lambda seconds: model_flops_per_step / (devices * peak * seconds) if seconds else None
    overlapped = bounds["roofline_overlapped_step_seconds"]
    report = {
        "topology_chips": chips, "devices": devices, "chip": chip.name,
        "memory_per_device_bytes": {**memory, "total": total},
        "hbm_per_device_bytes": hbm,
        "fits": total <= hbm,
        "headroom_bytes": hbm - total,
        "flops_per_device": flops,
        "flops_per_step": flops * devices,
        "model_flops_per_step": model_flops_per_step,
        "xla_cost_analysis_flops_per_device": float(cost.get("flops", 0.0)),
        "ici_bandwidth_per_device": ici,
        "compute_seconds": compute_s,
        "memory_seconds": memory_s,
        **bounds,
        "roofline_step_seconds": overlapped,
        "mfu_at_roofline": mfu(overlapped),
        "mfu_overlapped": mfu(overlapped),
        "mfu_exposed": mfu(bounds["roofline_exposed_step_seconds"]),
        "collectives": {k: {"count": c.count, "bytes_per_step": c.bytes}
                        for k, c in summarize(hlo).items()},
        "link_bytes_per_step": traffic,
    }
    if step_time:
        report["measured_step_seconds"] = step_time
        report["mfu_at_measured"] = mfu(step_time)
    return report
