"""Per-device memory plan from abstract shapes only: `python -m sharding.plan`.

  python -m sharding.plan --config=configs/deepseek_v3_671b.py --config.mesh.expert=64 \\
      --config.mesh.pipe=16 --config.mesh.data=-1 --config.mesh.layout=zero1 --devices=2048
  python -m sharding.plan --preset=deepseek-v3-671b --mesh=expert=64,pipe=16,data=-1 \\
      --devices=2048 --layout=zero1

Prints the bytes each device holds for parameters, gradients and AdamW state (two moments per
parameter, in the parameter dtype), the largest per-device tensors, and any tensor above a
threshold that the layout leaves replicated on every device. Nothing is allocated: shapes come
from `jax.eval_shape` of the model's and the optimizer's init, shardings from the layout.

With mesh.pipe > 1 the figures are what `sharding.pipeline` holds: the parameters, gradients
and optimizer state split over pipe too (the layouts' ZeRO-3-style pipe rule: each step gathers
a rank's stages from them), and each rank adds its stages' gathered copies
(`stage_params`: chunks × the most layers a stage has, padded slots included — DualPipe's second
copy of every stage, DualPipeV's two V stages) and their gradient accumulators (`stage_grads`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import optax
from absl import app
from absl import flags as absl_flags
from jax.sharding import PartitionSpec as P

from dsv3_jax import cli
from dsv3_jax.config import ModelConfig
from sharding import mesh as mesh_lib
from sharding import pipeline, placement
from sharding.pipeline import stages
from sharding.rules import check_model_fits, get_layout

GiB = 2**30


def _ways(spec_entry, mesh_shape: Mapping[str, int]) -> int:
    axes = (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry or ())
    return math.prod(mesh_shape[a] for a in axes)


def shard_bytes(leaf: Any, spec: P, mesh_shape: Mapping[str, int]) -> int:
    """Bytes of one device's shard of `leaf` (an array or ShapeDtypeStruct) under `spec`."""
    dims = list(spec) + [None] * (len(leaf.shape) - len(spec))
    shard = [n // _ways(s, mesh_shape) for n, s in zip(leaf.shape, dims, strict=True)]
    return math.prod(shard) * jax.numpy.dtype(leaf.dtype).itemsize


def _pairs(tree: Any, specs: Any) -> list[tuple[str, Any, P]]:
    """(path, leaf, spec) for every leaf of an unboxed tree and its matching spec tree."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    return [(placement.path_name(p), leaf, s) for (p, leaf), s in zip(leaves, spec_leaves,
                                                                   strict=True)]


def per_device_bytes(tree: Any, specs: Any, mesh_shape: Mapping[str, int]) -> int:
    """Bytes one device holds of an unboxed tree (every device holds the same)."""
    return sum(shard_bytes(leaf, s, mesh_shape) for _, leaf, s in _pairs(tree, specs))


def replicated_above(tree: Any, specs: Any, threshold: int) -> list[tuple[str, int]]:
    """(path, bytes) of the leaves larger than `threshold` bytes split over no mesh axis."""
    out = []
    for path, leaf, spec in _pairs(tree, specs):
        size = math.prod(leaf.shape) * jax.numpy.dtype(leaf.dtype).itemsize
        if size > threshold and not any(spec):
            out.append((path, size))
    return out


def check_sharded(tree: Any, specs: Any, threshold: int) -> None:
    """Raises ValueError naming every leaf above `threshold` bytes left fully replicated."""
    found = replicated_above(tree, specs, threshold)
    if found:
        names = ", ".join(f"{p} ({b} B)" for p, b in found)
        raise ValueError(f"replicated on every device although above {threshold} B: {names}")


def describe(tree: Any, specs: Any, mesh_shape: Mapping[str, int]) -> str:
    """One line per leaf: path, global shape, PartitionSpec, per-device shape (golden files)."""
    lines = []
    for path, leaf, spec in _pairs(tree, specs):
        dims = list(spec) + [None] * (len(leaf.shape) - len(spec))
        local = tuple(n // _ways(s, mesh_shape) for n, s in zip(leaf.shape, dims, strict=True))
        lines.append(f"{path} {tuple(leaf.shape)} {spec} -> {local}")
    return "\n".join(lines) + "\n"


def abstract_train_state(config: ModelConfig) -> Any:
    """Boxed abstract {'params', 'moe_bias', 'opt_state'} with AdamW state (no allocation)."""
    variables = jax.eval_shape(placement.model_init_fn(config), jax.random.key(0))
    opt_state = jax.eval_shape(optax.adamw(1e-3).init, variables["params"])
    return {**variables, placement.OPT_STATE_KEY: opt_state}


def stage_copy_bytes(config: ModelConfig, params: Any, specs: Any, mesh_shape, schedule_name: str,
                     microbatches: int, layers_per_stage=None) -> int:
    """Bytes one pipeline rank holds of its stages' stacked copies: for each scanned stack,
    chunks × slots layers of it (each layer's shard under the stack's spec, gathered over pipe:
    the state is split over pipe, a rank's stage copies are not)."""
    sched = pipeline.schedule(schedule_name, mesh_shape["pipe"], microbatches)
    stage_plan = stages.plan_stages(config, sched.num_stages, layers_per_stage)
    slots = {"dense_layers": stage_plan.dense_slots, "moe_layers": stage_plan.moe_slots}
    total = 0
    for stack, n in slots.items():
        if stack not in params:
            continue
        length = config.num_dense_layers if stack == "dense_layers" else config.num_moe_layers
        total += sched.chunks * n * per_device_bytes(params[stack], specs[stack],
                                                     {**mesh_shape, "pipe": 1}) // length
    return total


def make_plan(config: ModelConfig, mesh_config: Any, num_devices: int, layout: str = "fsdp",
              top: int = 8, replicated_threshold: int = 64 * 2**20, schedule: str = "1f1b",
              microbatches: int = 0, layers_per_stage=None) -> dict[str, Any]:
    """Per-device bytes of parameters, gradients and optimizer state on a mesh.

    Args:
      config: the model.
      mesh_config: mesh sizes (see the module docstring for pipe).
      num_devices: devices in the mesh (resolves a -1 size).
      layout: a `sharding.rules` layout name.
      top: how many of the largest per-device tensors to list.
      replicated_threshold: list tensors above this many bytes that no mesh axis splits.
      schedule, microbatches, layers_per_stage: the pipeline (mesh.pipe > 1; microbatches 0:
        2 × pipe).
    Returns:
      A JSON-able dict (bytes are per device).
    """
    shape = mesh_lib.mesh_shape(mesh_config, num_devices)
    check_model_fits(config, shape)
    abstract = abstract_train_state(config)
    specs = placement.tree_specs(abstract, shape, layout)
    tree = nn.unbox(abstract)
    pipe = shape["pipe"]
    parts = {"params": tree["params"], "grads": tree["params"],
             "opt_state": tree[placement.OPT_STATE_KEY], "moe_bias": tree["moe_bias"],
             "fp8_state": tree.get("fp8", {})}
    part_specs = {"params": specs["params"], "grads": specs["params"],
                  "opt_state": specs[placement.OPT_STATE_KEY], "moe_bias": specs["moe_bias"],
                  "fp8_state": specs.get("fp8", {})}
    per_device = {k: per_device_bytes(parts[k], part_specs[k], shape) for k in parts}
    if pipe > 1:
        copies = stage_copy_bytes(config, tree["params"], specs["params"], shape, schedule,
                                  microbatches or 2 * pipe, layers_per_stage)
        per_device.update(stage_params=copies, stage_grads=copies)
    params = _pairs(tree["params"], specs["params"])
    largest = sorted(((shard_bytes(leaf, s, shape), path, str(s))
                      for path, leaf, s in params), reverse=True)[:top]
    replicated = replicated_above(tree["params"], specs["params"], replicated_threshold)
    replicated += replicated_above(tree[placement.OPT_STATE_KEY], specs[placement.OPT_STATE_KEY],
                                   replicated_threshold)
    return {
        "mesh": shape, "devices": num_devices, "layout": get_layout(layout).name,
        "total_params": sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree["params"])),
        "per_device_bytes": {**per_device, "total": sum(per_device.values())},
        "largest_per_device": [{"path": p, "spec": s, "bytes": b} for b, p, s in largest],
        "replicated_above_threshold": [{"path": p, "bytes": b} for p, b in replicated],
    }


