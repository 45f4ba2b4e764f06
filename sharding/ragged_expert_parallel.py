"""Dropless expert parallelism without worst-case buffers: `moe_impl="ragged"` under a mesh.

`sharding.expert_parallel.routed_experts` runs `per_device` inside its shard_map when the MoE
resolves to "ragged". Dimension key (per device): n tokens · K experts per token · D model ·
X expert shards · El = E/X experts per shard · A = n·K assignments · Rb receive-buffer rows.

Per device, for one MoE layer (the MaxText pattern: one row per assignment, no de-duplication,
so a received row belongs to exactly one local expert):
  1. Sort the A assignments by global expert: rows for shard j are contiguous, in expert order
     (`x_send` [A, D]); `counts` [E] per expert, send_sizes [X] per destination.
  2. Exchange the counts first (all_to_all of [X, El] counts and of the offsets): each
     receiver learns how many rows each sender has for each of its experts, each sender where
     its rows start on each receiver.
  3. Send only the routed rows (`exchange`: `jax.lax.ragged_all_to_all` on TPU/GPU) into a
     receive buffer of Rb = ceil(ep_buffer_factor · A) rows: the expected load is the device's
     own A assignments (equal n on every device; balanced routing receives what it sends).
  4. Sort the received rows by local expert (from the exchanged counts, no ids travel), run
     `ragged_swiglu` (jax.lax.ragged_dot grouped GEMMs), unsort, send each row back to where it
     came from (the reverse ragged exchange), unsort to [n, K, D] and combine with the routing
     weights on the sender; psum over `tensor` when the expert hidden size is split.

Overflow: receive positions are numbered per receiver, sender by sender. A step whose busiest
device receives T > Rb rows runs ceil(T / Rb) rounds of steps 3-4, round r carrying receive
positions [r·Rb, (r+1)·Rb) — every assignment is computed, nothing drops, the buffers stay Rb
rows. Rounds after the first run in a while loop under a custom VJP (the backward recomputes
each extra round's forward, one round at a time), so they cost nothing when routing fits.
Each overflowing layer execution is counted (`overflow_events`) and logged as a warning from
a host callback (one per layer execution, from the mesh's first device; a remat recompute
counts again).

CPU twin: XLA:CPU does not implement ragged-all-to-all, so `exchange` realizes the same
(input_offsets, send_sizes, output_offsets, recv_sizes) semantics with an all_to_all of
[X, bound, D] per-peer buffers padded to the most rows one peer can send (worst-case sized,
for tests only) plus an all_to_all of the output offsets, and a scatter at those offsets.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.expert_compute import ragged_swiglu, sort_by_expert
from dsv3_jax.layers import Weight, dtype_of
from dsv3_jax.moe import gather_rows

EXPERT_AXIS = "expert"
TENSOR_AXIS = "tensor"
_log = logging.getLogger(__name__)
_overflows: list[dict] = []


def overflow_events() -> list[dict]:
    """Layer executions whose receive buffer overflowed, oldest first: dicts of
    max_rows (the busiest device's received rows), buffer_rows and rounds."""
    return list(_overflows)


def clear_overflow_events() -> None:
    _overflows.clear()


def _record_overflow(device, max_rows, buffer_rows, rounds):
    if int(device) != 0:
        return
    event = dict(max_rows=int(max_rows), buffer_rows=int(buffer_rows), rounds=int(rounds))
    _overflows.append(event)
    _log.warning("ragged expert parallelism: a device receives %(max_rows)d rows, over its "
                 "%(buffer_rows)d-row buffer (ModelConfig.ep_buffer_factor): %(rounds)d "
                 "exchange rounds this layer, nothing dropped", event)


def _a2a(x):
    return jax.lax.all_to_all(x, EXPERT_AXIS, 0, 0, tiled=True)


def exchange(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
             primitive: bool):
    """`jax.lax.ragged_all_to_all` over `expert` (primitive=True), or its CPU twin.

    Sends operand[input_offsets[j] : +send_sizes[j]] to peer j, where it lands at
    output[output_offsets[j] : +send_sizes[j]]; recv_sizes[i] rows arrive from peer i. Rows of
    `output` that nothing lands on keep their value.
    """
    if primitive:
        return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes,
                                         output_offsets, recv_sizes, axis_name=EXPERT_AXIS)
    bound = min(operand.shape[0], output.shape[0])  # the most rows one peer can send
    t = jnp.arange(bound, dtype=jnp.int32)[None, :]
    src = jnp.where(t < send_sizes[:, None], input_offsets[:, None] + t, operand.shape[0])
    got = _a2a(gather_rows(operand, src))  # [X, bound, D]: block i from peer i
    dst = _a2a(output_offsets)[:, None] + t  # where peer i's rows land here
    dst = jnp.where(t < recv_sizes[:, None], dst, output.shape[0])  # out of range: dropped
    return output.at[dst.reshape(-1)].set(got.reshape(-1, *operand.shape[1:]), mode="drop")


