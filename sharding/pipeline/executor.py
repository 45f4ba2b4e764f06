"""The pipeline executor: any validated schedule, run in lock step inside `jax.shard_map` over
the mesh's `pipe` axis, with an explicit per-stage `jax.vjp` split into B and W.

Autodiff through a loop of ppermutes would give GPipe (every backward after every forward); a
schedule that interleaves them, or defers weight gradients, needs the backward issued by hand.
So the step is one `lax.scan` over the schedule's ticks (`sharding.pipeline.lockstep`); at tick
t every rank looks up its own entry in static tables and runs

  F   y = stage(x)                      → y to the next stage
  B   dx = ∂stage/∂x · dy                → dx to the previous stage; (x, dy) kept for W
  W   dθ += ∂stage/∂θ · dy               (the deferred weight gradient)
  BW  both at once                       → dx to the previous stage
  FB  an F and another micro-batch's BW in the same tick (one program step: XLA may overlap
      the pair's compute with its ppermutes)

and then the tick's messages move: up to four `ppermute`s (activations and gradients, to the
right and to the left neighbour; only the ones the schedule uses are emitted) plus the local
hand-off of DualPipeV's turn. A message lands in a slot of the receiver's inbox (stage inputs)
or gradbox (output cotangents), chosen statically so that no two live micro-batches share a
slot: the buffers hold the schedule's in-flight micro-batches, not all of them.

Backward ops recompute the stage's forward from its saved input (a stage is checkpointed as a
whole; inside it the model's remat policy applies per layer), so what a rank keeps per
in-flight micro-batch is one [b, T, D] input and, for a deferred W, one [b, T, D] cotangent.

Other mesh axes stay automatic inside (`axis_names={'pipe'}`): data/fsdp/expert/tensor
sharding, ZeRO-3 gathers and the expert-parallel all-to-alls work as in the unpipelined step.

Gradients: each rank accumulates its chunks' stack gradients ([chunks, slots, …], summed back
into the canonical [L, …] stacks by `stages.unstage`) and the embedding/head gradients of the
stages it holds (psum-ed over `pipe`). Loss, metrics and expert counts are sums over
micro-batches: the loss's cotangent is 1/M per micro-batch, so the result is the gradient of
the mean of the micro-batch losses — the unpipelined step's loss when micro-batches are equal.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from sharding.pipeline.schedules import Schedule, parts
from sharding.pipeline.stages import (
    STACKS,
    StagePlan,
    head_params,
    slot_indices,
    stage_forward,
    stage_stacks,
    unstage,
)
from sharding.pipeline.validate import lockstep

PIPE_AXIS = "pipe"
NONE, B_ONLY, W_ONLY, B_AND_W = 0, 1, 2, 3  # backward kinds in the tables
_BACKWARD = {"B": B_ONLY, "W": W_ONLY, "BW": B_AND_W}
SOURCES = ("left", "right", "self")  # where a message comes from, seen by its receiver


def _entries(op):
    """(forward (mb, chunk) or None, backward (kind, mb, chunk) or None) of a lockstep entry."""
    forward = backward = None
    for kind, mb, chunk in parts(op) if op is not None else ():
        if kind == "F":
            forward = (mb, chunk)
        else:
            backward = (_BACKWARD[kind], mb, chunk)
    return forward, backward


def _assign_slots(intervals: dict) -> tuple[dict, int]:
    """Greedy interval colouring: {key: (written at end of tick, last read tick)} → {key:
    slot}. A slot read at tick t may be rewritten by a message landing at the end of tick t."""
    slot_of, free_at = {}, []
    for key, (start, end) in sorted(intervals.items(), key=lambda kv: kv[1]):
        s = next((i for i, busy_until in enumerate(free_at) if busy_until <= start), None)
        if s is None:
            s = len(free_at)
            free_at.append(0)
        slot_of[key] = s
        free_at[s] = end
    return slot_of, max(1, len(free_at))


class Tables:
    """The schedule as int arrays [ticks, ranks, …] the scan body indexes by (tick, rank)."""

    def __init__(self, schedule: Schedule):
        ticks = lockstep(schedule)
        R, C = schedule.pp, schedule.chunks
        self.stage_of = np.array([[schedule.stage_of(r, c) for c in range(C)] for r in range(R)])
        fwd = {}  # (r, c, mb) -> tick of F
        bwd = {}  # (r, c, mb) -> tick of B or BW (the op that sends dx)
        last_use = {}  # (r, c, mb) -> last tick that reads its input / cotangent
        for t, row in enumerate(ticks):
            for r, op in enumerate(row):
                f, b = _entries(op)
                if f is not None:
                    fwd[(r, f[1], f[0])] = t
                if b is not None:
                    kind, mb, c = b
                    if kind != W_ONLY:
                        bwd[(r, c, mb)] = t
                    last_use[(r, c, mb)] = t  # ticks only grow: the last backward op
        # Inputs land when the previous stage's F ends; cotangents when the next stage's B ends.
        x_life, g_life = {}, {}
        for r, c, mb in fwd:
            prev = schedule.prev_hop(r, c)
            if prev is not None:
                x_life[(r, c, mb)] = (fwd[(prev[0], prev[1], mb)], last_use[(r, c, mb)])
            nxt = schedule.next_hop(r, c)
            if nxt is not None:
                g_life[(r, c, mb)] = (bwd[(nxt[0], nxt[1], mb)], last_use[(r, c, mb)])
        x_slot, self.x_slots = self._per_rank_chunk(x_life)
        g_slot, self.g_slots = self._per_rank_chunk(g_life)

        z = lambda *shape: np.zeros((len(ticks), R) + shape, np.int32)
        self.f_on, self.f_chunk, self.f_mb, self.f_slot = z(), z(), z(), z()
        self.b_kind, self.b_chunk, self.b_mb, self.b_xslot, self.b_gslot = z(), z(), z(), z(), z()
        # Receivers: [tick, rank, message (0 activation, 1 gradient), source] → on, chunk, slot
        self.recv_on, self.recv_chunk, self.recv_slot = z(2, 3), z(2, 3), z(2, 3)
        self.used = np.zeros((2, 3), bool)  # which (message, source) ever occurs
        gmb = schedule.global_microbatch
        for t, row in enumerate(ticks):
            for r, op in enumerate(row):
                f, b = _entries(op)
                if f is not None:
                    mb, c = f
                    self.f_on[t, r], self.f_chunk[t, r] = 1, c
                    self.f_mb[t, r], self.f_slot[t, r] = gmb(c, mb), x_slot.get((r, c, mb), 0)
                    self._route(t, r, schedule.next_hop(r, c), 0, mb, x_slot)
                if b is not None:
                    kind, mb, c = b
                    self.b_kind[t, r], self.b_chunk[t, r], self.b_mb[t, r] = kind, c, gmb(c, mb)
                    self.b_xslot[t, r] = x_slot.get((r, c, mb), 0)
                    self.b_gslot[t, r] = g_slot.get((r, c, mb), 0)
                    if kind != W_ONLY:
                        self._route(t, r, schedule.prev_hop(r, c), 1, mb, g_slot)

    @staticmethod
    def _per_rank_chunk(life: dict) -> tuple[dict, int]:
        groups = {}
        for (r, c, mb), span in life.items():
            groups.setdefault((r, c), {})[mb] = span
        slot, most = {}, 1
        for (r, c), spans in groups.items():
            assigned, n = _assign_slots(spans)
            most = max(most, n)
            slot.update({(r, c, mb): s for mb, s in assigned.items()})
        return slot, most

    def _route(self, t, r, hop, message, mb, slots):
        if hop is None:
            return
        dst, chunk = hop
        # a message sent to the right (dst = r + 1) arrives at dst from its left
        source = 2 if dst == r else (0 if dst == r + 1 else 1)
        self.recv_on[t, dst, message, source] = 1
        self.recv_chunk[t, dst, message, source] = chunk
        self.recv_slot[t, dst, message, source] = slots[(dst, chunk, mb)]
        self.used[message, source] = True

    def arrays(self) -> dict[str, np.ndarray]:
        names = ("f_on", "f_chunk", "f_mb", "f_slot", "b_kind", "b_chunk", "b_mb", "b_xslot",
                 "b_gslot", "recv_on", "recv_chunk", "recv_slot")
        return {n: getattr(self, n) for n in names}


def _shift(x, ranks: int, to_right: bool):
    perm = [(i, i + 1) for i in range(ranks - 1)] if to_right else \
        [(i + 1, i) for i in range(ranks - 1)]
    return jax.lax.ppermute(x, PIPE_AXIS, perm)


def _tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


def _at_chunk(tree, chunk):
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, chunk, keepdims=False), tree)


def _add_at_chunk(acc, g, chunk):
    return jax.tree.map(
        lambda a, x: jax.lax.dynamic_update_index_in_dim(
            a, jax.lax.dynamic_index_in_dim(a, chunk, keepdims=False) + x.astype(a.dtype),
            chunk, 0), acc, g)


def run_schedule(schedule: Schedule, plan: StagePlan, stage_fn, *, params: dict,
                 head: dict, bias: jax.Array, tokens: jax.Array, num_moe_layers: int,
                 balance_weight: float, dtype, mesh) -> tuple[Any, ...]:
    """Runs one pipelined forward + backward of `stage_fn` over M micro-batches.

    Args:
      schedule: a validated schedule (`sharding.pipeline.schedule`).
      plan: the stage plan (`stages.plan_stages`) for `schedule.num_stages` stages.
      stage_fn: `stages.stage_forward(config, objective)`.
      params: the canonical parameters ({'dense_layers', 'moe_layers', 'embed_tokens', …}).
      head: `stages.head_params(params, config)`.
      bias: [L_moe + num_mtp, E] the correction biases.
      tokens: [M, b, T+1] micro-batches.
    Returns:
      (grads in the structure of `params`, metrics {'loss', 'ce', 'mtp', 'balance'} as
       means over micro-batches, expert counts [L_moe + num_mtp, E] summed)
    """
    tables = Tables(schedule)
    R, C, M = schedule.pp, schedule.chunks, schedule.microbatches
    idx = slot_indices(plan, tables.stage_of)
    stacks = {k: params[k] for k in STACKS if k in params}
    staged = {k: stage_stacks(v, idx[k][0]) for k, v in stacks.items()}
    valid = {k: jnp.asarray(idx[k][1]) for k in stacks}
    moe_index = idx["moe_layers"][0]
    staged_bias = jnp.take(bias[:num_moe_layers], jnp.asarray(moe_index), axis=0) \
        if num_moe_layers else jnp.zeros(moe_index.shape + (bias.shape[-1],), bias.dtype)
    mtp_bias = bias[num_moe_layers:]
    global_w = {"heads": head, "embed": params["embed_tokens"]}
    stage_ids = jnp.asarray(tables.stage_of, jnp.int32)
    arrays = {k: jnp.asarray(v) for k, v in tables.arrays().items()}
    _, b, T1 = tokens.shape
    D = params["embed_tokens"].shape[-1]
    E = bias.shape[-1]
    L = bias.shape[0]
    used = tables.used
    # the counts row each (rank, chunk, slot) adds into
    count_rows = jnp.asarray(np.where(idx["moe_layers"][1], moe_index, L))  # L: dropped

    def per_rank(staged, valid, staged_bias, stage_ids, count_rows, global_w, mtp_bias,
                 tokens, arrays):
        staged = jax.tree.map(lambda a: a[0], staged)  # [C, slots, …]
        valid = jax.tree.map(lambda a: a[0], valid)
        staged_bias, stage_ids, count_rows = staged_bias[0], stage_ids[0], count_rows[0]
        inbox = jnp.zeros((C, tables.x_slots, b, T1 - 1, D), dtype)
        gradbox = jnp.zeros((C, tables.g_slots, b, T1 - 1, D), dtype)
        zeros_like = lambda t: jax.tree.map(jnp.zeros_like, t)
        carry = {
            "inbox": inbox, "gradbox": gradbox,
            "g_staged": zeros_like(staged), "g_global": zeros_like(global_w),
            "metrics": {k: jnp.zeros((), jnp.float32) for k in ("loss", "ce", "mtp", "balance")},
            "counts": jnp.zeros((L, E), jnp.int32),
        }

        def where_of(chunk):
            stage = stage_ids[chunk]
            w = {"first": stage == 0, "last": stage == schedule.num_stages - 1,
                 "mtp_bias": mtp_bias, "balance_weight": jnp.float32(balance_weight)}
            if "dense_layers" in valid:
                w["dense_valid"] = valid["dense_layers"][chunk]
            if "moe_layers" in valid:
                w["moe_valid"] = valid["moe_layers"][chunk]
                w["moe_bias"] = staged_bias[chunk]
            return w

        def weights_of(chunk):
            return {**_at_chunk(staged, chunk), **global_w}

        def split(w):
            return {k: w[k] for k in staged}, {k: w[k] for k in global_w}

        def send(out, used_by_source):
            """What receivers get from their left / right neighbour / themselves: only the
            directions the schedule ever uses."""
            moved = (lambda: _shift(out, R, True), lambda: _shift(out, R, False), lambda: out)
            return {source: moved[source]() for source in range(3) if used_by_source[source]}

        def tick(carry, row):
            row = jax.tree.map(lambda a: a[0], row)  # this rank's entry
            # ---- forward ----
            def forward(carry):
                c = row["f_chunk"]
                x_in = carry["inbox"][c, row["f_slot"]]
                (y, loss), (metrics, counts, mtp_counts) = stage_fn(
                    weights_of(c), x_in, tokens[row["f_mb"]], where_of(c))
                carry = dict(carry)
                carry["metrics"] = _tree_add(carry["metrics"], {"loss": loss, **metrics})
                all_counts = carry["counts"]
                if counts.shape[0]:
                    all_counts = all_counts.at[count_rows[c]].add(counts, mode="drop")
                if mtp_counts.shape[0]:  # zeros off the last stage
                    all_counts = all_counts.at[num_moe_layers:].add(mtp_counts)
                carry["counts"] = all_counts
                return carry, y.astype(dtype)

            carry, f_out = jax.lax.cond(
                row["f_on"] > 0, forward,
                lambda carry: (carry, jnp.zeros((b, T1 - 1, D), dtype)), carry)
            f_msgs = send(f_out, used[0])

            # ---- backward ----
            def backward(kind, carry):
                c = row["b_chunk"]
                x_in = carry["inbox"][c, row["b_xslot"]]
                where = where_of(c)
                dy = jnp.where(where["last"], 0, carry["gradbox"][c, row["b_gslot"]])
                toks = tokens[row["b_mb"]]
                cot = (dy, jnp.float32(1.0 / M))
                carry = dict(carry)
                if kind == B_ONLY:
                    _, vjp = jax.vjp(lambda x: stage_fn(weights_of(c), x, toks, where)[0],
                                     x_in)
                    (dx,) = vjp(cot)
                elif kind == W_ONLY:
                    _, vjp = jax.vjp(lambda w: stage_fn(w, x_in, toks, where)[0],
                                     weights_of(c))
                    (dw,) = vjp(cot)
                    dx = jnp.zeros_like(x_in)  # W sends nothing
                else:
                    _, vjp = jax.vjp(lambda w, x: stage_fn(w, x, toks, where)[0],
                                     weights_of(c), x_in)
                    dw, dx = vjp(cot)
                if kind != B_ONLY:
                    dw_staged, dw_global = split(dw)
                    carry["g_staged"] = _add_at_chunk(carry["g_staged"], dw_staged, c)
                    carry["g_global"] = _tree_add(carry["g_global"], dw_global)
                return carry, dx.astype(dtype)

            carry, b_out = jax.lax.switch(
                row["b_kind"],
                [lambda carry: (carry, jnp.zeros((b, T1 - 1, D), dtype))] +
                [lambda carry, k=k: backward(k, carry) for k in (B_ONLY, W_ONLY, B_AND_W)],
                carry)
            b_msgs = send(b_out, used[1])

            # ---- deliveries (a message sent to the right arrives from the left) ----
            carry = dict(carry)
            for message, msgs, box in ((0, f_msgs, "inbox"), (1, b_msgs, "gradbox")):
                for source, sent in msgs.items():
                    on = row["recv_on"][message, source] > 0
                    ch = row["recv_chunk"][message, source]
                    sl = row["recv_slot"][message, source]
                    old = carry[box][ch, sl]
                    carry[box] = carry[box].at[ch, sl].set(jnp.where(on, sent, old))
            return carry, None

        carry, _ = jax.lax.scan(tick, carry, arrays)
        g_global = jax.lax.psum(carry["g_global"], PIPE_AXIS)
        metrics = jax.lax.psum(carry["metrics"], PIPE_AXIS)
        counts = jax.lax.psum(carry["counts"], PIPE_AXIS)
        g_staged = jax.tree.map(lambda a: a[None], carry["g_staged"])
        return g_staged, g_global, metrics, counts

    pipe = P(PIPE_AXIS)
    g_staged, g_global, metrics, counts = jax.shard_map(
        per_rank, mesh=mesh, axis_names={PIPE_AXIS}, check_vma=False,
        in_specs=(pipe, pipe, pipe, pipe, pipe, P(), P(), P(), P(None, PIPE_AXIS)),
        out_specs=(pipe, P(), P(), P()),
    )(staged, valid, staged_bias, stage_ids, count_rows, global_w, mtp_bias, tokens, arrays)

    grads = {k: unstage(g_staged[k], idx[k][0], idx[k][1], stacks[k]) for k in stacks}
    grads.update(g_global["heads"])
    grads["embed_tokens"] = g_global["embed"]
    metrics = jax.tree.map(lambda v: v / M, metrics)
    return grads, metrics, counts


def microbatches(tokens: jax.Array, count: int) -> jax.Array:
    """[B, T+1] → [M, B/M, T+1]: micro-batch m takes rows m, m+M, m+2M, … so that each batch
    shard holds an equal part of every micro-batch."""
    B = tokens.shape[0]
    return tokens.reshape(B // count, count, tokens.shape[1]).swapaxes(0, 1)


def value_and_grad(config, schedule: Schedule, plan: StagePlan, objective,
                   balance_weight: float, mesh):
    """The pipelined counterpart of `jax.value_and_grad(loss)` for the train step:

      fn(params, moe_bias_rows [L_moe + num_mtp, E], tokens [B, T+1])
        -> ((loss, (ce, mtp, balance, expert counts)), grads)

    with loss = ce + (objective's MTP term) + α·balance as means over the micro-batches.
    """
    stage_fn = stage_forward(config, objective)
    dtype = jnp.dtype(config.dtype)

    def fn(params, bias, tokens):
        if tokens.shape[0] % schedule.microbatches:
            raise ValueError(f"a batch of {tokens.shape[0]} sequences does not split into "
                             f"{schedule.microbatches} equal micro-batches")
        grads, metrics, counts = run_schedule(
            schedule, plan, stage_fn, params=params, head=head_params(params, config),
            bias=bias, tokens=microbatches(tokens, schedule.microbatches),
            num_moe_layers=config.num_moe_layers, balance_weight=balance_weight, dtype=dtype,
            mesh=mesh)
        aux = (metrics["ce"], metrics["mtp"], metrics["balance"], counts)
        return (metrics["loss"], aux), grads

    return fn
