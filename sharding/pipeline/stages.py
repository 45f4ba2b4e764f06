"""Pipeline stages: which decoder layers each stage runs, the per-rank stacks of their
parameters, and one stage's forward over a micro-batch.

A stage is a slice of the model's scanned layer stacks: the model code is unchanged, a stage
applies the model's own `Block` to its layers' parameter slices. The embedding runs on stage 0,
the final norm, LM head, loss and MTP modules on the last stage (`model.output_heads`), so
stage s of S computes

  x_{s+1} = layers_s(x_s),   x_0 = embed(tokens),   loss = heads(layers_{S-1}(x_{S-1})).

Layer split. `split_layers` gives the decoder layers per stage: an explicit list
(`pipeline.layers_per_stage`, S non-negative integers summing to the decoder layers), or the
balanced default: every MTP module counts as one more layer on the last stage, the
units = layers + MTP modules are spread as evenly as possible, and the stages that get one unit
more are the middle ones first (1, 2, …, S−2), then stage 0, then the last. V3 (3 dense + 58 MoE
layers, 1 MTP) on 16 stages: stage 0 runs the 3 dense layers, stages 1–14 four MoE layers each,
stage 15 two MoE layers and the MTP module.

Per-rank stacks. A rank holds `chunks` stages (1 for 1F1B, 2 for DualPipe/DualPipeV). Stacks
must have one shape on every rank (one SPMD program), so each stage's dense and MoE layers are
padded to the most any stage has (`dense_slots`, `moe_slots`); a padded slot carries layer 0's
parameters and is skipped (`lax.cond`), so it costs memory but no compute and gets no gradient.
`stage_stacks` gathers the canonical [L, …] stacks into [ranks, chunks, slots, …];
`unstage` is its transpose: it sums each slot's gradient back into its layer, which is also
where DualPipe's two copies of a stage get their gradients summed (DualPipe#22), so the
optimizer sees one parameter per layer and both copies stay identical.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.layers import remat_policy
from dsv3_jax.model import Block, embed_lookup, mtp_inputs, output_heads

STACKS = ("dense_layers", "moe_layers")  # the model's scanned stacks, in layer order
HEAD_PARAMS = ("norm", "lm_head")  # + "mtp_k": the last stage's parameters outside the stacks


def split_layers(config: ModelConfig, num_stages: int,
                 layers_per_stage=None) -> tuple[int, ...]:
    """Decoder layers per stage (see the module docstring for the default rule).

    Raises:
      ValueError: an explicit split of the wrong length, with a negative entry, or whose sum
        is not the model's decoder layers.
    """
    layers = config.num_hidden_layers
    if layers_per_stage is not None:
        split = tuple(layers_per_stage)
        if (len(split) != num_stages or any(not isinstance(n, int) or isinstance(n, bool)
                                            or n < 0 for n in split)):
            raise ValueError(f"pipeline.layers_per_stage={list(split)} must list {num_stages} "
                             f"non-negative integers, one per stage")
        if sum(split) != layers:
            raise ValueError(f"pipeline.layers_per_stage={list(split)} sums to {sum(split)}; "
                             f"the model has {layers} decoder layers")
        return split
    mtp = config.num_nextn_predict_layers
    units = layers + mtp
    base, extra = divmod(units, num_stages)
    order = list(range(1, num_stages - 1)) + [0, num_stages - 1]
    split = [base] * num_stages
    for s in order[:extra]:
        split[s] += 1
    split[-1] -= mtp
    s = num_stages - 1
    while split[-1] < 0:  # more MTP modules than the last stage's share: move layers back
        s -= 1
        take = min(split[s], -split[-1])
        split[s] -= take
        split[-1] += take
    return tuple(split)


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """Where every decoder layer runs: per stage its dense and MoE layer indices, padded."""

    num_stages: int
    layers_per_stage: tuple[int, ...]
    dense: tuple[tuple[int, ...], ...]  # per stage: indices into dense_layers
    moe: tuple[tuple[int, ...], ...]  # per stage: indices into moe_layers

    @property
    def dense_slots(self) -> int:
        return max(len(d) for d in self.dense)

    @property
    def moe_slots(self) -> int:
        return max(len(m) for m in self.moe)


def plan_stages(config: ModelConfig, num_stages: int, layers_per_stage=None) -> StagePlan:
    split = split_layers(config, num_stages, layers_per_stage)
    bounds = np.cumsum((0,) + split)
    nd = config.num_dense_layers
    dense, moe = [], []
    for s in range(num_stages):
        layer_ids = range(bounds[s], bounds[s + 1])
        dense.append(tuple(i for i in layer_ids if i < nd))
        moe.append(tuple(i - nd for i in layer_ids if i >= nd))
    return StagePlan(num_stages, split, tuple(dense), tuple(moe))


def slot_indices(plan: StagePlan, stage_of: np.ndarray) -> dict[str, tuple[np.ndarray, ...]]:
    """Per stack: (layer index [ranks, chunks, slots], valid mask) for the stages
    `stage_of[rank, chunk]`; padded slots point at layer 0 and are invalid."""
    out = {}
    for stack, per_stage, slots in (("dense_layers", plan.dense, plan.dense_slots),
                                    ("moe_layers", plan.moe, plan.moe_slots)):
        index = np.zeros(stage_of.shape + (slots,), np.int32)
        valid = np.zeros(stage_of.shape + (slots,), bool)
        for (r, c), s in np.ndenumerate(stage_of):
            ids = per_stage[s]
            index[r, c, :len(ids)] = ids
            valid[r, c, :len(ids)] = True
        out[stack] = (index, valid)
    return out


def stage_stacks(tree: Any, index: np.ndarray) -> Any:
    """Canonical stacks [L, …] → per-rank stacks [ranks, chunks, slots, …] (a gather)."""
    return jax.tree.map(lambda a: jnp.take(a, jnp.asarray(index), axis=0), tree)


def unstage(staged: Any, index: np.ndarray, valid: np.ndarray, like: Any) -> Any:
    """The transpose of `stage_stacks` for gradients: each valid slot's [ranks, chunks, slots,
    …] entry summed into its layer of a zero [L, …] stack shaped like `like`."""
    flat = jnp.asarray(np.where(valid, index, -1).reshape(-1))

    def scatter(g, ref):
        g = g.reshape((-1,) + g.shape[3:])
        keep = (flat >= 0).reshape((-1,) + (1,) * (g.ndim - 1))
        return jnp.zeros(ref.shape, g.dtype).at[jnp.maximum(flat, 0)].add(
            jnp.where(keep, g, 0)).astype(ref.dtype)

    return jax.tree.map(scatter, staged, like)


class LastStageHeads(nn.Module):
    """The model's final norm, LM head and MTP modules (parameters named as in DeepSeekV3)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, mtp_embeds, positions, mtp_bias):
        _, logits, mtp_logits, counts, balance, _ = output_heads(
            self.config, x, mtp_embeds, positions, None, mtp_bias, None)
        zero = jnp.zeros((0, self.config.n_routed_experts), jnp.int32)
        return (logits, mtp_logits, jnp.concatenate(counts) if counts else zero,
                sum(b.sum() for b in balance) if balance else jnp.zeros(()))


