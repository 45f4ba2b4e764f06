r"""Compile train.py's step for an unattached TPU slice: per-chip memory, FLOPs, collectives.

    python -m sharding.aot --config=configs/deepseek_v3_671b.py --topology=v5p:8x8x16 \
        --config.mesh.expert=64 --config.mesh.data=-1 [--json] [--hbm_gib=95] [--step_time=12.5]

An entry point, like train.py: it composes the training layer (the run config's checks, the
TrainState and the placed train step of `dsv3_jax.training`) with the placement library
(`sharding.tpu` describes the slice and reads the compiled program). Nothing in `sharding/`
imports this module. The very step train.py runs (same TrainState, shardings, model code) is
lowered from abstract shapes and compiled by the real TPU compiler (needs libtpu:
`pip install -e ".[tpu-aot]"`). Exit status 0 when the program fits in HBM, 1 when it does not
(also when the compiler itself refuses), 2 on bad input. See `sharding.tpu` for what the report
holds and the topology names.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from absl import app, flags
from ml_collections import config_flags

# The compile target is a described topology, not an attached TPU: keep JAX's own backend on
# the CPU (no TPU initialization, no libtpu lockfile shared with other processes).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from dsv3_jax import cli  # noqa: E402
from dsv3_jax.accounting import flops_per_token  # noqa: E402
from dsv3_jax.training import run_config  # noqa: E402
from dsv3_jax.training.placed_step import place_train_step  # noqa: E402
from sharding import mesh as mesh_lib  # noqa: E402
from sharding import placement, tpu  # noqa: E402

GiB = tpu.GiB


def compile_train_step(config, devices: list):
    """Lowers and compiles train.py's step for `devices` from abstract shapes.

    Returns (compiled, model ModelConfig, mesh, seconds to compile).
    Raises:
      ValueError: bad config or a mesh that does not match the devices (before compiling).
      tpu.CompilerOutOfMemory: the compiler's own HBM check failed.
    """
    import jax

    model = run_config.model_config(config)
    run_config.check_run(config)
    run_config.check_mesh(config, len(devices), model)
    mesh = mesh_lib.make_mesh({a: config.mesh[a] for a in mesh_lib.AXES}, devices=devices)
    placed = place_train_step(model, config, mesh)
    args = (placed.abstract_state,
            jax.ShapeDtypeStruct((config.batch_size, config.seq_len + 1), jax.numpy.int32,
                                 sharding=placed.batch_sharding))
    start = time.perf_counter()
    with placement.use_mesh(mesh, config.mesh.layout):
        compiled = tpu.compile_lowered(placed.step.lower(*args))
    return compiled, model, mesh, time.perf_counter() - start


def analyze(compiled, config, model, chip: tpu.Chip, chips: int, devices: int,
            hbm_bytes: float | None = None, step_time: float | None = None) -> dict[str, Any]:
    """`tpu.cost_report` of the compiled step, with the run's mesh, batch and model settings."""
    model_flops = flops_per_token(model, config.seq_len) * config.batch_size * config.seq_len
    return {
        **tpu.cost_report(compiled, chip, chips, devices, model_flops, hbm_bytes, step_time),
        "mesh": {k: int(v) for k, v in config.mesh.items() if k != "layout"},
        "layout": config.mesh.layout,
        "model": {"remat_policy": model.remat_policy, "dtype": model.dtype,
                  "param_dtype": model.param_dtype},
        "batch": [config.batch_size, config.seq_len],
    }


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
    comm = r["communication_seconds"]
    ms = lambda seconds: f"{seconds * 1e3:,.3f} ms"
    pct = lambda mfu: f"{(mfu or 0) * 100:.1f}%"
    lines += [f"FLOPs per step: {r['flops_per_step']:.4g} compiled matmuls "
              f"({r['flops_per_device']:.4g} per device); model (6·active + attention) "
              f"{r['model_flops_per_step']:.4g}",
              f"step time terms: compute {ms(r['compute_seconds'])}, HBM "
              f"{ms(r['memory_seconds'])}, communication {ms(comm['total'])} (at "
              f"{r['ici_bandwidth_per_device'] / 1e9:.0f} GB/s ICI per device, one direction)",
              f"roofline, overlapped = max(compute, HBM, communication): "
              f"{ms(r['roofline_overlapped_step_seconds'])} ({r['roofline_bound']}-bound), "
              f"MFU {pct(r['mfu_overlapped'])}",
              f"roofline, exposed = max(compute, HBM) + communication: "
              f"{ms(r['roofline_exposed_step_seconds'])}, MFU {pct(r['mfu_exposed'])}"]
    if "mfu_at_measured" in r:
        lines.append(f"MFU at the measured {r['measured_step_seconds']:.3f} s/step: "
                     f"{r['mfu_at_measured'] * 100:.1f}%")
    lines.append(f"{'collectives per step (per device):':<35} {'ops':>8} {'result MiB':>12} "
                 f"{'link MiB':>12} {'ICI ms':>10}")
    # Expert all-to-alls and pipeline permutes first, then the ZeRO/data-parallel collectives;
    # every kind is listed, so a missing pipeline permute shows as 0.
    for kind in ("all-to-all", "ragged-all-to-all", "collective-permute", "all-gather",
                 "reduce-scatter", "all-reduce"):
        c = r["collectives"].get(kind, {"count": 0, "bytes_per_step": 0})
        lines.append(f"  {kind:<33} {c['count']:8d} {c['bytes_per_step'] / 2**20:12.2f} "
                     f"{r['link_bytes_per_step'][kind] / 2**20:12.2f} {comm[kind] * 1e3:10.3f}")
    return "\n".join(lines)


