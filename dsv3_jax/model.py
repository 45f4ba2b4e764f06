"""DeepSeekV3: embedding → dense blocks → scanned MoE blocks → norm → head, plus MTP modules.

Parameters (flax `params`):
  embed_tokens [V, D] · dense_layers/… [L_dense, …] · moe_layers/… [L_moe, …] · norm · lm_head
  [D, V] · mtp_k/{enorm, hnorm, eh_proj [2D, D], block/…, shared_head_norm} for each MTP depth k.
State (`moe_bias` collection): e_score_correction_bias [L_moe + num_mtp, E] float32 — one row per
MoE layer (main stack first, then MTP blocks), updated outside the gradient by the sign rule.

Both block stacks are `nn.scan`s with a leading `layers` axis, so compile time does not grow with
depth and a pipeline stage is a slice of the stack. `ModelConfig.layer_loop` unrolls a short
stack's scan in a pass without a decode cache (same parameters): each layer then reads its
weights and writes its residuals as plain slices, not per-iteration dynamic slices into
zero-filled [L, ...] stacks.

MTP (REFERENCE §4, HF MtpModel semantics): h⁰ = the main model's final normed hidden state;
depth k (0-based) sees token t_{i+k+1} at position i:
  h'ᵏ = eh_proj([enorm(Emb(t_{i+k+1})) ; hnorm(hᵏ)]),  hᵏ⁺¹ = shared_head_norm(Block(h'ᵏ)),
  mtp_logits[k] = head(hᵏ⁺¹) predicts t_{i+k+2}. Positions past the input are fed token 0 and
  must be masked by the loss (causal attention keeps them from affecting valid positions).
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig
from dsv3_jax.expert_compute import ExpertStacks, stacks_pay
from dsv3_jax.layers import (
    Einsum,
    RMSNorm,
    SwiGLU,
    dtype_of,
    logically_partitioned,
    normed_project,
    remat_policy,
)
from dsv3_jax.mla import MLA, LatentCache, LayerCache
from dsv3_jax.moe import MoE


@flax.struct.dataclass
class ModelOutput:
    logits: jax.Array  # [B, T, V] float32
    mtp_logits: tuple[jax.Array, ...]  # num_nextn_predict_layers × [B, T, V] float32
    expert_counts: jax.Array  # [L_moe + num_mtp, E] int32 assignments per expert per MoE layer
    balance_loss: jax.Array  # scalar: Σ over MoE layers of the sequence-wise Σ_i f_i·P_i
    hidden: jax.Array  # [B, T, D] final normed hidden state (h⁰ of MTP)
    cache: dict | None  # updated decode cache, when one was given


class Block(nn.Module):
    """Pre-norm transformer block: x + MLA(norm x), then x + FFN(norm x)."""

    config: ModelConfig
    moe: bool
    absorb: bool = False

    @nn.compact
    def __call__(self, x, positions, cache_index, bias, cache, stacks=None):
        c = self.config
        # each norm goes to the layer it feeds, whose decode kernels may apply it themselves
        h, cache = MLA(c, name="self_attn")(
            x, positions, cache, cache_index, absorb=self.absorb,
            norm=RMSNorm(c.hidden_size, c, name="input_layernorm"))
        x = x + h
        norm = RMSNorm(c.hidden_size, c, name="post_attention_layernorm")
        if self.moe:
            y, counts, balance = MoE(c, name="mlp")(x, bias, stacks, norm=norm)
        else:
            y, counts, balance = SwiGLU(c.intermediate_size, c, name="mlp")(x, norm), None, None
        x = nn.with_logical_constraint(x + y, ("batch", "length", "embed"))
        return x, (cache, counts, balance)


class _CarriedBlock(Block):
    """A Block whose scan carry is (x, the stack's whole decode cache or None), and whose
    scanned inputs are (its correction bias, its layer index): the layer writes into the
    carried cache in place (`LayerCache`) and, given the stack's expert kernels (gate, up,
    down), reads its experts' blocks from them (`ExpertStacks`). Same parameters as Block (a
    subclass, no scope)."""

    def __call__(self, carry, positions, cache_index, bias, layer, experts):
        x, stack = carry
        cache = None if stack is None else LayerCache(stack, layer)
        stacks = None if experts is None else ExpertStacks(*experts, layer=layer)
        x, (cache, counts, balance) = super().__call__(x, positions, cache_index, bias, cache,
                                                       stacks)
        return (x, None if cache is None else cache.stack), (counts, balance)


def _stack(config: ModelConfig, moe: bool, absorb: bool, length: int, name: str,
           cached: bool = False):
    """`length` Blocks as one nn.scan with a leading `layers` axis on every parameter, called
    as stack((x, cache or None), positions, cache_index, bias [L, E] or None, experts) →
    ((x, cache), (counts, balance)), experts: the stack's own (gate, up, down) expert kernels
    [L, …] or None (`_CarriedBlock`); `cached`: a cache is given (`ModelConfig.unrolled`)."""
    block = _CarriedBlock
    policy = remat_policy(config.remat_policy)
    unrolled = config.unrolled(length, cached)
    if policy is not None:
        # prevent_cse=False is safe only inside a loop body: in an unrolled stack XLA would
        # merge the recomputation with the forward pass and keep the activations after all.
        block = nn.remat(_CarriedBlock, policy=policy, prevent_cse=not unrolled)
    scan = nn.scan(
        block,
        variable_axes={"params": 0, "fp8": 0},  # per-layer FP8 scaling state, like params
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast, 0, 0, nn.broadcast),
        length=length,
        metadata_params={nn.PARTITION_NAME: "layers"},
        unroll=length if unrolled else 1,  # same parameters either way
    )(config, moe, absorb, name=name)
    return lambda carry, positions, cache_index, bias, experts=None: scan(
        carry, positions, cache_index, bias, jnp.arange(length, dtype=jnp.int32), experts)


class MTPModule(nn.Module):
    """One multi-token-prediction depth: combine h and the next token's embedding, one block."""

    config: ModelConfig
    absorb: bool = False

    @nn.compact
    def __call__(self, h, emb, positions, cache_index, bias, cache):
        c = self.config
        D = c.hidden_size
        joined = jnp.concatenate([RMSNorm(D, c, name="enorm")(emb),
                                  RMSNorm(D, c, name="hnorm")(h)], axis=-1)
        x = Einsum((2 * D, D), (None, "embed"), c, fp8=False, name="eh_proj")("BTX,XD->BTD",
                                                                              joined)
        x, (cache, counts, balance) = Block(c, moe=True, absorb=self.absorb, name="block")(
            x, positions, cache_index, bias, cache)
        return RMSNorm(D, c, name="shared_head_norm")(x), cache, counts, balance


