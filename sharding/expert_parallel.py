"""Expert parallelism: routed experts split over the mesh's `expert` axis, tokens moved to the
devices holding their experts and back with all-to-all (the DeepEP dispatch/combine pattern).

`sharding.placement.use_mesh` hands `routed_experts` down to the model
(`dsv3_jax.moe.expert_parallel`); `dsv3_jax.moe.MoE` calls it when traced under a mesh whose
`expert` axis has more than one device. The model itself never builds a mesh and never imports
this module. Routing, expert
counts and the balance loss stay global SPMD computations outside this function (counts are one
bincount over the batch-split expert ids, which XLA reduces across the mesh).

Dimension key (per device): n tokens · K experts per token · D model · F expert hidden (per
tensor shard) · X expert shards · El = E/X experts per shard · C tokens sent to each shard ·
R = X·C tokens received · b dropless block size.

Inside one `jax.shard_map` over the whole mesh (tokens split over data × fsdp × expert, expert
weights split over expert (E) and tensor (F), replicated elsewhere — ZeRO-3's fsdp all-gather
happens at the shard_map boundary):
  1. Dispatch plan: token t visits shard j if any of its K experts lives there; it is sent once
     per visited shard however many of its experts live there (DeepEP's de-duplication).
  2. x_send [X, C, D] and the token's global expert ids and weights [X, C, K] → all_to_all over
     `expert` → row block i of what arrives came from shard i.
  3. Each shard keeps the assignments whose expert is its own, sorts them into slots with the
     model's `plan_slots` (one extra "elsewhere" bin that is never read back), runs its El
     SwiGLU experts (each slot scaled by its routing weight, as on one device),
     and sums each received token's outputs → y [X, C, D].
  4. all_to_all back; token t sums what its visited shards returned; psum over `tensor` (the
     down projection's F was split).

Buffers. Static shapes must hold the worst case, and with all_to_all (ragged_all_to_all is not
implemented on XLA:CPU) every buffer has a fixed size:
  * dropless (default): C = n (every token may visit one shard); the local slot buffer holds
    R·K assignments in blocks of b. Nothing can drop, at the price of buffers X times the
    average traffic — what `ragged_all_to_all` + a ragged matmul avoid on GPU/TPU.
  * capacity (`ModelConfig.capacity_factor` = cf): C = min(n, ceil(cf·n·K/X)) tokens per
    destination and ceil(cf·X·n·K/E) slots per expert (the local capacity rule applied to the
    X devices' tokens). Overflow is dropped; with no overflow the result equals dropless.

What travels: token rows in the compute dtype, ids (int32) and weights (fp32) out; per-token
partial sums in the compute dtype back (V3 combines in BF16 as well).

The expert SwiGLU is the model's own (`moe.grouped_swiglu` / `moe.batched_swiglu` over the raw
weights, through `layers.project`), the same code the local paths run, under the same FP8
recipe: a delayed-scaling state enters replicated, its amaxes are pmax-ed over every mesh axis
inside (`fp8._amax`), so its cotangent is the same on every device; a precision recipe that
keeps per-module state must cover those two functions.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dsv3_jax.backends import platform
from dsv3_jax.config import ModelConfig
from dsv3_jax.expert_compute import resolve_moe_impl
from dsv3_jax.layers import Weight, dtype_of
from dsv3_jax.moe import (
    Routing,
    batched_swiglu,
    gather_rows,
    grouped_swiglu,
    plan_slots,
    slot_weights,
)
from sharding import ragged_expert_parallel
from sharding.mesh import BATCH_AXES

EXPERT_AXIS = "expert"
TENSOR_AXIS = "tensor"


def _per_device(x, experts, weights, valid, w_gate, w_up, w_down, states, *, config: ModelConfig,
                num_shards: int, tensor_split: bool):
    """Dispatch → local experts → combine, for one device's tokens (see the module docstring).

    Args:
      x: [n, D] tokens; experts: [n, K] global expert ids; weights: [n, K] combine weights;
      valid: [n] False for padding rows (never sent).
      w_gate, w_up: [El, D, F] this shard's experts; w_down: [El, F, D].
      states: their FP8 delayed-scaling states (gate, up, down), or Nones.
    Returns:
      [n, D] routed-expert output in x's dtype.
    """
    n, D = x.shape
    K = experts.shape[1]
    X, E = num_shards, config.n_routed_experts
    El = E // X
    dtype = dtype_of(config.dtype)
    local_weights = tuple(Weight(k, s) for k, s in zip((w_gate, w_up, w_down), states,
                                                       strict=True))
    cf = config.capacity_factor
    C = n if cf is None else min(n, math.ceil(cf * n * K / X))

    # 1. Dispatch plan: the rank of each token among those visiting shard j is its send slot.
    shard_of = experts // El  # [n, K]
    visits = (shard_of[:, :, None] == jnp.arange(X)[None, None, :]).any(1) & valid[:, None]
    rank = jnp.cumsum(visits, axis=0, dtype=jnp.int32) - 1  # [n, X]
    send_slot = jnp.where(visits & (rank < C), rank, C)  # [n, X]; C: not sent (or dropped)
    slot_token = jnp.full((X, C + 1), n, jnp.int32).at[
        jnp.arange(X)[None, :], send_slot].set(jnp.arange(n, dtype=jnp.int32)[:, None])[:, :C]

    # 2. Out: token rows, their expert ids (-1 in empty slots) and weights, to every shard.
    to_shards = functools.partial(jax.lax.all_to_all, axis_name=EXPERT_AXIS, split_axis=0,
                                  concat_axis=0, tiled=True)
    x_recv = to_shards(gather_rows(x.astype(dtype), slot_token))  # [X, C, D]
    ids_recv = to_shards(gather_rows(experts, slot_token, -1))  # [X, C, K]
    w_recv = to_shards(gather_rows(weights, slot_token, 0.0))  # [X, C, K]

    # 3. This shard's assignments into slots; the extra bin El collects the others' experts.
    R = X * C
    me = jax.lax.axis_index(EXPERT_AXIS)
    ids, w = ids_recv.reshape(R, K), w_recv.reshape(R, K)
    mine = (ids >= 0) & (ids // El == me)
    local = jnp.where(mine, ids - me * El, El)
    x_r = x_recv.reshape(R, D)
    # The model's combine (`moe.slotted_experts`, `moe.scaled_swiglu`): each slot's routing
    # weight scales its hidden units before the down projection (its output under an FP8 recipe),
    # as on one device, so a recipe quantizes the same values; others' assignments weigh 0.
    w_mine = jnp.where(mine, w, 0.0)
    if cf is None:
        b = config.expert_block_size
        plan = plan_slots(local, El + 1, block=b)
        scale = slot_weights(plan, w_mine).reshape(-1, b)
        # Blocks of the "elsewhere" bin are computed (static shapes) but never read back; their
        # rows are zeroed so that they add nothing, not even to an FP8 recipe's amax.
        block_expert = jnp.minimum(plan.block_expert, El - 1)
        x_blocks = gather_rows(x_r, plan.token).reshape(-1, b, D)
        x_blocks = jnp.where((plan.block_expert < El)[:, None, None], x_blocks, 0)
        y_slots = grouped_swiglu(x_blocks, block_expert, local_weights, config, scale=scale,
                                 out_dtype=jnp.float32)
        y_slots = y_slots.reshape(-1, D)
        slot = jnp.where(mine, plan.slot, y_slots.shape[0])
    else:
        capacity = min(R, math.ceil(cf * X * n * K / E))
        plan = plan_slots(local, El + 1, capacity=capacity)
        kept = El * capacity  # the "elsewhere" bin's slots come last and are not computed
        scale = slot_weights(plan, w_mine)[:kept].reshape(El, capacity)
        x_slots = gather_rows(x_r, plan.token[:kept]).reshape(El, capacity, D)
        y_slots = batched_swiglu(x_slots, local_weights, config, scale=scale,
                                 out_dtype=jnp.float32).reshape(kept, D)
        slot = jnp.where(mine & (plan.slot < kept), plan.slot, kept)
    y_part = gather_rows(y_slots, slot).sum(1)  # [R, D]; zero rows for others' / dropped

    # 4. Back to the senders; each token sums the partial outputs of the shards it visited.
    y_back = to_shards(y_part.astype(dtype).reshape(X, C, D)).reshape(R, D)
    flat = jnp.where(send_slot < C, jnp.arange(X)[None, :] * C + send_slot, R)  # [n, X]
    y = gather_rows(y_back, flat).astype(jnp.float32).sum(1)  # [n, D]
    if tensor_split:
        y = jax.lax.psum(y, TENSOR_AXIS)
    return y.astype(x.dtype)


def routed_experts(tokens: jax.Array, routing: Routing,
                   weights: tuple[Weight, Weight, Weight],
                   config: ModelConfig) -> jax.Array:
    """Routed-expert output Σ_k w_k·expert_k(x) with experts split over the `expert` mesh axis.

    Must be traced under a mesh (`jax.set_mesh`) with an `expert` axis; the batch may be split
    over data/fsdp/expert and the expert hidden size over `tensor`. Token counts that the batch
    axes do not divide (e.g. a batch-1 decode step) are padded with rows that are never sent.

    Args:
      tokens: [N, D] layer input.
      routing: the router's weights/experts [N, K].
      weights: (gate [E, D, F], up [E, D, F], down [E, F, D]) expert weights and their FP8
        states (`RoutedExperts.weights()`).
      config: the model config (capacity_factor, expert_block_size, dtype).
    Returns:
      [N, D] in the tokens' dtype (the weighted sum of routed experts, no shared expert).
    Raises:
      ValueError: the experts are not divisible by the expert axis.
    """
    mesh = jax.sharding.get_abstract_mesh()
    shape = dict(mesh.shape)
    X, E = shape[EXPERT_AXIS], config.n_routed_experts
    if E % X:
        raise ValueError(f"ModelConfig.n_routed_experts={E} is not divisible by mesh.expert={X}")
    token_axes = tuple(a for a in BATCH_AXES if shape.get(a, 1) > 1)
    tensor_split = shape.get(TENSOR_AXIS, 1) > 1
    N = tokens.shape[0]
    pad = -N % math.prod(shape[a] for a in token_axes)
    rows = lambda a: jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
    valid = jnp.arange(N + pad) < N
    tensor = TENSOR_AXIS if tensor_split else None
    tok = P(token_axes)
    if resolve_moe_impl(config) == "ragged":
        fn = functools.partial(ragged_expert_parallel.per_device, config=config, num_shards=X,
                               tensor_split=tensor_split, mesh_axes=tuple(mesh.axis_names),
                               primitive=platform() in ("tpu", "gpu", "cuda", "rocm"))
    else:
        fn = functools.partial(_per_device, config=config, num_shards=X,
                               tensor_split=tensor_split)
    y = jax.shard_map(
        fn, mesh=mesh,
        in_specs=(tok, tok, tok, tok, P(EXPERT_AXIS, None, tensor), P(EXPERT_AXIS, None, tensor),
                  P(EXPERT_AXIS, tensor, None), P()),
        out_specs=tok,
    )(rows(tokens), rows(routing.experts), rows(routing.weights), valid,
      *(w.kernel for w in weights), tuple(w.fp8_state for w in weights))
    return y[:N]