def _refused(e: tpu.CompilerOutOfMemory, chip: tpu.Chip, chips: int, devices: int) -> str:
    if flags.FLAGS.json:
        return json.dumps({"fits": False, "topology_chips": chips, "devices": devices,
                           "compiler_message": str(e), "over_hbm": e.what,
                           "required_bytes": e.required, "available_bytes": e.available})
    need = f"{e.required / GiB:,.1f} GiB" if e.required else "?"
    return (f"DOES NOT FIT: the TPU compiler needs {need} for {e.what} per device; "
            f"HBM holds {(e.available or chip.hbm_bytes) / GiB:.2f} GiB.\n"
            f"  ({e})\nTry more devices on the memory-heavy axes (fsdp, expert), "
            "--config.model.remat_policy=full, --config.model.dtype=bfloat16, a smaller "
            "--config.batch_size, or --config.model.capacity_factor for bounded expert buffers.")


def main(argv) -> None:
    del argv
    config = _CONFIG.value
    try:
        if config is None:
            raise ValueError("--config is required, e.g. --config=configs/tiny.py")
        if flags.FLAGS.topology is None:
            raise ValueError(f"--topology is required (e.g. {tpu.EXAMPLES.split(',')[0]})")
        chip, chips = tpu.parse_topology(flags.FLAGS.topology)
        devices = tpu.tpu_devices(flags.FLAGS.topology)
        compiled, model, _, seconds = compile_train_step(config, devices)
    except ValueError as e:
        cli.fail("sharding.aot", str(e))
    except tpu.CompilerOutOfMemory as e:
        print(_refused(e, chip, chips, len(devices)))
        sys.exit(1)
    if flags.FLAGS.hlo_out:  # the compiled program, for hlo_stats or a closer look
        with open(flags.FLAGS.hlo_out, "w") as f:
            f.write(compiled.as_text())
    hbm = None if flags.FLAGS.hbm_gib is None else flags.FLAGS.hbm_gib * GiB
    report = analyze(compiled, config, model, chip, chips, len(devices), hbm,
                     flags.FLAGS.step_time)
    report["compile_seconds"] = seconds
    print(json.dumps(report) if flags.FLAGS.json else
          format_report(report) + f"\ncompiled in {seconds:.1f} s")
    sys.exit(0 if report["fits"] else 1)


if __name__ == "__main__":
    # Flags are defined only when run as a command, so importing this module claims none.
    _CONFIG = config_flags.DEFINE_config_file("config", None, "run config file (configs/*.py)")
    flags.DEFINE_string("topology", None, f"libtpu topology name, e.g. {tpu.EXAMPLES}")
    flags.DEFINE_float("hbm_gib", None, "HBM budget per device in GiB (default: the chip's)")
    flags.DEFINE_float("step_time", None, "a measured step time in seconds, for its MFU")
    flags.DEFINE_bool("json", False, "print one JSON object instead of the table")
    flags.DEFINE_string("hlo_out", None, "write the compiled HLO text to this file")
    app.run(main, flags_parser=cli.flags_parser("sharding.aot"))