def format_plan(report: dict[str, Any], top: int = 8) -> str:
    mesh = " x ".join(f"{a}={n}" for a, n in report["mesh"].items())
    lines = [f"{report['total_params'] / 1e9:.2f}B parameters (incl. MTP) on "
             f"{report['devices']} devices ({mesh}), layout {report['layout']}",
             "per device:"]
    for key, value in report["per_device_bytes"].items():
        lines.append(f"  {key:<10} {value / GiB:10.3f} GiB")
    lines.append("largest per-device tensors:")
    for item in report["largest_per_device"]:
        lines.append(f"  {item['bytes'] / 2**20:10.1f} MiB  {item['path']}  {item['spec']}")
    replicated = sorted(report["replicated_above_threshold"], key=lambda x: -x["bytes"])
    if replicated:
        lines.append(f"replicated on every device (above threshold): {len(replicated)} tensors,"
                     f" {sum(x['bytes'] for x in replicated) / GiB:.2f} GiB; largest:")
        for item in replicated[:top]:
            lines.append(f"  {item['bytes'] / 2**20:10.1f} MiB  {item['path']}")
    return "\n".join(lines)


def _model_and_mesh(flags) -> tuple[ModelConfig, Any]:
    """From --config (a run config with .model and .mesh) or --preset and --mesh."""
    if flags.config is not None:
        return ModelConfig.from_dict(flags.config.model.to_dict()), flags.config.mesh
    mesh = {}
    for item in filter(None, flags.mesh.split(",")):
        axis, _, size = item.partition("=")
        mesh[axis.strip()] = int(size)
    return ModelConfig.preset(flags.preset), mesh