def head_params(params: dict, config: ModelConfig) -> dict:
    """The parameters of the last stage's heads (norm, lm_head, mtp_k)."""
    names = HEAD_PARAMS + tuple(f"mtp_{k}" for k in range(config.num_nextn_predict_layers))
    return {k: params[k] for k in names}


def _layer_scan(config: ModelConfig, moe: bool, x, positions, stack, valid, bias):
    """Applies the valid slots of one padded stack to x: (x, counts [slots, E], Σ balance)."""
    block = Block(config, moe=moe)

    def apply(p, x, b):
        y, (_, counts, balance) = block.apply({"params": p}, x, positions, None, b, None)
        return y, counts, balance

    policy = remat_policy(config.remat_policy)
    if policy is not None:
        apply = jax.checkpoint(apply, policy=policy, prevent_cse=False)
    E = config.n_routed_experts

    def body(x, slot):
        p, ok, b = slot

        def run(x):
            y, counts, balance = apply(p, x, b)
            if not moe:
                counts, balance = jnp.zeros((E,), jnp.int32), jnp.zeros((), jnp.float32)
            return y, counts.astype(jnp.int32), balance.astype(jnp.float32)

        def skip(x):
            return x, jnp.zeros((E,), jnp.int32), jnp.zeros((), jnp.float32)

        y, counts, balance = jax.lax.cond(ok, run, skip, x)
        return y, (counts, balance)

    if bias is None:
        bias = jnp.zeros(valid.shape + (E,), jnp.float32)
    x, (counts, balance) = jax.lax.scan(body, x, (stack, valid, bias))
    return x, counts, balance.sum()


