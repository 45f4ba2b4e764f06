"""Placement: abstract shapes → shardings → `jit(init, out_shardings=…)`, and tracing under a
mesh.

The parameters (and any state built from them, e.g. a TrainState with optimizer moments) are
first traced with `jax.eval_shape`, which allocates nothing; the logical axis names that
`nn.with_logical_partitioning` attached to every parameter become PartitionSpecs through a
layout (`sharding.rules`); then the init function is jitted with those output shardings, so
each device computes only its own shard and no full copy ever exists on one device or the host.
That holds because the model's parameter boxes constrain nothing when unboxed
(`dsv3_jax.layers.logically_partitioned`): traced under `use_mesh`, flax would otherwise pin
each fresh parameter to the activation rules' (gathered) layout, and each scanned stack would
be built whole on every device inside its loop (tests/test_sharding_mesh.py checks the compiled
init's memory).

Which rules apply to a leaf: `layout.opt_state` for leaves under a key named `opt_state` (a
TrainState field or dict key), `layout.params` for every other boxed leaf. Leaves without
logical names (step counters, RNG keys, the `moe_bias` correction biases, expert counts) are
replicated: they are small and global by design.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dsv3_jax import moe
from dsv3_jax.config import ModelConfig
from dsv3_jax.model import DeepSeekV3
from sharding.expert_parallel import routed_experts
from sharding.mesh import batch_shards
from sharding.rules import Layout, check_model_fits, get_layout, spec_for

OPT_STATE_KEY = "opt_state"


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.Partitioned)


def key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_name(path: tuple) -> str:
    """'params/moe_layers/mlp/experts/gate_proj/kernel' for a tree path."""
    return "/".join(key_name(k) for k in path)


def tree_specs(abstract: Any, mesh_shape: dict[str, int], layout: str | Layout) -> Any:
    """PartitionSpecs for a (boxed, abstract) tree, in the structure of its unboxed form.

    Args:
      abstract: the output of `jax.eval_shape` of an init function, with flax boxes.
      mesh_shape: {mesh axis: size}.
      layout: a layout or its name.
    Raises:
      ValueError: a dimension its mesh axes do not divide (names the leaf's path).
    """
    layout = get_layout(layout)

    def spec(path, leaf):
        if not _is_box(leaf):
            return P()
        names = [key_name(k) for k in path]
        rules = layout.opt_state if OPT_STATE_KEY in names else layout.params
        return spec_for(leaf.names, leaf.value.shape, rules, mesh_shape, name=path_name(path))

    return jax.tree_util.tree_map_with_path(spec, abstract, is_leaf=_is_box)


def tree_shardings(abstract: Any, mesh: Mesh, layout: str | Layout) -> Any:
    """NamedShardings for a (boxed, abstract) tree on `mesh` (see `tree_specs`)."""
    specs = tree_specs(abstract, dict(mesh.shape), layout)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, P))


@contextlib.contextmanager
def use_mesh(mesh: Mesh, layout: str | Layout):
    """Trace under `mesh` with the layout's activation rules and the expert-parallel strategy:
    what makes the model's logical constraints bind and its MoE layers run expert-parallel."""
    with (jax.set_mesh(mesh), nn.logical_axis_rules(get_layout(layout).activations),
          moe.expert_parallel(routed_experts)):
        yield


def on_mesh(fn: Callable, mesh: Mesh, layout: str | Layout) -> Callable:
    """`fn` (typically jitted) called under `use_mesh`, so it traces under the mesh.

    Preferred to setting the mesh globally: outside these calls, eager code (e.g. the model
    applied outside jit) must not see logical rules it would try to apply as constraints.
    """
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with use_mesh(mesh, layout):
            return fn(*args, **kwargs)

    return wrapped


def state_shardings(abstract: Any, param_specs: Any, mesh: Mesh, layout: str | Layout) -> Any:
    """Shardings for an unboxed tree holding parameter-shaped leaves (e.g. a TrainState).

    A leaf whose path ends with a parameter's path and has that parameter's shape is split like
    it: by `layout.opt_state` when under `opt_state` (optimizer moments, however deeply optax
    nests them), else by `layout.params`. Everything else (step, RNG, correction biases,
    optimizer counters) is replicated.

    Args:
      abstract: the state's ShapeDtypeStructs (no flax boxes needed).
      param_specs: the parameters' logical PartitionSpecs (`nn.get_partition_spec` of the boxed
        parameters), paths relative to the parameter root.
    """
    layout = get_layout(layout)
    shape = dict(mesh.shape)
    logical = {}
    for path, spec in jax.tree_util.tree_leaves_with_path(
            param_specs, is_leaf=lambda x: isinstance(x, P)):
        logical[tuple(key_name(k) for k in path)] = tuple(spec)

    def sharding(path, leaf):
        keys = tuple(key_name(k) for k in path)
        for start in range(len(keys)):
            names = logical.get(keys[start:])
            if names is not None and len(names) == len(leaf.shape):
                rules = layout.opt_state if OPT_STATE_KEY in keys[:start] else layout.params
                spec = spec_for(names, leaf.shape, rules, shape, name=path_name(path))
                return NamedSharding(mesh, spec)
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(sharding, abstract)


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying their target shardings (what orbax restores onto)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


def create_sharded(init_fn: Callable[..., Any], mesh: Mesh, layout: str | Layout,
                   *args) -> Any:
    """Runs `init_fn(*args)` directly into its shardings; returns the unboxed tree.

    `init_fn` returns a tree that may hold flax boxes (model.init output, or a TrainState built
    from boxed params). It is traced under the mesh and the layout's activation rules, so the
    model's own constraints and expert parallelism see the same mesh as training will.
    """
    return on_mesh(sharded_init(init_fn, mesh, layout, *args), mesh, layout)(*args)


def sharded_init(init_fn: Callable[..., Any], mesh: Mesh, layout: str | Layout,
                 *args) -> Callable:
    """The jitted `init_fn` that `create_sharded` runs: unboxed output straight into the
    layout's shardings (to call, lower or compile under `use_mesh(mesh, layout)`); `args`
    (or their ShapeDtypeStructs) fix the shapes its shardings are computed from."""
    layout = get_layout(layout)
    with use_mesh(mesh, layout):
        abstract = jax.eval_shape(init_fn, *args)
        shardings = tree_shardings(abstract, mesh, layout)
    return jax.jit(lambda *a: nn.unbox(init_fn(*a)), out_shardings=shardings)


def model_init_fn(config: ModelConfig, batch: int = 1, length: int = 8) -> Callable:
    """rng → boxed {'params', 'moe_bias'} of DeepSeekV3(config) (traced on a dummy batch)."""
    tokens = jnp.zeros((batch, length), jnp.int32)
    return lambda rng: DeepSeekV3(config).init(rng, tokens)


def init_model_variables(config: ModelConfig, rng: jax.Array, mesh: Mesh,
                         layout: str | Layout = "fsdp") -> dict:
    """The model's variables, initialized shard by shard on `mesh`.

    The dummy batch has one row per batch shard, so the model's batch constraints divide it.

    Raises:
      ValueError: the mesh cannot split the model (before anything is traced or compiled).
    """
    check_model_fits(config, dict(mesh.shape))
    return create_sharded(model_init_fn(config, batch_shards(mesh)), mesh, layout, rng)