def main(argv) -> None:
    del argv
    flags = absl_flags.FLAGS
    try:
        config, mesh = _model_and_mesh(flags)
        sizes = [int(mesh.get(a, 1) if isinstance(mesh, dict) else getattr(mesh, a, 1))
                 for a in mesh_lib.AXES]
        if flags.devices is None and -1 in sizes:
            raise ValueError("a mesh size of -1 needs --devices")
        devices = flags.devices or math.prod(sizes)
        layout = (flags.layout or (getattr(mesh, "layout", None) if flags.config else None)
                  or "fsdp")
        if flags.config is not None:
            pipe_config = flags.config.pipeline
            schedule, microbatches = pipe_config.schedule, pipe_config.microbatches
            layers = pipe_config.layers_per_stage
        else:
            schedule, microbatches, layers = flags.schedule, flags.microbatches, None
        report = make_plan(config, mesh, devices, layout, schedule=schedule,
                           microbatches=microbatches,
                           layers_per_stage=None if layers is None else tuple(layers))
    except (TypeError, ValueError) as e:
        cli.fail("sharding.plan", str(e))
    print(json.dumps(report) if flags.json else format_plan(report))


if __name__ == "__main__":
    # Flags are defined only when run as a command: importing this module (tests, train.py)
    # must not claim --config.
    from ml_collections import config_flags

    flags = absl_flags
    config_flags.DEFINE_config_file("config", None, "run config file (configs/*.py)")
    flags.DEFINE_string("preset", "deepseek-v3-671b", "ModelConfig preset (without --config)")
    flags.DEFINE_string("mesh", "", "mesh sizes without --config, e.g. expert=64,pipe=16,data=2")
    flags.DEFINE_integer("devices", None, "device count (default: product of the mesh sizes)")
    flags.DEFINE_string("layout", None, "sharding layout: dp, fsdp or zero1 (default: the "
                        "config's mesh.layout, else fsdp)")
    flags.DEFINE_string("schedule", "1f1b", "pipeline schedule with pipe > 1 (without --config)")
    flags.DEFINE_integer("microbatches", 0, "pipeline micro-batches (0: 2 x pipe)")
    flags.DEFINE_bool("json", False, "print one JSON object instead of the table")
    app.run(main, flags_parser=cli.flags_parser("sharding.plan"))
