r"""Compile train.py's step for an unattached TPU slice: per-chip memory, FLOPs, collectives.

    python -m sharding.aot --config=configs/deepseek_v3_671b.py --topology=v5p:8x8x16 \
        --config.mesh.expert=64 --config.mesh.data=-1 [--json] [--hbm_gib=95] [--step_time=12.5]

With `libtpu` installed (`pip install -e ".[tpu-aot]"`), JAX describes any TPU topology on a
CPU-only machine; the same jitted train step as train.py (same TrainState, shardings, model code)
is lowered from abstract shapes and compiled by the real TPU compiler. Reported, per chip:
arguments (params, optimizer state, biases, batch), outputs, temporaries and their sum against
HBM (exit status 1 when it does not fit, also when the compiler itself refuses); FLOPs per step
of the compiled matmuls, with loop trip counts applied (XLA's cost analysis, shown beside it,
counts a scanned layer stack's body once); a roofline lower bound on step time —
max(FLOPs / peak bf16 FLOP/s, (argument + output bytes) / HBM bandwidth) — and the MFU a
measured step time implies; the compiled collectives by kind with their bytes per step.

Topology names are libtpu's: v4:AxBxC, v5e:AxB, v5p:AxBxC, v6e:AxB (e.g. v5p:2x2x1, v5e:4x4,
v6e:16x16, v5p:8x8x16). On v4 libtpu lists each chip's two TensorCores as two devices; the
mesh then counts devices, and each device gets half the chip's HBM and peak.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import time
from typing import Any

from absl import app, flags
from ml_collections import config_flags

GiB = 2**30
# The compile target is a described topology, not an attached TPU: keep JAX's own backend on
# the CPU (no TPU initialization, no libtpu lockfile shared with other processes).
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip figures (Cloud TPU documentation)."""

    name: str
    peak_bf16_flops: float  # FLOP/s
    hbm_bytes: int
    hbm_bandwidth: float  # bytes/s


CHIPS = {
    "v4": Chip("TPU v4", 275e12, 32 * GiB, 1.2e12),
    "v5e": Chip("TPU v5e", 197e12, 16 * GiB, 0.819e12),
    "v5p": Chip("TPU v5p", 459e12, int(95.74 * GiB), 2.765e12),  # as libtpu reports
    "v6e": Chip("TPU v6e", 918e12, int(31.25 * GiB), 1.64e12),  # as libtpu reports
}
_TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})$")


def parse_topology(name: str) -> tuple[Chip, int]:
    """(chip, number of chips) for a libtpu topology name; ValueError listing what is allowed."""
    m = _TOPOLOGY.match(name or "")
    if not m:
        raise ValueError(f"unknown topology {name!r}; allowed: <generation>:<AxB[xC]> with "
                         f"generation one of {sorted(CHIPS)}, e.g. v5p:2x2x1, v5e:4x4, "
                         "v6e:16x16, v5p:8x8x16")
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

    def __init__(self, message: str, model):
        super().__init__(message)
        self.model = model
        m = re.search(r"required for (.+?) \(([\d.]+)([KMGTP]?)\) exceeds available HBM "
                      r"\(([\d.]+)([KMGTP]?)\)", message)
        unit = lambda u: 1024 ** "_KMGTP".find(u or "_") if u else 1
        self.what = m.group(1) if m else "buffers"
        self.required = float(m.group(2)) * unit(m.group(3)) if m else None
        self.available = float(m.group(4)) * unit(m.group(5)) if m else None


def compile_train_step(config, devices: list):
    """Lowers and compiles train.py's step for `devices` from abstract shapes.

    Returns (compiled, model ModelConfig, mesh, seconds to compile).
    Raises:
      ValueError: bad config or a mesh that does not match the devices (before compiling).
      CompilerOutOfMemory: the compiler's own HBM check failed.
    """
    import jax

    from dsv3_jax.training import run_config
    from sharding import mesh as mesh_lib
    from sharding import state as sharding_state

    model = run_config.model_config(config)
    run_config.check_run(config)
    run_config.check_mesh(config, len(devices), model)
    mesh = mesh_lib.make_mesh({a: config.mesh[a] for a in mesh_lib.AXES}, devices=devices)
    placed = sharding_state.place_train_step(model, config, mesh)
    args = (placed.abstract_state,
            jax.ShapeDtypeStruct((config.batch_size, config.seq_len + 1), jax.numpy.int32,
                                 sharding=placed.batch_sharding))
    start = time.perf_counter()
    with sharding_state.use_mesh(mesh, config.mesh.layout):
        lowered = placed.step.lower(*args)
        try:
            compiled = lowered.compile()
        except Exception as e:  # XlaRuntimeError: RESOURCE_EXHAUSTED
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            raise CompilerOutOfMemory(str(e).splitlines()[0], model) from None
    return compiled, model, mesh, time.perf_counter() - start


