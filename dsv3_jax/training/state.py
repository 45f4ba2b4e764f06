"""TrainState and the optimizer.

TrainState is one pytree — params, optax state, the MoE correction biases, step, RNG, the FP8
delayed-scaling state — so it is checkpointed whole, donated to the step whole, and sharded
whole from one tree of shardings. `fp8` holds the model's `fp8` collection (amax histories and
scales of every projection, stacked per scanned layer; empty unless ModelConfig.fp8 is
"delayed"): like `moe_bias` it is outside params and optimizer state, so no weight decay,
clipping or averaging touches it, and the step replaces it functionally.

State creation is a pure function of a PRNG key (`create_state`), so a mesh layer can run it as
`jax.jit(create_state, out_shardings=…)` from `abstract_state`'s shapes, never materializing the
full state on one device.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from dsv3_jax.config import ModelConfig
from dsv3_jax.model import init_variables


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # fp32 master weights (ModelConfig.param_dtype)
    opt_state: Any  # optax state of `make_optimizer`
    moe_bias: Any  # {'e_score_correction_bias': [L_moe + num_mtp, E] f32}; sign rule, no grads
    rng: jax.Array  # uint32 raw key data (a plain array, so checkpoints need no key type)
    fp8: Any = flax.struct.field(default_factory=dict)  # the `fp8` collection (delayed recipe)


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up from 0 to learning_rate, cosine decay to end_lr_ratio · learning_rate."""
    warmup = min(config.warmup_steps, config.steps - 1) if config.steps > 1 else 0
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
        decay_steps=max(config.steps, warmup + 1),
        end_value=config.learning_rate * config.end_lr_ratio)


def decay_mask(boxed_params) -> Any:
    """True for matrices: leaves with ≥ 2 axes besides a scanned `layers` axis.

    Norm scales stacked by nn.scan are [L, D] — two dimensions, but vectors per layer — so the
    logical axis names, not ndim, decide.
    """
    def is_matrix(leaf):
        if isinstance(leaf, nn.Partitioned):
            return len([n for n in leaf.names if n != "layers"]) >= 2
        return leaf.ndim >= 2

    return jax.tree.map(is_matrix, boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def make_optimizer(config: ml_collections.ConfigDict,
                   model: ModelConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with the warm-up + cosine schedule."""
    boxed = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))["params"]
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip_norm),
        optax.adamw(make_schedule(config), b1=config.adam_b1, b2=config.adam_b2,
                    weight_decay=config.weight_decay, mask=decay_mask(boxed)))


def create_state(model: ModelConfig, tx: optax.GradientTransformation,
                 rng: jax.Array) -> TrainState:
    """Fresh state from a PRNG key (jit-able; pass out_shardings to place it on a mesh)."""
    init_rng, state_rng = jax.random.split(rng)
    variables = nn.unbox(init_variables(model, init_rng))
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      moe_bias=variables["moe_bias"], rng=jax.random.key_data(state_rng),
                      fp8=variables.get("fp8", {}))


def abstract_state(model: ModelConfig, tx: optax.GradientTransformation) -> TrainState:
    """Shapes and dtypes of the state (for restoring and for computing shardings)."""
    return jax.eval_shape(lambda: create_state(model, tx, jax.random.key(0)))


def param_partition_specs(model: ModelConfig) -> Any:
    """Logical-axis PartitionSpecs of the params (what a mesh layer maps to mesh axes)."""
    boxed = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))["params"]
    return nn.get_partition_spec(boxed)
