"""DeepSeekMoE: group-limited sigmoid router, shared expert, dropless routed experts.

Routing, per token (REFERENCE §3), all in fp32:
  1. s = sigmoid(x W_gate)                                    [E]
  2. s_sel = s + b        (b: `e_score_correction_bias`, selection only, never trained)
  3. split E into G groups; group score = sum of the group's top-2 s_sel; keep topk_group
     groups, mask the rest with −inf (masking with 0.0 is wrong once s_sel can be negative)
  4. idx = top-K experts by s_sel among the kept groups
  5. w = s[idx] (UNBIASED); w /= Σw if norm_topk_prob; w *= routed_scaling_factor
  6. y = shared(x) + Σ_k w_k · expert_{idx_k}(x), experts are SwiGLU.

Expert compute (dimension key: N tokens, K experts per token, E experts, D model, F expert
hidden, P token blocks, b block size, C per-expert capacity):
  * dropless (default): assignments sorted by expert, each expert's run padded to a multiple of
    `expert_block_size`, then one batched matmul over blocks with each block's expert weight
    gathered — cost ∝ N·K + E·b, nothing dropped, no `ragged_dot` (slow on XLA:CPU).
  * capacity (`capacity_factor` set): C = ceil(cf·N·K/E) slots per expert, 'ECD,EDF->ECF';
    assignments beyond C are dropped. Equal to dropless when nothing overflows.
Both use one slot plan (`plan_slots`), which expert parallelism reuses to build its buffers.

The correction bias is an input: the model keeps all layers' biases as one [L_moe, E] array in
the `moe_bias` variable collection, so no optimizer sees it and the sign-rule update is one
expression over the stacked counts. The layer returns per-expert assignment counts for the sign-rule update and the sequence-wise
balance loss Σ_i f_i P_i (before α).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig
from dsv3_jax.layers import Einsum, SwiGLU, matmul


class Routing(NamedTuple):
    weights: jax.Array  # [N, K] float32 combine weights
    experts: jax.Array  # [N, K] int32 chosen expert ids
    scores: jax.Array  # [N, E] float32 unbiased sigmoid scores


def route(logits: jax.Array, bias: jax.Array, config: ModelConfig) -> Routing:
    """Group-limited top-k selection on biased scores, weights from unbiased scores.

    Args:
      logits: [N, E] router logits (fp32).
      bias: [E] correction bias.
    """
    E, G, K = config.n_routed_experts, config.n_group, config.num_experts_per_tok
    scores = jax.nn.sigmoid(logits.astype(jnp.float32))  # [N, E]
    biased = scores + bias.astype(jnp.float32)[None, :]
    if G > 1:
        grouped = biased.reshape(-1, G, E // G)  # [N, G, E/G]
        group_scores = jax.lax.top_k(grouped, min(2, E // G))[0].sum(-1)  # [N, G]
        _, kept = jax.lax.top_k(group_scores, config.topk_group)  # [N, topk_group]
        keep = jax.nn.one_hot(kept, G, dtype=jnp.bool_).any(axis=1)  # [N, G]
        biased = jnp.where(jnp.repeat(keep, E // G, axis=1), biased, -jnp.inf)
    _, experts = jax.lax.top_k(biased, K)  # [N, K]
    weights = jnp.take_along_axis(scores, experts, axis=1)
    if config.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return Routing(weights * config.routed_scaling_factor, experts.astype(jnp.int32), scores)


def sequence_balance_loss(scores: jax.Array, experts: jax.Array, config: ModelConfig,
                          batch: int) -> jax.Array:
    """V3's sequence-wise balance loss Σ_i f_i·P_i, averaged over sequences (α not applied).

    f_i = E/(K·T) Σ_t 1[i ∈ TopK(t)],  P_i = (1/T) Σ_t s_{i,t} / Σ_j s_{j,t}.
    """
    E, K = config.n_routed_experts, config.num_experts_per_tok
    scores = scores.reshape(batch, -1, E)  # [B, T, E]
    T = scores.shape[1]
    chosen = jax.nn.one_hot(experts.reshape(batch, T, K), E, dtype=jnp.float32).sum(2)
    f = chosen.sum(1) * (E / (K * T))  # [B, E]
    p = (scores / scores.sum(-1, keepdims=True)).mean(1)  # [B, E]
    return (f * p).sum(-1).mean()  # f is piecewise constant: gradient flows through P only


class SlotPlan(NamedTuple):
    """Where each (token, k) assignment sits in the expert-major slot buffer."""

    slot: jax.Array  # [N, K] slot index; == num_slots for a dropped assignment
    token: jax.Array  # [num_slots] token held by each slot; == N for an empty slot
    counts: jax.Array  # [E] assignments routed to each expert (before any drop)
    block_expert: jax.Array | None  # [num_slots // b] expert of each block (dropless)


def plan_slots(experts: jax.Array, num_experts: int, *, block: int | None = None,
               capacity: int | None = None) -> SlotPlan:
    """Sorts assignments by expert into slots: blocks of `block` (dropless) or `capacity` each.

    Dropless: expert e's run starts at a multiple of `block`; the buffer has
    (ceil(N·K/block) + E) blocks, enough for any routing. Capacity: expert e owns slots
    [e·capacity, (e+1)·capacity); assignments ranked beyond capacity are dropped.
    """
    N, K = experts.shape
    flat = experts.reshape(-1)
    counts = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    order = jnp.argsort(flat, stable=True)
    sorted_experts = flat[order]
    run_start = jnp.cumsum(counts) - counts
    rank = jnp.arange(N * K, dtype=jnp.int32) - run_start[sorted_experts]
    if capacity is not None:
        num_slots = num_experts * capacity
        slot_sorted = jnp.where(rank < capacity, sorted_experts * capacity + rank, num_slots)
        block_expert = None
    else:
        padded = (counts + block - 1) // block * block
        num_blocks = math.ceil(N * K / block) + num_experts
        num_slots = num_blocks * block
        slot_sorted = (jnp.cumsum(padded) - padded)[sorted_experts] + rank
        block_expert = jnp.repeat(jnp.arange(num_experts, dtype=jnp.int32), padded // block,
                                  total_repeat_length=num_blocks)
    slot = jnp.zeros(N * K, jnp.int32).at[order].set(slot_sorted.astype(jnp.int32))
    token = jnp.full(num_slots + 1, N, jnp.int32).at[slot].set(
        jnp.arange(N * K, dtype=jnp.int32) // K)[:num_slots]
    return SlotPlan(slot.reshape(N, K), token, counts, block_expert)


def gather_rows(x: jax.Array, index: jax.Array) -> jax.Array:
    """x[index] where index == len(x) selects a zero row (empty slot / dropped assignment)."""
    return jnp.concatenate([x, jnp.zeros_like(x[:1])], axis=0)[index]


class RoutedExperts(nn.Module):
    """E SwiGLU experts applied to a slot buffer (dropless blocks or capacity slots)."""

    config: ModelConfig

    def setup(self):
        c = self.config
        E, D, F = c.n_routed_experts, c.hidden_size, c.moe_intermediate_size
        self.gate_proj = Einsum((E, D, F), ("expert", "embed", "mlp"), c)
        self.up_proj = Einsum((E, D, F), ("expert", "embed", "mlp"), c)
        self.down_proj = Einsum((E, F, D), ("expert", "mlp", "embed"), c)

    def grouped(self, x_blocks: jax.Array, block_expert: jax.Array) -> jax.Array:
        """[P, b, D] token blocks, block p computed by expert block_expert[p]."""
        g = self.gate_proj("PbD,PDF->PbF", x_blocks, select=block_expert)
        u = self.up_proj("PbD,PDF->PbF", x_blocks, select=block_expert)
        return self.down_proj("PbF,PFD->PbD", jax.nn.silu(g) * u, select=block_expert)

    def batched(self, x_ecd: jax.Array) -> jax.Array:
        """[E, C, D] per-expert slots (capacity mode and expert parallelism)."""
        g = self.gate_proj("ECD,EDF->ECF", x_ecd)
        u = self.up_proj("ECD,EDF->ECF", x_ecd)
        return self.down_proj("ECF,EFD->ECD", jax.nn.silu(g) * u)


class MoE(nn.Module):
    """DeepSeekMoE feed-forward. Returns (y [B,T,D], counts [E] int32, balance loss scalar)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array):
        """x: [B, T, D]; bias: [E] this layer's correction bias (from the `moe_bias` state)."""
        c = self.config
        B, T, D = x.shape
        E, K = c.n_routed_experts, c.num_experts_per_tok
        gate = Einsum((D, E), ("embed", None), c, name="gate")
        tokens = x.reshape(B * T, D)
        logits = matmul("ND,DE->NE", tokens, gate.kernel, jnp.float32)
        routing = route(logits, bias, c)

        experts = RoutedExperts(c, name="experts")
        N = B * T
        if c.capacity_factor is None:
            b = c.expert_block_size
            plan = plan_slots(routing.experts, E, block=b)
            x_slots = gather_rows(tokens, plan.token)
            y_slots = experts.grouped(x_slots.reshape(-1, b, D), plan.block_expert)
        else:
            capacity = max(1, math.ceil(c.capacity_factor * N * K / E))
            plan = plan_slots(routing.experts, E, capacity=capacity)
            x_slots = gather_rows(tokens, plan.token)
            y_slots = experts.batched(x_slots.reshape(E, capacity, D))
        y_assign = gather_rows(y_slots.reshape(-1, D), plan.slot)  # [N, K, D]
        y = jnp.einsum("NKD,NK->ND", y_assign.astype(jnp.float32), routing.weights)
        y = y.astype(x.dtype).reshape(B, T, D)
        if c.n_shared_experts:
            y = y + SwiGLU(c.n_shared_experts * c.moe_intermediate_size, c,
                           name="shared_experts")(x)
        balance = sequence_balance_loss(routing.scores, routing.experts, c, B)
        return y, plan.counts, balance
