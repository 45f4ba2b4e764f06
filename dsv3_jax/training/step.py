"""The training and evaluation steps: losses, update, the aux-loss-free bias rule, MaxVio.

`make_train_step` returns a pure function `(state, batch) -> (state, metrics)` with no mesh in
it: under a mesh, the batch and state arrive sharded and XLA partitions the same program. The
expert counts the model returns are sums over the whole (global) batch, so the bias update sees
global counts on any mesh.

Loss (REFERENCE §3-4), for tokens [B, T+1] (inputs tokens[:, :T], targets tokens[:, 1:]):
  L = CE(logits, t_{i+1}) + λ · (1/D) Σ_k CE_k + α · Σ_layers Σ_i f_i P_i
where MTP depth k's logits at position i predict t_{i+k+2}: positions i ≤ T−k−2 have a target
inside the window, the last k+1 do not and are left out.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from dsv3_jax import fp8
from dsv3_jax.config import ModelConfig
from dsv3_jax.model import DeepSeekV3
from dsv3_jax.training.state import TrainState


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-position cross-entropy in nats, [B, T] float32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def mtp_loss(mtp_logits: tuple[jax.Array, ...], tokens: jax.Array) -> jax.Array:
    """(1/D) Σ_k mean CE of depth k over the positions whose target t_{i+k+2} exists."""
    T = tokens.shape[1] - 1
    losses = []
    for k, logits in enumerate(mtp_logits):
        n = T - k - 1  # positions 0..T-k-2
        if n < 1:
            continue
        losses.append(cross_entropy(logits[:, :n], tokens[:, k + 2:]).mean())
    return sum(losses) / len(losses) if losses else jnp.zeros((), jnp.float32)


def update_bias(bias: jax.Array, counts: jax.Array, rate: float) -> jax.Array:
    """Sign rule per MoE layer (row): b_i ← b_i + γ · sign(mean_j c_j − c_i)."""
    counts = counts.astype(jnp.float32)
    return bias + rate * jnp.sign(counts.mean(-1, keepdims=True) - counts)


def max_violation(counts: jax.Array) -> jax.Array:
    """MaxVio per MoE layer: max_i c_i / mean_j c_j − 1, [L]."""
    counts = counts.astype(jnp.float32)
    return counts.max(-1) / jnp.maximum(counts.mean(-1), 1e-9) - 1.0


def make_objective(config: ml_collections.ConfigDict):
    """(logits, mtp_logits, tokens [B, T+1]) -> (CE + λ·MTP, (CE, MTP)): the loss before the
    balance term (a pipeline's last stage computes it per micro-batch)."""
    lam = config.mtp_loss_weight

    def objective(logits, mtp_logits, tokens):
        ce = cross_entropy(logits, tokens[:, 1:]).mean()
        mtp = mtp_loss(mtp_logits, tokens)
        return ce + lam * mtp, (ce, mtp)

    return objective


def make_value_and_grad(model: ModelConfig, config: ml_collections.ConfigDict):
    """(params, fp8 state, moe_bias, tokens) -> ((loss, (ce, mtp, balance, expert counts)),
    (grads, next fp8 state)) of the whole model in one program."""
    net = DeepSeekV3(model)
    objective, alpha = make_objective(config), config.balance_loss_alpha

    def loss_fn(params, fp8_state, moe_bias, tokens):
        out = net.apply(model_variables(params, moe_bias, fp8_state), tokens[:, :-1])
        loss, (ce, mtp) = objective(out.logits, out.mtp_logits, tokens)
        total = loss + alpha * out.balance_loss
        return total, (ce, mtp, out.balance_loss, out.expert_counts)

    # The FP8 state's "gradient" is its next value (fp8.py: the custom_vjp cotangent).
    return jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)


def make_train_step(model: ModelConfig, config: ml_collections.ConfigDict,
                    tx: optax.GradientTransformation, schedule: optax.Schedule,
                    value_and_grad=None):
    """The update step: (state, tokens [B, T+1] int32) -> (new state, scalar metrics).

    `value_and_grad` (default `make_value_and_grad`) computes the loss and gradients, e.g. a
    pipelined one (`dsv3_jax.training.placed_step`); the update around it is the same.
    """
    gamma = config.bias_update_rate
    grad_fn = value_and_grad or make_value_and_grad(model, config)

    def train_step(state: TrainState, tokens: jax.Array) -> tuple[TrainState, dict[str, Any]]:
        (total, (ce, mtp, balance, counts)), (grads, fp8_next) = grad_fn(
            state.params, state.fp8, state.moe_bias, tokens)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        bias = state.moe_bias["e_score_correction_bias"]
        new_bias = update_bias(bias, counts, gamma) if counts.shape[0] else bias
        rng, _ = jax.random.split(jax.random.wrap_key_data(state.rng))
        violation = max_violation(counts) if counts.shape[0] else jnp.zeros((1,))
        metrics = {
            "loss": ce,
            "mtp_loss": mtp,
            "balance_loss": balance,
            "total_loss": total,
            "grad_norm": optax.tree.norm(grads),  # before clipping
            "lr": schedule(state.step),
            "max_violation": violation.mean(),  # mean over MoE layers (main stack and MTP)
            "max_violation_worst": violation.max(),
            "bias_abs_mean": jnp.abs(new_bias).mean(),
        }
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state,
            moe_bias={**state.moe_bias, "e_score_correction_bias": new_bias},
            rng=jax.random.key_data(rng), fp8=fp8.merge_state(state.fp8, fp8_next))
        return new_state, metrics

    return train_step


def model_variables(params: Any, moe_bias: Any, fp8_state: Any = None) -> dict[str, Any]:
    """The variables `DeepSeekV3.apply` takes; the `fp8` collection only when it has state."""
    variables = {"params": params, "moe_bias": moe_bias}
    if fp8_state:
        variables["fp8"] = fp8_state
    return variables


def make_eval_step(model: ModelConfig):
    """(params, moe_bias, tokens [B, T+1], mask [B, T], fp8 state) -> (Σ nats, Σ mask) of the
    main head."""
    net = DeepSeekV3(model)

    def eval_step(params, moe_bias, tokens, mask, fp8_state=None):
        out = net.apply(model_variables(params, moe_bias, fp8_state), tokens[:, :-1],
                        mtp=False)
        nats = cross_entropy(out.logits, tokens[:, 1:])
        return (nats * mask).sum(), mask.sum()

    return eval_step