class DeepSeekV3(nn.Module):
    """The DeepSeek-V3 language model. See the module docstring for parameters and MTP."""

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions=None, *, cache: dict | None = None, cache_index=None,
                 absorb: bool = False, mtp: bool = True) -> ModelOutput:
        """Runs the model.

        Args:
          tokens: [B, T] int token ids.
          positions: [B, T] absolute positions; default arange(T) (+ cache_index).
          cache: decode cache from `init_cache` (keys dense/moe/mtp), written at `cache_index`:
            a scalar, or [B] when each row continues from its own length.
          absorb: attend over the cache with the absorbed MLA path (decode steps).
          mtp: also run the MTP modules (training, drafting).
        """
        c = self.config
        B, T = tokens.shape
        if positions is None:
            positions = default_positions(B, T, cache_index)
        embedding = self.param(
            "embed_tokens",
            logically_partitioned(nn.initializers.normal(c.initializer_range),
                                  ("vocab", "embed")),
            (c.vocab_size, c.hidden_size), dtype_of(c.param_dtype))
        bias = self.variable("moe_bias", "e_score_correction_bias", jnp.zeros,
                             (c.num_moe_layers + c.num_nextn_predict_layers, c.n_routed_experts),
                             jnp.float32).value
        x = nn.with_logical_constraint(embed_lookup(embedding, tokens, c),
                                       ("batch", "length", "embed"))
        cache = dict(cache) if cache is not None else None
        get = lambda key: None if cache is None else cache[key]

        if c.num_dense_layers:
            (x, new), _ = _stack(c, False, absorb, c.num_dense_layers, "dense_layers",
                                 cache is not None)((x, get("dense")), positions, cache_index, None)
            if cache is not None:
                cache["dense"] = new
        counts, balance = [], []
        if c.num_moe_layers:
            (x, new), (layer_counts, layer_balance) = _stack(
                c, True, absorb, c.num_moe_layers, "moe_layers", cache is not None)(
                (x, get("moe")), positions, cache_index, bias[:c.num_moe_layers],
                self._expert_stacks())
            counts.append(layer_counts)
            balance.append(layer_balance)
            if cache is not None:
                cache["moe"] = new
        mtp_cache = get("mtp") if mtp else None
        hidden, logits, mtp_logits, mtp_counts, mtp_balance, new_mtp = output_heads(
            c, x, mtp_inputs(embedding, tokens, c) if mtp else (), positions, cache_index,
            bias[c.num_moe_layers:], mtp_cache, absorb=absorb)
        counts += mtp_counts
        balance += mtp_balance
        if cache is not None and new_mtp is not None:
            cache["mtp"] = new_mtp
        return ModelOutput(
            logits=logits,
            mtp_logits=tuple(mtp_logits),
            expert_counts=jnp.concatenate(counts) if counts else jnp.zeros((0, c.n_routed_experts),
                                                                           jnp.int32),
            balance_loss=sum(b.sum() for b in balance) if balance else jnp.zeros(()),
            hidden=hidden,
            cache=cache,
        )

    def _expert_stacks(self):
        """The MoE stack's (gate, up, down) expert kernels [L_moe, …] as stored, for its
        layers' blocks to read in place (`expert_compute.stacks_pay`), or None: at init, and
        when the kernels are stored in another dtype than the products run in (each layer
        would cast the whole stack)."""
        c = self.config
        if (self.is_initializing() or not stacks_pay()
                or dtype_of(c.param_dtype) != dtype_of(c.dtype)):
            return None
        experts = nn.unbox(self.variables["params"]["moe_layers"]["mlp"]["experts"])
        return tuple(experts[name]["kernel"] for name in ("gate_proj", "up_proj", "down_proj"))