def stage_forward(config: ModelConfig, objective):
    """One stage's forward over a micro-batch, the same function on every stage:

      fn(weights, x_in, tokens, where) -> ((y, loss), (metrics, counts, mtp counts))

    Args:
      config: the model config.
      objective: (logits, mtp_logits, tokens [b, T+1]) -> (loss, (ce, mtp)) — the main and MTP
        losses of one micro-batch (the balance loss is added here, weighted by `where`).
    The function's arguments:
      weights: {"dense_layers", "moe_layers": one chunk's padded stacks [slots, …],
                "heads": head_params, "embed": the table [V, D]} — what is differentiated;
      x_in: [b, T, D] the previous stage's output (ignored on stage 0);
      tokens: [b, T+1] the micro-batch;
      where: {"first", "last": bool scalars; "dense_valid", "moe_valid": [slots] bools;
              "moe_bias": [moe slots, E]; "mtp_bias": [num_mtp, E]; "balance_weight": α}.
    Returns y [b, T, D] (what stage s+1 receives; its cotangent is ignored on the last stage)
    and loss = α·(this stage's balance losses) + (last stage) the objective's loss.
    """
    c = config
    mtp = c.num_nextn_predict_layers

    def fn(weights, x_in, tokens, where):
        inputs = tokens[:, :-1]
        b, T = inputs.shape
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (b, T))
        # Embedding lookups stay outside the conds (a select, not a branch): the table's
        # cotangent must not leave a branch, whose zero twin would carry another sharding.
        embedded = embed_lookup(weights["embed"], inputs, c).astype(x_in.dtype)
        x = jnp.where(where["first"], embedded, x_in)
        mtp_embeds = mtp_inputs(weights["embed"], inputs, c)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        balance = jnp.zeros((), jnp.float32)
        counts = jnp.zeros((0, c.n_routed_experts), jnp.int32)
        if "dense_layers" in weights:
            x, _, _ = _layer_scan(c, False, x, positions, weights["dense_layers"],
                                  where["dense_valid"], None)
        if "moe_layers" in weights:
            x, counts_moe, bal = _layer_scan(c, True, x, positions, weights["moe_layers"],
                                             where["moe_valid"], where["moe_bias"])
            balance = balance + bal
            counts = counts_moe

        def last(x, mtp_embeds):
            logits, mtp_logits, mtp_counts, mtp_balance = LastStageHeads(c).apply(
                {"params": weights["heads"]}, x, mtp_embeds, positions, where["mtp_bias"])
            loss, (ce, mtp_loss) = objective(logits, mtp_logits, tokens)
            return (loss.astype(jnp.float32), ce.astype(jnp.float32),
                    mtp_loss.astype(jnp.float32), mtp_counts.astype(jnp.int32),
                    jnp.asarray(mtp_balance, jnp.float32))

        def other(x, mtp_embeds):
            zero = jnp.zeros((), jnp.float32)
            return zero, zero, zero, jnp.zeros((mtp, c.n_routed_experts), jnp.int32), zero

        head_loss, ce, mtp_loss, mtp_counts, mtp_balance = jax.lax.cond(
            where["last"], last, other, x, mtp_embeds)
        balance = balance + mtp_balance
        loss = head_loss + where["balance_weight"] * balance
        metrics = {"ce": ce, "mtp": mtp_loss, "balance": balance}
        return (x, loss), (metrics, counts, mtp_counts)

    return fn