class Plan(NamedTuple):
    """One device's exchange plan (all int32; [X] arrays indexed by peer)."""

    send_offsets: jax.Array  # where my rows for peer j start in x_send
    send_sizes: jax.Array  # my rows for peer j
    dest_offsets: jax.Array  # where my rows start in peer j's receive order
    recv_offsets: jax.Array  # where peer i's rows start in my receive order
    recv_sizes: jax.Array  # rows peer i sends me
    src_offsets: jax.Array  # where peer i's rows for me start in its x_send
    recv_ends: jax.Array  # [X, El] cumulative rows per local expert within peer i's run
    total: jax.Array  # rows I receive
    rounds: jax.Array  # exchange rounds this layer (the same on every device)


def _window(offsets, sizes, lo, hi):
    """The part [start, start + size) of each run [offsets, offsets + sizes) inside [lo, hi)."""
    start = jnp.clip(offsets, lo, hi)
    return start, jnp.clip(offsets + sizes, lo, hi) - start


def _round(r, x_send, kernels, plan: Plan, *, config: ModelConfig, buffer_rows: int,
           primitive: bool):
    """Receive positions [r·Rb, (r+1)·Rb): out, through the local experts, and back.
    Returns [A, D]: the outputs of the rows sent this round, zero elsewhere."""
    Rb, p = buffer_rows, plan
    lo, hi = r * Rb, (r + 1) * Rb
    send_start, send_size = _window(p.dest_offsets, p.send_sizes, lo, hi)
    recv_start, recv_size = _window(p.recv_offsets, p.recv_sizes, lo, hi)
    zeros = jnp.zeros((Rb,) + x_send.shape[1:], x_send.dtype)
    recv = exchange(x_send, _like(zeros, x_send), p.send_offsets + send_start - p.dest_offsets,
                    send_size, send_start - lo, recv_size, primitive=primitive)  # [Rb, D]

    # Local expert of each buffer row, from the exchanged per-expert counts.
    q = lo + jnp.arange(Rb, dtype=jnp.int32)  # receive position
    sender = jnp.clip(jnp.searchsorted(p.recv_offsets, q, side="right") - 1, 0, None)
    within = q - p.recv_offsets[sender]
    local = (within[:, None] >= p.recv_ends[sender]).sum(1).astype(jnp.int32)  # [Rb]
    El = p.recv_ends.shape[1]
    order, sizes = sort_by_expert(local, El, q < p.total)
    weights = tuple(Weight(k) for k in kernels)
    y_sorted = ragged_swiglu(jnp.take(recv, order, axis=0), sizes, weights, config)
    y_recv = jnp.zeros_like(y_sorted).at[order].set(y_sorted, unique_indices=True)

    back = jnp.zeros_like(x_send)
    return exchange(y_recv.astype(x_send.dtype), _like(back, x_send), recv_start - lo,
                    recv_size, p.src_offsets + recv_start - p.recv_offsets, send_size,
                    primitive=primitive)


def _like(zeros, *xs):
    """`zeros` varying over the mesh axes any of `xs` varies over (a while-loop carry must keep
    its type)."""
    want = frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in xs))
    vma = tuple(sorted(want - jax.typeof(zeros).manual_axis_type.varying))
    return jax.lax.pcast(zeros, vma, to="varying") if vma else zeros


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _extra_rounds(round_fn, x_send, kernels, plan: Plan):
    """Σ_{r = 1}^{rounds-1} round_fn(r, x_send, kernels, plan): zero when everything fitted."""
    def body(carry):
        r, acc = carry
        return r + 1, acc + round_fn(r, x_send, kernels, plan)

    start = (jnp.int32(1), _like(jnp.zeros_like(x_send), x_send, *kernels))
    return jax.lax.while_loop(lambda c: c[0] < plan.rounds, body, start)[1]