def default_positions(batch: int, length: int, cache_index=None) -> jax.Array:
    """[B, T] int32 positions of T new tokens: 0..T−1 after `cache_index` (a scalar, or [B]
    with one place per row), or from 0 without one."""
    start = 0 if cache_index is None else jnp.reshape(cache_index, (-1, 1))
    return jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (batch, length))


def embed_lookup(table: jax.Array, ids: jax.Array, config: ModelConfig) -> jax.Array:
    """Rows of the embedding table [V, D] for ids [B, T], in the compute dtype.

    The table is constrained as activations see it (ZeRO-3 gathers it like every other weight;
    vocab stays split over `tensor`), so each device looks up its own tokens: gathering from a
    table split along embed would leave [B, T, D/n] rows that SPMD can only reshard to the
    batch split (and back, for the gradient) by replicating them.
    """
    table = nn.with_logical_constraint(table, ("vocab", "embed"))
    return jnp.take(table, ids, axis=0).astype(dtype_of(config.dtype))


def mtp_inputs(table: jax.Array, tokens: jax.Array, config: ModelConfig) -> tuple:
    """What MTP depth k embeds at position i: token t_{i+k+1} (token 0 past the input), for
    k < num_nextn_predict_layers; [B, T, D] each."""
    T = tokens.shape[1]
    return tuple(embed_lookup(table, jnp.pad(tokens[:, k + 1:], ((0, 0), (0, k + 1)))[:, :T],
                              config)
                 for k in range(config.num_nextn_predict_layers))


def output_heads(c: ModelConfig, x, mtp_embeds, positions, cache_index, mtp_bias, mtp_cache,
                 *, absorb: bool = False):
    """Final norm, LM head and the MTP modules, created in the calling module's scope (params
    `norm`, `lm_head`, `mtp_k`): the end of `DeepSeekV3` and of a pipeline's last stage.

    Args:
      x: [B, T, D] the last decoder layer's output;
      mtp_embeds: `mtp_inputs(...)`, or () to skip the MTP modules;
      mtp_bias: [num_mtp, E] the MTP blocks' correction biases; mtp_cache: their stacked
        LatentCache, or None.
    Returns:
      (hidden [B, T, D], logits [B, T, V] f32, mtp_logits tuple, counts list of [1, E],
       balance list of [1], new mtp cache or None)
    """
    norm = RMSNorm(c.hidden_size, c, name="norm")
    hidden = norm(x)
    head = Einsum((c.hidden_size, c.vocab_size), ("embed", "vocab"), c, out_dtype="float32",
                  fp8=False, name="lm_head")  # high precision, as in V3
    # the logits from x and the norm: on one CPU device a few rows' norm runs in the head's
    # kernel call (hidden, then needed only by MTP or a caller, is computed apart)
    logits = normed_project(x, norm, head.kernel, c, jnp.float32)
    mtp_logits, counts, balance, new_cache = [], [], [], None
    if mtp_embeds:
        h = hidden
        new_mtp = []
        for k, emb in enumerate(mtp_embeds):
            layer_cache = None if mtp_cache is None else jax.tree.map(lambda a, k=k: a[k],
                                                                      mtp_cache)
            h, layer_cache, layer_counts, layer_balance = MTPModule(
                c, absorb=absorb, name=f"mtp_{k}")(
                h, emb, positions, cache_index, mtp_bias[k],
                layer_cache)
            mtp_logits.append(head("BTD,DV->BTV", h))
            counts.append(layer_counts[None])
            balance.append(layer_balance[None])
            new_mtp.append(layer_cache)
        if mtp_cache is not None:
            new_cache = jax.tree.map(lambda *a: jnp.stack(a), *new_mtp)
    return hidden, logits, tuple(mtp_logits), counts, balance, new_cache


def init_cache(config: ModelConfig, batch: int, length: int, dtype=None) -> dict:
    """An empty latent cache for `length` positions: per stack, LatentCache with a layer axis."""
    dtype = dtype_of(config.dtype) if dtype is None else dtype
    stacked = lambda n: jax.tree.map(lambda a: jnp.broadcast_to(a, (n,) + a.shape),
                                     LatentCache.zeros(config, batch, length, dtype))
    cache = {}
    if config.num_moe_layers:
        cache["moe"] = stacked(config.num_moe_layers)
    if config.num_dense_layers:
        cache["dense"] = stacked(config.num_dense_layers)
    if config.num_nextn_predict_layers:
        cache["mtp"] = stacked(config.num_nextn_predict_layers)
    return cache


def init_variables(config: ModelConfig, rng: jax.Array, batch: int = 1, length: int = 8) -> dict:
    """Initial variables {'params', 'moe_bias'} (boxed with logical axis metadata)."""
    tokens = jnp.zeros((batch, length), jnp.int32)
    return jax.jit(DeepSeekV3(config).init)(rng, tokens)
