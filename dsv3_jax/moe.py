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
hidden, P token blocks, b block size, C per-expert capacity), chosen by `moe_impl`
(`dsv3_jax/expert_compute.py`; "auto": ragged on TPU/GPU and through the CPU grouped-GEMM
kernel on one CPU device in float32, blocks otherwise):
  * blocks (dropless): assignments sorted by expert, each expert's run padded to a multiple of
    `expert_block_size` (one block at a time: halved while it exceeds N·K/E, `block_rows`),
    then each block's projections plain matmuls on its expert's kernels as stored
    (`expert_compute.block_swiglu`: one loop over the filled blocks; under an FP8 recipe or
    inside shard_map, one batched matmul over gathered kernels) — cost ∝ N·K + E·b,
    nothing dropped, no `ragged_dot` (slow on XLA:CPU).
  * ragged (dropless): assignments sorted by expert through grouped GEMMs with the per-expert
    counts as group sizes (`expert_compute.ragged_swiglu`: `jax.lax.ragged_dot`, or on a CPU
    `dsv3_jax/grouped_gemm.py`'s kernel reading the stacks in place): no padding.
  * few tokens (`few_token_path`, e.g. a decode step or a speculative verify): "sliced", one
    token's K kernels sliced out; "chosen", one pass per expert the tokens chose, over all of
    them (`expert_compute.chosen_swiglu`: cost ∝ the chosen experts' matrices); or "dense",
    every expert on every token masked to the chosen ones (each expert's kernels read once),
    whichever the shapes favour.
  * a few tokens where the grouped GEMMs would run on one CPU device (at most
    `few_token_moe.MAX_TOKENS` float32 tokens, e.g. a decode step): the whole layer, router
    and shared expert included, as one kernel call (`few_token_layer`; its gradient is the
    XLA path's).
  * capacity (`capacity_factor` set; moe_impl "capacity" or "auto"): C = ceil(cf·N·K/E) slots
    per expert, 'ECD,EDF->ECF'; assignments beyond C are dropped. Equal to dropless when
    nothing overflows.
Blocks and capacity use one slot plan (`plan_slots`), which expert parallelism reuses to build
its buffers, and one combine (`slotted_experts`): each slot's routing weight scales its hidden
units before the down projection (its output under an FP8 recipe: `scaled_swiglu`), and each
token sums its K slots.

The correction bias is an input: the model keeps all layers' biases as one [L_moe, E] array in
the `moe_bias` variable collection, so no optimizer sees it and the sign-rule update is one
expression over the stacked counts. The layer returns per-expert assignment counts for the
sign-rule update and the sequence-wise balance loss Σ_i f_i P_i (before α).

Expert parallelism is a strategy handed down from above, never reached for: the model does not
import `sharding/`. Traced under a mesh (`jax.set_mesh`) whose `expert` axis has more than one
device, the routed experts run through the strategy installed with `expert_parallel(fn)` —
`sharding.placement.use_mesh` installs `sharding.expert_parallel.routed_experts` (all-to-all
dispatch and combine inside shard_map) — instead of the local paths; routing, counts and the
balance loss are the same global computations either way. Device-limited routing
(`expert_shard_limit`) uses that axis's size as the number of shards.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax import cpu_kernels, few_token_moe
from dsv3_jax.config import ModelConfig
from dsv3_jax.expert_compute import (
    ExpertStacks,
    block_swiglu,
    chosen_rows,
    chosen_swiglu,
    ragged_experts,
    resolve_moe_impl,
    stable_order,
)
from dsv3_jax.layers import Einsum, RMSNorm, SwiGLU, Weight, dtype_of, product, project
from dsv3_jax.rms_norm import rms_norm


class Routing(NamedTuple):
    weights: jax.Array  # [N, K] float32 combine weights
    experts: jax.Array  # [N, K] int32 chosen expert ids
    scores: jax.Array  # [N, E] float32 unbiased sigmoid scores


def _keep_top_groups(biased: jax.Array, groups: int, top: int, keep: int) -> jax.Array:
    """Masks with −inf all but the `keep` groups (of E/groups consecutive experts) whose
    `top` highest scores sum highest. [N, E] → [N, E]."""
    N, E = biased.shape
    grouped = biased.reshape(N, groups, E // groups)  # [N, G, E/G]
    group_scores = jax.lax.top_k(grouped, min(top, E // groups))[0].sum(-1)  # [N, G]
    _, kept = jax.lax.top_k(group_scores, keep)  # [N, keep]
    mask = jax.nn.one_hot(kept, groups, dtype=jnp.bool_).any(axis=1)  # [N, G]
    return jnp.where(jnp.repeat(mask, E // groups, axis=1), biased, -jnp.inf)


def route(logits: jax.Array, bias: jax.Array, config: ModelConfig,
          expert_shards: int = 1) -> Routing:
    """Group-limited top-k selection on biased scores, weights from unbiased scores.

    Device-limited routing (V3's node-limited routing, `config.expert_shard_limit` = M): when
    the experts are split over `expert_shards` > M devices (E/X consecutive experts each), a
    token may only use experts on the M shards whose top ceil(K/M) biased scores sum highest,
    bounding how many devices each token is sent to. Applied after group limiting.

    Args:
      logits: [N, E] router logits (fp32).
      bias: [E] correction bias.
      expert_shards: X, devices the experts are split over (the mesh's `expert` axis).
    """
    G, K = config.n_group, config.num_experts_per_tok
    scores = jax.nn.sigmoid(logits.astype(jnp.float32))  # [N, E]
    biased = scores + bias.astype(jnp.float32)[None, :]
    if G > 1:
        biased = _keep_top_groups(biased, G, 2, config.topk_group)
    M, X = config.expert_shard_limit, expert_shards
    if M is not None and M < X:
        _check_shard_limit(config, X)
        biased = _keep_top_groups(biased, X, -(-K // M), M)
    _, experts = jax.lax.top_k(biased, K)  # [N, K]
    weights = jnp.take_along_axis(scores, experts, axis=1)
    if config.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return Routing(weights * config.routed_scaling_factor, experts.astype(jnp.int32), scores)


def _check_shard_limit(config: ModelConfig, shards: int) -> None:
    """Device-limited routing must leave every token K experts to choose from."""
    E, K, M, G = (config.n_routed_experts, config.num_experts_per_tok,
                  config.expert_shard_limit, config.n_group)
    if E % shards or M * (E // shards) < K:
        raise ValueError(f"ModelConfig.expert_shard_limit={M} with {shards} expert shards of "
                         f"{E}/{shards} experts leaves fewer than num_experts_per_tok={K}")
    if config.topk_group < G and shards % G:
        # Groups that straddle shards could leave fewer than K experts in the intersection.
        raise ValueError(f"ModelConfig.expert_shard_limit with group-limited routing needs the "
                         f"expert shards ({shards}) to be a multiple of n_group={G}")


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
    used_blocks: jax.Array | None  # int32 scalar: blocks [0, used_blocks) hold the assignments


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
    order = stable_order(flat, num_experts)
    sorted_experts = flat[order]
    run_start = jnp.cumsum(counts) - counts
    rank = jnp.arange(N * K, dtype=jnp.int32) - run_start[sorted_experts]
    if capacity is not None:
        num_slots = num_experts * capacity
        slot_sorted = jnp.where(rank < capacity, sorted_experts * capacity + rank, num_slots)
        block_expert = used_blocks = None
    else:
        padded = (counts + block - 1) // block * block
        num_blocks = math.ceil(N * K / block) + num_experts
        num_slots = num_blocks * block
        slot_sorted = (jnp.cumsum(padded) - padded)[sorted_experts] + rank
        block_expert = jnp.repeat(jnp.arange(num_experts, dtype=jnp.int32), padded // block,
                                  total_repeat_length=num_blocks)
        used_blocks = (padded.sum() // block).astype(jnp.int32)
    slot = jnp.zeros(N * K, jnp.int32).at[order].set(slot_sorted.astype(jnp.int32))
    token = jnp.full(num_slots + 1, N, jnp.int32).at[slot].set(
        jnp.arange(N * K, dtype=jnp.int32) // K)[:num_slots]
    return SlotPlan(slot.reshape(N, K), token, counts, block_expert, used_blocks)


def slot_weights(plan: SlotPlan, weights: jax.Array) -> jax.Array:
    """[num_slots] fp32: each assignment's routing weight ([N, K]) in its slot; 0 in empty
    slots (a dropped assignment's slot index is num_slots: nothing written)."""
    return jnp.zeros(plan.token.shape[0], jnp.float32).at[plan.slot.reshape(-1)].set(
        weights.reshape(-1).astype(jnp.float32), mode="drop")


def gather_rows(x: jax.Array, index: jax.Array, fill=0) -> jax.Array:
    """x[index] along axis 0, where index == len(x) selects a row of `fill` (an empty slot or
    dropped assignment).

    A clamped gather and a select, not a gather from x with a fill row appended: appending a
    row to a batch-split x makes SPMD shift rows between neighbours (a collective-permute),
    which XLA:CPU cannot run inside a branch only some devices take (a pipeline tick).
    """
    n = x.shape[0]
    rows = jnp.take(x, jnp.minimum(index, n - 1), axis=0)
    keep = (index < n).reshape(index.shape + (1,) * (x.ndim - 1))
    return jnp.where(keep, rows, jnp.asarray(fill, x.dtype))


def swiglu(x: jax.Array, weights: tuple[Weight, ...], into: str, out: str, config: ModelConfig,
           hidden=lambda h: h, out_dtype=None) -> jax.Array:
    """down(silu(x·gate) ⊙ (x·up)) through `layers.project` (under the config's recipe): `into`
    the einsum of x with the gate and up kernels, `out` that of the hidden units with the down
    kernel; `hidden` maps the hidden units before the down projection. Every routed-expert
    path below but the dropless blocks' `expert_compute.block_swiglu` is one of these."""
    gate, up, down = weights
    h = jax.nn.silu(project(into, x, gate, config)) * project(into, x, up, config)
    return project(out, hidden(h), down, config, out_dtype=out_dtype)


def grouped_swiglu(x_blocks: jax.Array, block_expert: jax.Array, weights: tuple[Weight, ...],
                   config: ModelConfig, *, rows: jax.Array | None = None,
                   scale: jax.Array | None = None, out_dtype=None) -> jax.Array:
    """Token blocks through their blocks' experts, each block's kernels gathered for one
    batched GEMM: block p through expert block_expert[p] of weights = (gate [E, D, F],
    up [E, D, F], down [E, F, D]). The dropless path under an FP8 recipe (the recipe's GEMM,
    one state per expert tensor) or inside shard_map (expert parallelism, a pipeline stage);
    otherwise `slotted_experts` runs `expert_compute.block_swiglu` (`per_block`).

    Args:
      x_blocks: [P, b, D] token blocks; or, with `rows`, the [N, D] tokens themselves, row
        rows[i] (clamped to N − 1: an empty slot computes a copy of a real token) filling
        slot i of the [P·b] slots.
      scale: [P, b] each slot's routing weight (0 for an empty slot, whose output is then
        exactly 0), applied by `scaled_swiglu`.
    Returns:
      [P, b, D] in `out_dtype` (default: the compute dtype).
    """
    P = block_expert.shape[0]
    kernels, states = tuple(w.kernel for w in weights), tuple(w.fp8_state for w in weights)

    def run(x, kernels, states, scale):
        if rows is not None:  # inside the checkpoint: the backward pass gathers them again
            x = jnp.take(x, rows, axis=0, mode="clip").reshape(P, -1, x.shape[1])
        ws = tuple(Weight(k[block_expert], s) for k, s in zip(kernels, states))
        return scaled_swiglu(x, ws, "PbD,PDF->PbF", "PbF,PFD->PbD", config, scale,
                             out_dtype=out_dtype)

    if config.fp8 != "none":  # the recipes' scaling state flows through their own VJPs
        return run(x_blocks, kernels, states, scale)
    # The token rows and gathered kernels ([P, D, F] each) are gathered again in the backward
    # pass rather than kept: under the layer scan, keeping them costs zero-filled [L, P, b, D]
    # (and [L, P, D, F]) stacks written and read once each.
    regather = jax.checkpoint(run, policy=lambda prim, *_, **__: prim.name != "gather")
    return regather(x_blocks, kernels, states, scale)


def sliced_swiglu(tokens: jax.Array, experts: jax.Array, weights: tuple[Weight, ...],
                  config: ModelConfig) -> jax.Array:
    """[N, D] tokens through their own K experts [N, K], one assignment at a time: its three
    kernels indexed out of the [E, ...] stacks (dynamic slices: contiguous copies at memcpy
    speed, where a gather of the same kernels goes element by element) and applied to its token
    as vector-matrix products. [N, K, D] out. Cost ∝ N·K expert matrices: a one-token decode
    step (no kernel to share, no loop to run)."""
    N, K = experts.shape
    pick = lambda e: tuple(Weight(jax.lax.dynamic_index_in_dim(w.kernel, e, keepdims=False))
                           for w in weights)
    out = [swiglu(tokens[n], pick(experts[n, k]), "D,DF->F", "F,FD->D", config)
           for n in range(N) for k in range(K)]
    return jnp.stack(out).reshape(N, K, -1)


def dense_swiglu(tokens: jax.Array, routing: Routing, weights: tuple[Weight, ...],
                 config: ModelConfig) -> jax.Array:
    """[N, D] tokens through all E experts, each expert's hidden units kept only where the
    token chose it and scaled by its routing weight: the weighted [N, D] sum of the chosen
    experts. The tokens are broadcast to [E, N, D] so that each expert is a plain matmul on its
    kernels as stored ('END,EDF->ENF'): as 'ND,EDF->NEF', XLA:CPU copied the [E, D, F] stacks
    into [D, E·F] every call."""
    E = config.n_routed_experts
    keep, scale = chosen_rows(routing.experts, routing.weights, E)  # [E, N] each

    def weigh(h):  # a select, not only the 0 scale: 0·inf would be NaN
        return (jnp.where(keep[..., None], h, 0) * scale[..., None]).astype(h.dtype)

    per_expert = swiglu(jnp.broadcast_to(tokens, (E, *tokens.shape)), weights, "END,EDF->ENF",
                        "ENF,EFD->END", config, hidden=weigh, out_dtype=jnp.float32)
    return per_expert.sum(0)


# The expected share of the experts a few tokens choose up to which they take `chosen_swiglu`.
CHOSEN_SHARE = 0.8


def chosen_share(tokens: int, config: ModelConfig) -> float:
    """The expected share of the E experts that `tokens` tokens choose between them, under
    uniform routing: a token leaves an expert out with probability 1 − K/E."""
    K, E = config.num_experts_per_tok, config.n_routed_experts
    return 1 - (1 - K / E) ** tokens


def few_token_path(tokens: int, config: ModelConfig) -> str | None:
    """How the routed experts of `tokens` tokens run when they are few (decided at trace time
    from the shapes; dropless and without an FP8 recipe), or None for the dropless blocks,
    ragged or capacity buffers — always None where the ragged path runs as the CPU
    grouped-GEMM kernel (`cpu_kernels.runs_here`), which reads only the chosen experts'
    kernels, in place (decode steps, `/tmp` A/B on 2 cores: bench batch 1 2.17 → 1.83 ms,
    batch 8 11.8-12.4 → 10.4; small batch 1 5.5-5.9 → 3.5, batch 8 23.7-24.7 → 15.9):
      "sliced" (`sliced_swiglu`) for one token: its K experts' kernels sliced out, unrolled;
      "chosen" (`expert_compute.chosen_swiglu`) while the tokens are expected to choose at most
        CHOSEN_SHARE of the experts (`chosen_share`), outside shard_map: each chosen expert
        once (a kernel two tokens share is read once), over all the tokens, in a loop as long
        as their number;
      "dense" (`dense_swiglu`) when N·E is no more than the blocks buffer's (⌈N·K/b⌉ + E)·b
        rows: E expert matrices read once, no gather, no padding.
    Measured on 2 CPU cores, five MoE layers alone (`benchmarks/moe_decode.py` runs the model's
    choice against the blocks): small preset (E 32, D 384, F 256) chosen 3.4 ms at 2 tokens
    against 14.8 dense, 13.5 against 23.4 at 8 (share 0.65), 24 against 30 at 16 (0.88); the
    bench config (E 16, D 256, F 128) 1.1 against 1.3 at 2, but 2.5 against 2.1 dense at 8
    (share 0.89): a loop pass per expert costs more than a small expert's share of one batched
    product once nearly every expert is chosen. In the whole decode step one token ran faster
    sliced (small preset 186-195 tok/s against 171-175 chosen)."""
    c = config
    if c.capacity_factor is not None or c.fp8 != "none":
        return None
    if resolve_moe_impl(c) == "ragged" and cpu_kernels.runs_here(dtype_of(c.dtype)):
        return None  # the CPU kernel: only the chosen experts' kernels, read in place
    N, K, E, b = tokens, c.num_experts_per_tok, c.n_routed_experts, c.expert_block_size
    if N == 1:
        return "sliced"
    # not inside shard_map: like block_swiglu's, its backward does not sum the kernels'
    # gradients over the map's other mesh axes
    in_map = bool(jax.sharding.get_abstract_mesh().manual_axes)
    if chosen_share(N, c) <= CHOSEN_SHARE and not in_map:
        return "chosen"
    if N * E <= (-(-N * K // b) + E) * b:
        return "dense"
    return None


def batched_swiglu(x_ecd: jax.Array, weights: tuple[Weight, ...], config: ModelConfig, *,
                   scale: jax.Array | None = None, out_dtype=None) -> jax.Array:
    """[E, C, D] per-expert slots through the E experts of `weights` (as `grouped_swiglu`;
    `scale` [E, C] multiplies the hidden units)."""
    return scaled_swiglu(x_ecd, weights, "ECD,EDF->ECF", "ECF,EFD->ECD", config, scale,
                         out_dtype=out_dtype)


def scaled_swiglu(x: jax.Array, weights: tuple[Weight, ...], into: str, out: str,
                  config: ModelConfig, scale: jax.Array | None, out_dtype=None) -> jax.Array:
    """`swiglu` with each slot's output multiplied by its `scale` [...] (a routing weight).

    Without a precision recipe the scale multiplies the hidden units before the (linear) down
    projection, so no weighted [..., D] output is formed and kept. Under an FP8 recipe it
    multiplies the output instead: the down projection then quantizes the unweighted hidden
    units, as V3 (which combines after the experts) does. Scaling first widened what one
    per-tensor scale must cover: delayed scaling's loss after 300 tiny-model steps went from
    1.7% to 4.0% above float32 (tests/test_fp8_training.py)."""
    if scale is None or config.fp8 == "none":
        hidden = (lambda h: h) if scale is None else (
            lambda h: (h * scale[..., None]).astype(h.dtype))
        return swiglu(x, weights, into, out, config, hidden=hidden, out_dtype=out_dtype)
    y = swiglu(x, weights, into, out, config, out_dtype=jnp.float32)
    return (y * scale[..., None]).astype(dtype_of(config.dtype) if out_dtype is None
                                         else out_dtype)


def per_block(config: ModelConfig) -> bool:
    """Whether the dropless blocks run one block at a time on the kernels as stored
    (`expert_compute.block_swiglu`): without an FP8 recipe (the recipes' GEMM states are per
    expert tensor, through a batched GEMM) and outside shard_map (block_swiglu's backward does
    not sum its kernel gradients over the map's other mesh axes)."""
    return config.fp8 == "none" and not jax.sharding.get_abstract_mesh().manual_axes


# The smallest block `block_rows` chooses (unless expert_block_size is smaller).
MIN_BLOCK_ROWS = 16


def block_rows(assignments: int, config: ModelConfig) -> int:
    """Rows per dropless block for `assignments` (N·K) routed rows, chosen at trace time:
    `expert_block_size`, halved (down to MIN_BLOCK_ROWS) while it exceeds the rows an expert
    gets on average (N·K/E). Each used expert pads its last block by b/2 rows on average, so
    blocks larger than an expert's share pad about as many rows as they hold (small preset,
    a 1024-token prefill: 4,096 assignments over 32 experts, 128 each, in blocks of 256)."""
    b = config.expert_block_size
    while b > MIN_BLOCK_ROWS and b > assignments / config.n_routed_experts:
        b //= 2
    return max(b, min(MIN_BLOCK_ROWS, config.expert_block_size))


def slotted_experts(tokens: jax.Array, routing: Routing, weights: tuple[Weight, ...],
                    config: ModelConfig, capacity: int | None = None,
                    stacks: ExpertStacks | None = None) -> jax.Array:
    """The routed experts' weighted output [N, D] (fp32) through an expert-major slot buffer:
    dropless blocks of `expert_block_size` (of `block_rows` rows, one block at a time), or
    `capacity` slots per expert (overflow dropped).

    Each slot's routing weight multiplies its hidden units before the (linear) down projection
    (its output under an FP8 recipe: `scaled_swiglu`; 0 for an empty slot, whose output is then
    exactly 0, so its row needs no zero fill), and each token's K slots are summed: nothing
    [N, K, D] is kept for the backward pass, since the weight's gradient comes from the hidden
    units the down projection keeps anyway. Dropless one block at a time (`per_block`),
    `expert_compute.block_swiglu` adds each block's outputs into its tokens' rows itself (from
    the layer stacks' kernels when given `stacks`)."""
    D = tokens.shape[1]
    E, b = config.n_routed_experts, config.expert_block_size
    blocks = capacity is None and per_block(config)  # expert_compute.block_swiglu
    if blocks:
        b = block_rows(routing.experts.size, config)
    plan = plan_slots(routing.experts, E, block=b if capacity is None else None, capacity=capacity)
    num_slots = plan.token.shape[0]
    slot_weight = slot_weights(plan, routing.weights)
    if blocks:
        return block_swiglu(tokens, plan.token, tuple(w.kernel for w in weights),
                            plan.block_expert, slot_weight.reshape(-1, b), config,
                            plan.used_blocks, stacks)
    if capacity is None:
        y_slots = grouped_swiglu(tokens, plan.block_expert, weights, config, rows=plan.token,
                                 scale=slot_weight.reshape(-1, b), out_dtype=jnp.float32)
        y_assign = jnp.take(y_slots.reshape(num_slots, D), plan.slot, axis=0, mode="clip")
    else:
        x_slots = jnp.take(tokens, plan.token, axis=0, mode="clip").reshape(E, capacity, D)
        y_slots = batched_swiglu(x_slots, weights, config, scale=slot_weight.reshape(E, -1),
                                 out_dtype=jnp.float32)
        y_assign = gather_rows(y_slots.reshape(num_slots, D), plan.slot)  # dropped: 0
    return y_assign.sum(1)


class RoutedExperts(nn.Module):
    """The E SwiGLU experts' parameters; every path above runs on their `weights()`."""

    config: ModelConfig

    def setup(self):
        c = self.config
        E, D, F = c.n_routed_experts, c.hidden_size, c.moe_intermediate_size
        self.gate_proj = Einsum((E, D, F), ("expert", "embed", "mlp"), c)
        self.up_proj = Einsum((E, D, F), ("expert", "embed", "mlp"), c)
        self.down_proj = Einsum((E, F, D), ("expert", "mlp", "embed"), c)

    def weights(self) -> tuple[Weight, Weight, Weight]:
        """(gate [E, D, F], up [E, D, F], down [E, F, D]) with their FP8 states. The expert
        projections run on these as stored (the dropless blocks' `block_swiglu`; a per-block
        gather under an FP8 recipe or inside shard_map), locally and under expert parallelism
        alike."""
        return self.gate_proj.weight(), self.up_proj.weight(), self.down_proj.weight()


def expert_shards() -> int:
    """Size of the `expert` axis of the mesh being traced under (`jax.set_mesh`); 1 without."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else dict(mesh.shape).get("expert", 1)


# (tokens [N, D], Routing, weights (gate, up, down), config) -> [N, D]: the routed experts'
# weighted output, computed across the mesh's `expert` axis.
ExpertParallel = Callable[[jax.Array, Routing, tuple, ModelConfig], jax.Array]
_EXPERT_PARALLEL: contextvars.ContextVar[ExpertParallel | None] = contextvars.ContextVar(
    "expert_parallel", default=None)


@contextlib.contextmanager
def expert_parallel(strategy: ExpertParallel) -> Iterator[None]:
    """Within this context, MoE layers traced under a mesh with `expert` > 1 use `strategy`."""
    token = _EXPERT_PARALLEL.set(strategy)
    try:
        yield
    finally:
        _EXPERT_PARALLEL.reset(token)


def _expert_parallel_strategy(shards: int) -> ExpertParallel:
    strategy = _EXPERT_PARALLEL.get()
    if strategy is None:
        raise ValueError(
            f"MoE traced under a mesh whose 'expert' axis has {shards} devices, but no "
            "expert-parallel strategy is installed: trace under "
            "sharding.placement.use_mesh(mesh, layout) (or dsv3_jax.moe.expert_parallel(fn))")
    return strategy


def local_experts(tokens: jax.Array, routing: Routing, experts: RoutedExperts,
                  config: ModelConfig, stacks: ExpertStacks | None = None) -> jax.Array:
    """The routed experts' weighted output [N, D] (fp32) on one device, by the path the
    shapes (`few_token_path`) and `moe_impl` pick; the dropless blocks one at a time read
    their kernels from `stacks` when given (the same kernels, as a layer of the stacks)."""
    c = config
    N = tokens.shape[0]
    E, K = c.n_routed_experts, c.num_experts_per_tok
    few, impl = few_token_path(N, c), resolve_moe_impl(c)
    if few == "dense":
        return dense_swiglu(tokens, routing, experts.weights(), c)
    if few == "chosen":
        return chosen_swiglu(tokens, routing.experts, routing.weights,
                             tuple(w.kernel for w in experts.weights()), c)
    if few == "sliced":
        y_assign = sliced_swiglu(tokens, routing.experts, experts.weights(), c)
    elif impl == "ragged":
        return ragged_experts(tokens, routing.experts, routing.weights, experts.weights(), c,
                              stacks)
    elif impl == "blocks":
        return slotted_experts(tokens, routing, experts.weights(), c, stacks=stacks)
    else:
        capacity = max(1, math.ceil(c.capacity_factor * N * K / E))
        return slotted_experts(tokens, routing, experts.weights(), c, capacity)
    return jnp.einsum("NKD,NK->ND", y_assign.astype(jnp.float32), routing.weights)


def _few_token_reference(config: ModelConfig, tokens, router, bias, gate, up, down, layer,
                         shared_gate, shared_up, shared_down, norm):
    """`few_token_moe.layer`'s outputs by the XLA path `MoE` otherwise takes: the norm (when
    `norm` is not empty), `route`, the grouped GEMMs (`expert_compute.ragged_experts`) and the
    shared SwiGLU."""
    if norm.shape[0]:
        tokens = rms_norm(tokens, norm, config.rms_norm_eps, dtype_of(config.dtype))
    logits = product("ND,DE->NE", tokens, router, jnp.float32)
    routing = route(logits, bias, config)
    stacks = ExpertStacks(gate, up, down, layer) if gate.ndim == 4 else None
    pick = (lambda w: w[layer]) if stacks is not None else (lambda w: w)
    weights = tuple(Weight(pick(w)) for w in (gate, up, down))
    y = ragged_experts(tokens, routing.experts, routing.weights, weights, config, stacks)
    if shared_gate.shape[1]:
        shared = tuple(Weight(w) for w in (shared_gate, shared_up, shared_down))
        y = y + swiglu(tokens, shared, "ND,DF->NF", "NF,FD->ND", config, out_dtype=jnp.float32)
    return y, routing.experts, routing.scores


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def few_token_layer(config: ModelConfig, tokens, router, bias, gate, up, down, layer,
                    shared_gate, shared_up, shared_down, norm):
    """A MoE layer of a few tokens as one kernel call (`few_token_moe`): (y [N, D] float32
    with the shared expert's output, experts [N, K], unbiased scores [N, E]), the tokens
    normalized first by `norm` [D] unless it is empty ([0]). Its derivatives are those of the
    XLA path (`_few_token_reference`), which then also computes the value."""
    return few_token_moe.layer(tokens, router, bias, gate, up, down, layer, shared_gate,
                               shared_up, shared_down, config, norm)


@few_token_layer.defjvp
def _few_token_jvp(config, primals, tangents):
    return jax.jvp(functools.partial(_few_token_reference, config), primals, tangents)


class MoE(nn.Module):
    """DeepSeekMoE feed-forward. Returns (y [B,T,D], counts [E] int32, balance loss scalar)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, stacks: ExpertStacks | None = None,
                 norm: RMSNorm | None = None):
        """x: [B, T, D]; bias: [E] this layer's correction bias (from the `moe_bias` state);
        stacks: this layer's expert kernels as a layer of its stack's (`ExpertStacks`); norm:
        an RMSNorm to apply to x first (the block's post-attention norm; the few-token kernel
        applies it inside its call)."""
        c = self.config
        B, T, D = x.shape
        E = c.n_routed_experts
        gate = Einsum((D, E), ("embed", None), c, fp8=False, name="gate")  # router: fp32
        tokens = x.reshape(B * T, D)
        shards = expert_shards()
        experts = RoutedExperts(c, name="experts")
        shared = (SwiGLU(c.n_shared_experts * c.moe_intermediate_size, c, name="shared_experts")
                  if c.n_shared_experts else None)
        if shards == 1 and not self.is_initializing():
            routed = ((stacks.gate, stacks.up, stacks.down) if stacks is not None
                      else tuple(w.kernel for w in experts.weights()))
            kept = (tuple(w.kernel for w in shared.weights()) if shared is not None else
                    (jnp.zeros((D, 0)), jnp.zeros((D, 0)), jnp.zeros((0, D))))
            scale = jnp.zeros((0,), jnp.float32) if norm is None else norm.weight
            if few_token_moe.pays(B * T, c, x, gate.kernel, scale, *routed, *kept):
                y, chosen, scores = few_token_layer(
                    c, tokens, gate.kernel, bias, *routed,
                    0 if stacks is None else stacks.layer, *kept, scale)
                counts = jnp.bincount(chosen.reshape(-1), length=E).astype(jnp.int32)
                balance = sequence_balance_loss(scores, chosen, c, B)
                return y.astype(x.dtype).reshape(B, T, D), counts, balance
        if norm is not None:
            x = norm(x)
            tokens = x.reshape(B * T, D)
        logits = product("ND,DE->NE", tokens, gate.kernel, jnp.float32)
        routing = route(logits, bias, c, expert_shards=shards)
        counts = jnp.bincount(routing.experts.reshape(-1), length=E).astype(jnp.int32)
        if shards > 1:  # under a mesh with an `expert` axis: the strategy handed down
            y = _expert_parallel_strategy(shards)(tokens, routing, experts.weights(), c)
        else:
            y = local_experts(tokens, routing, experts, c, stacks).astype(x.dtype)
        y = y.reshape(B, T, D)
        if shared is not None:
            y = y + shared(x)
        balance = sequence_balance_loss(routing.scores, routing.experts, c, B)
        return y, counts, balance
