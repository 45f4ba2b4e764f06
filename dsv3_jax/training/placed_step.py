"""train.py's update step placed on a mesh: what train.py runs and `sharding.aot` compiles.

The training layer composes its pieces (optimizer, TrainState, the pure step function of
`step.py`) with the placement library (`sharding.placement`): state shardings from the
parameters' logical axes, batch sharding, a donated, jitted step. Call or lower the step under
`sharding.placement.use_mesh(mesh, config.mesh.layout)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import ml_collections
from jax.sharding import Mesh, NamedSharding

from dsv3_jax.config import ModelConfig
from dsv3_jax.training import run_config
from dsv3_jax.training import state as train_state
from dsv3_jax.training import step as train_step
from sharding.mesh import batch_sharding, batch_shards, replicated
from sharding.pipeline import executor
from sharding.placement import state_shardings, with_shardings


class PlacedTrainStep(NamedTuple):
    step: Callable  # jitted (state, tokens [B, T+1]) -> (state, metrics); state donated
    tx: Any  # the optimizer
    abstract_state: Any  # the TrainState's ShapeDtypeStructs, carrying their shardings
    shardings: Any  # the TrainState's NamedShardings
    batch_sharding: NamedSharding


def place_train_step(model: ModelConfig, config: ml_collections.ConfigDict,
                     mesh: Mesh) -> PlacedTrainStep:
    """Optimizer, state shardings and the jitted update step of a run config on `mesh`."""
    tx = train_state.make_optimizer(config, model)
    abstract = train_state.abstract_state(model, tx)
    shardings = state_shardings(abstract, train_state.param_partition_specs(model), mesh,
                                config.mesh.layout)
    batch = batch_sharding(mesh)
    grad_fn = pipelined_value_and_grad(model, config, mesh) if mesh.shape["pipe"] > 1 else None
    step = jax.jit(train_step.make_train_step(model, config, tx,
                                              train_state.make_schedule(config), grad_fn),
                   donate_argnums=0, in_shardings=(shardings, batch),
                   out_shardings=(shardings, replicated(mesh)))
    return PlacedTrainStep(step, tx, with_shardings(abstract, shardings), shardings, batch)


def pipelined_value_and_grad(model: ModelConfig, config: ml_collections.ConfigDict,
                             mesh: Mesh) -> Callable:
    """The step's loss and gradients through `config.pipeline`'s schedule over mesh.pipe
    (`sharding.pipeline.executor`), in the signature of `step.make_value_and_grad`."""
    schedule, plan = run_config.pipeline_plan(config, mesh.shape["pipe"], model,
                                              batch_shards(mesh))
    fn = executor.value_and_grad(model, schedule, plan, train_step.make_objective(config),
                                 config.balance_loss_alpha, mesh)

    def value_and_grad(params, fp8_state, moe_bias, tokens):
        value, grads = fn(params, moe_bias["e_score_correction_bias"], tokens)
        return value, (grads, {})  # no FP8 scaling state: delayed FP8 is refused with pipe

    return value_and_grad