def analyze(compiled, config, model, chip: Chip, chips: int, devices: int,
            hbm_bytes: float | None = None, step_time: float | None = None) -> dict[str, Any]:
    """The report: memory per device, FLOPs, roofline, MFU, collectives (JSON-able)."""
    from dsv3_jax.accounting import flops_per_token
    from sharding.hlo_stats import matmul_flops, summarize

    per_chip = devices // chips  # TensorCores listed as devices per chip (2 on v4)
    hbm = hbm_bytes if hbm_bytes is not None else chip.hbm_bytes / per_chip
    peak, bandwidth = chip.peak_bf16_flops / per_chip, chip.hbm_bandwidth / per_chip
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
    roofline = max(compute_s, memory_s)
    tokens = config.batch_size * config.seq_len
    model_flops = flops_per_token(model, config.seq_len) * tokens
    report = {
        "topology_chips": chips, "devices": devices, "chip": chip.name,
        "mesh": {k: int(v) for k, v in config.mesh.items() if k != "layout"},
        "layout": config.mesh.layout,
        "model": {"remat_policy": model.remat_policy, "dtype": model.dtype,
                  "param_dtype": model.param_dtype},
        "batch": [config.batch_size, config.seq_len],
        "memory_per_device_bytes": {**memory, "total": total},
        "hbm_per_device_bytes": hbm,
        "fits": total <= hbm,
        "headroom_bytes": hbm - total,
        "flops_per_device": flops,
        "flops_per_step": flops * devices,
        "model_flops_per_step": model_flops,
        "xla_cost_analysis_flops_per_device": float(cost.get("flops", 0.0)),
        "roofline_step_seconds": roofline,
        "roofline_bound": "compute" if compute_s >= memory_s else "memory",
        "mfu_at_roofline": model_flops / (devices * peak * roofline) if roofline else None,
        "collectives": {k: {"count": c.count, "bytes_per_step": c.bytes}
                        for k, c in summarize(hlo).items()},
    }
    if step_time:
        report["measured_step_seconds"] = step_time
        report["mfu_at_measured"] = model_flops / (devices * peak * step_time)
    return report


def format_report(r: dict[str, Any]) -> str:
    mem = r["memory_per_device_bytes"]
    mesh = " x ".join(f"{a}={n}" for a, n in r["mesh"].items() if n != 1) or "1 device"
    lines = [f"{r['chip']} x {r['topology_chips']} chips ({r['devices']} devices), mesh {mesh}, "
             f"layout {r['layout']}, batch {r['batch'][0]} x {r['batch'][1]}, "
             f"dtype {r['model']['dtype']}, remat {r['model']['remat_policy']}",
             "memory per device:"]
    for key, value in mem.items():
        lines.append(f"  {key:<32} {value / GiB:10.3f} GiB")
    verdict = "fits" if r["fits"] else "DOES NOT FIT"
    lines.append(f"  {'HBM':<32} {r['hbm_per_device_bytes'] / GiB:10.3f} GiB  -> {verdict} "
                 f"({abs(r['headroom_bytes']) / GiB:.2f} GiB "
                 f"{'to spare' if r['fits'] else 'over'})")
    lines += [f"FLOPs per step: {r['flops_per_step']:.4g} compiled matmuls "
              f"({r['flops_per_device']:.4g} per device); model (6·active + attention) "
              f"{r['model_flops_per_step']:.4g}",
              f"roofline step time: {r['roofline_step_seconds'] * 1e3:.2f} ms "
              f"({r['roofline_bound']}-bound); MFU at roofline "
              f"{(r['mfu_at_roofline'] or 0) * 100:.1f}%"]
    if "mfu_at_measured" in r:
        lines.append(f"MFU at the measured {r['measured_step_seconds']:.3f} s/step: "
                     f"{r['mfu_at_measured'] * 100:.1f}%")
    lines.append("collectives per step (per device):")
    for kind, c in r["collectives"].items() or {}:
        lines.append(f"  {kind:<20} {c['count']:6d} ops {c['bytes_per_step'] / 2**20:12.2f} MiB")
    if not r["collectives"]:
        lines.append("  none")
    return "\n".join(lines)


_CONFIG = config_flags.DEFINE_config_file("config", None, "run config file (configs/*.py)")
flags.DEFINE_string("topology", None, "libtpu topology name, e.g. v5p:2x2x1, v5e:4x4, v6e:4x4")
flags.DEFINE_float("hbm_gib", None, "HBM budget per device in GiB (default: the chip's)")
flags.DEFINE_float("step_time", None, "a measured step time in seconds, for its MFU")
flags.DEFINE_bool("json", False, "print one JSON object instead of the table")


def main(argv) -> None:
    del argv
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/tiny.py")
    try:
        chip, chips = parse_topology(flags.FLAGS.topology)
        devices = tpu_devices(flags.FLAGS.topology)
        compiled, model, _, seconds = compile_train_step(config, devices)
    except ValueError as e:
        print(f"sharding.aot: error: {e}", file=sys.stderr)
        sys.exit(2)
    except CompilerOutOfMemory as e:
        report = {"fits": False, "topology_chips": chips, "devices": len(devices),
                  "compiler_message": str(e), "over_hbm": e.what,
                  "required_bytes": e.required, "available_bytes": e.available}
        if flags.FLAGS.json:
            print(json.dumps(report))
        else:
            need = f"{e.required / GiB:,.1f} GiB" if e.required else "?"
            print(f"DOES NOT FIT: the TPU compiler needs {need} for {e.what} per device; "
                  f"HBM holds {(e.available or chip.hbm_bytes) / GiB:.2f} GiB.\n"
                  f"  ({e})\nTry more devices on the memory-heavy axes (fsdp, expert), "
                  "--config.model.remat_policy=full, --config.model.dtype=bfloat16, a smaller "
                  "--config.batch_size, or --config.model.capacity_factor for bounded expert "
                  "buffers.")
        sys.exit(1)
    hbm = None if flags.FLAGS.hbm_gib is None else flags.FLAGS.hbm_gib * GiB
    report = analyze(compiled, config, model, chip, chips, len(devices), hbm,
                     flags.FLAGS.step_time)
    report["compile_seconds"] = seconds
    print(json.dumps(report) if flags.FLAGS.json else
          format_report(report) + f"\ncompiled in {seconds:.1f} s")
    sys.exit(0 if report["fits"] else 1)


if __name__ == "__main__":
    app.run(main)
