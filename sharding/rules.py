"""Layouts: named rule sets mapping the model's logical axis names to mesh axes.

The model names every parameter axis (vocab, embed, heads, q_lora, kv_lora, qk_nope, qk_rope,
v_head, mlp, expert, layers) and every activation constraint (batch, length, embed, heads, mlp);
a layout says which mesh axes each name is split over, separately for

  params      parameters and their gradients
  opt_state   optimizer moments (ZeRO-1 splits only these over the data-like axes)
  activations the `nn.with_logical_constraint` calls inside the model (flax resolves these)

Rules are resolved in order: for each rule, every still-unassigned dimension with that logical
name takes the rule's mesh axes minus those the array already uses and those of size 1 (axes
after the first are dropped from the end while they do not divide the size); a dimension its
first axis does not divide is an error naming the array (`spec_for`). So one
layout serves every mesh: axes of size 1 vanish from the specs.

Presets (all: batch over data × fsdp × expert, heads/mlp/vocab over tensor, experts over expert,
and the state split over pipe along embed / q_lora / kv_lora when pipelining):
  dp      parameters and optimizer state replicated over the data-like axes
  fsdp    (default) parameters, gradients and optimizer state split over fsdp (and, for
          non-expert weights, expert) along embed, else q_lora, else kv_lora (ZeRO-3)
  zero1   DeepSeek-V3's layout: parameters and gradients as `dp`, optimizer state split over
          data × fsdp × expert along embed / q_lora / kv_lora (ZeRO-1)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

from jax.sharding import PartitionSpec

from sharding.mesh import BATCH_AXES

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

# Which ModelConfig field sets the size of each logical axis: for error messages.
FIELD_OF = {"vocab": "vocab_size", "embed": "hidden_size", "heads": "num_attention_heads",
            "q_lora": "q_lora_rank", "kv_lora": "kv_lora_rank", "expert": "n_routed_experts",
            "mlp": "intermediate_size / moe_intermediate_size", "layers": "num_hidden_layers",
            "batch": "batch_size"}

_EXPERTS: Rules = (("expert", "expert"),)  # first, so experts claim `expert` before ZeRO does
_TENSOR: Rules = (("heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"))
# ZeRO-3: every weight split over fsdp along its first of embed / q_lora / kv_lora, and over the
# expert axis too for non-expert weights (EP ranks are data-parallel ranks for attention and dense
# layers, as in V3), where the size divides.
# With pipelining (mesh.pipe > 1) the state is also split over the pipe ranks, ZeRO-3 style:
# each step gathers a rank's stages from it (sharding/pipeline/stages.py), so no rank keeps a
# full copy of the other stages' parameters or moments. pipe = 1 drops out of every spec.
_ZERO3: Rules = (("embed", ("fsdp", "expert", "pipe")), ("q_lora", ("fsdp", "expert", "pipe")),
                 ("kv_lora", ("fsdp", "expert", "pipe")))
_ZERO1: Rules = (("embed", BATCH_AXES + ("pipe",)), ("q_lora", BATCH_AXES + ("pipe",)),
                 ("kv_lora", BATCH_AXES + ("pipe",)))
_PIPE: Rules = (("embed", "pipe"), ("q_lora", "pipe"), ("kv_lora", "pipe"))
ACTIVATIONS: Rules = (("batch", BATCH_AXES),) + _TENSOR + _EXPERTS


@dataclasses.dataclass(frozen=True)
class Layout:
    """A named set of logical → mesh rules for parameters, optimizer state and activations."""

    name: str
    params: Rules
    opt_state: Rules
    activations: Rules = ACTIVATIONS


LAYOUTS: dict[str, Layout] = {
    "dp": Layout("dp", _EXPERTS + _TENSOR + _PIPE, _EXPERTS + _TENSOR + _PIPE),
    "fsdp": Layout("fsdp", _EXPERTS + _TENSOR + _ZERO3, _EXPERTS + _TENSOR + _ZERO3),
    "zero1": Layout("zero1", _EXPERTS + _TENSOR + _PIPE, _EXPERTS + _TENSOR + _ZERO1),
}
DEFAULT_LAYOUT = "fsdp"


def get_layout(name: str | Layout) -> Layout:
    if isinstance(name, Layout):
        return name
    if name not in LAYOUTS:
        raise ValueError(f"unknown sharding layout {name!r}; allowed: {sorted(LAYOUTS)}")
    return LAYOUTS[name]


def spec_for(logical: Sequence[str | None], shape: Sequence[int], rules: Rules,
             mesh_shape: Mapping[str, int], name: str = "array") -> PartitionSpec:
    """The PartitionSpec of one array from its logical axis names.

    Args:
      logical: one logical name (or None) per dimension.
      shape: the array's global shape.
      rules: (logical name, mesh axes) pairs, highest priority first.
      mesh_shape: {mesh axis: size}.
      name: what to call the array in errors (its path in the parameter tree).
    Raises:
      ValueError: a dimension that its mesh axes do not divide (names the array, the dimension,
        the ModelConfig field behind it and the mesh axes).
    """
    if len(logical) != len(shape):
        raise ValueError(f"{name}: {len(logical)} logical names {tuple(logical)} for shape "
                         f"{tuple(shape)}")
    assigned: list[MeshAxes] = [None] * len(shape)
    used: set[str] = set()
    for rule_name, axes in rules:
        wanted = (axes,) if isinstance(axes, str) else tuple(axes or ())
        for dim, logical_name in enumerate(logical):
            if logical_name != rule_name or assigned[dim] is not None:
                continue
            chosen = tuple(a for a in wanted if a not in used and mesh_shape.get(a, 1) > 1)
            # Axes after the first are opportunistic: drop them from the end until it divides.
            while len(chosen) > 1 and shape[dim] % math.prod(mesh_shape[a] for a in chosen):
                chosen = chosen[:-1]
            if not chosen:
                continue
            ways = math.prod(mesh_shape[a] for a in chosen)
            if shape[dim] % ways:
                field = FIELD_OF.get(logical_name, logical_name)
                raise ValueError(
                    f"{name}: dimension {dim} ('{logical_name}', size {shape[dim]}, set by "
                    f"ModelConfig.{field}) is not divisible by mesh axes "
                    f"{' x '.join(f'{a}={mesh_shape[a]}' for a in chosen)} = {ways}; choose "
                    "mesh sizes that divide it")
            assigned[dim] = chosen[0] if len(chosen) == 1 else chosen
            used.update(chosen)
    return PartitionSpec(*assigned)


def check_model_fits(config, mesh_shape: Mapping[str, int]) -> None:
    """Early, readable errors for a ModelConfig that a mesh cannot split (before any tracing).

    Checks the sizes the tensor and expert axes always split: heads, experts, vocab, both MLP
    widths. (`spec_for` catches everything else, per array, when shardings are computed.)
    """
    tensor, expert = mesh_shape.get("tensor", 1), mesh_shape.get("expert", 1)
    checks = [("num_attention_heads", tensor, "tensor"), ("vocab_size", tensor, "tensor"),
              ("intermediate_size", tensor, "tensor"),
              ("moe_intermediate_size", tensor, "tensor"),
              ("n_routed_experts", expert, "expert")]
    for field, ways, axis in checks:
        value = getattr(config, field)
        if value % ways:
            raise ValueError(f"ModelConfig.{field}={value} is not divisible by mesh.{axis}="
                             f"{ways}; choose a mesh.{axis} that divides it")