def _extra_rounds_fwd(round_fn, x_send, kernels, plan):
    return _extra_rounds(round_fn, x_send, kernels, plan), (x_send, kernels, plan)


def _extra_rounds_bwd(round_fn, residuals, dy):
    x_send, kernels, plan = residuals

    def body(carry):
        r, dx, dk = carry
        _, vjp = jax.vjp(lambda x, k: round_fn(r, x, k, plan), x_send, kernels)
        ddx, ddk = vjp(dy)
        return r + 1, dx + ddx, jax.tree.map(jnp.add, dk, ddk)

    start = (jnp.int32(1), _like(jnp.zeros_like(x_send), x_send),
             jax.tree.map(lambda k: _like(jnp.zeros_like(k), k), kernels))
    _, dx, dk = jax.lax.while_loop(lambda c: c[0] < plan.rounds, body, start)
    return dx, dk, jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0), plan)


_extra_rounds.defvjp(_extra_rounds_fwd, _extra_rounds_bwd)


def per_device(x, experts, weights, valid, w_gate, w_up, w_down, states, *,
               config: ModelConfig, num_shards: int, tensor_split: bool, primitive: bool,
               mesh_axes: tuple[str, ...]):
    """The ragged dispatch → local experts → combine for one device's tokens (module docstring).

    Args:
      x: [n, D] tokens; experts: [n, K] global expert ids; weights: [n, K] combine weights;
      valid: [n] False for padding rows (never sent).
      w_gate, w_up: [El, D, F] this shard's experts; w_down: [El, F, D]; states: unused (no FP8
        recipe on the ragged path).
      primitive: ragged_all_to_all (TPU/GPU) rather than the padded CPU twin.
      mesh_axes: every mesh axis (the round count is agreed over all of them).
    Returns:
      [n, D] routed-expert output in x's dtype.
    """
    del states
    n, K = experts.shape
    X, E = num_shards, config.n_routed_experts
    El, A = E // X, n * K
    Rb = max(1, math.ceil(config.ep_buffer_factor * A))
    dtype = dtype_of(config.dtype)

    order, counts = sort_by_expert(experts.reshape(-1), E, jnp.repeat(valid, K))
    x_send = jnp.take(x.astype(dtype), order // K, axis=0)  # [A, D], by destination and expert
    send_sizes = counts.reshape(X, El).sum(1)
    send_offsets = jnp.cumsum(send_sizes) - send_sizes
    recv_counts = _a2a(counts.reshape(X, El))  # [X senders, El]
    recv_sizes = recv_counts.sum(1)
    recv_offsets = jnp.cumsum(recv_sizes) - recv_sizes
    total = recv_sizes.sum()
    busiest = jax.lax.pmax(total, mesh_axes)
    rounds = jnp.maximum(1, (busiest + Rb - 1) // Rb).astype(jnp.int32)
    plan = Plan(send_offsets, send_sizes, _a2a(recv_offsets), recv_offsets, recv_sizes,
                _a2a(send_offsets), jnp.cumsum(recv_counts, axis=1), total, rounds)

    device = jax.lax.axis_index(mesh_axes)
    jax.lax.cond(rounds > 1, lambda: jax.debug.callback(_record_overflow, device, busiest, Rb,
                                                        rounds), lambda: None)

    round_fn = functools.partial(_round, config=config, buffer_rows=Rb, primitive=primitive)
    kernels = (w_gate, w_up, w_down)
    y_send = round_fn(jnp.int32(0), x_send, kernels, plan) + _extra_rounds(
        round_fn, x_send, kernels, plan)
    y_assign = jnp.zeros_like(y_send).at[order].set(y_send, unique_indices=True)
    y = jnp.einsum("NKD,NK->ND", y_assign.reshape(n, K, -1).astype(jnp.float32), weights)
    if tensor_split:
        y = jax.lax.psum(y, TENSOR_AXIS)
    return y.astype(x.dtype)
