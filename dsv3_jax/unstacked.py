"""The decode layout: each layer's weights and latent cache as buffers of their own.

`DeepSeekV3` runs its layer stacks as `nn.scan`s over `[L, …]` parameters, which keeps compile
time flat in depth and makes a pipeline stage a slice of the stack. Each scan iteration reads
its layer's weights as slices of those stacks, and on XLA:CPU such a slice is a copy: in a
decode step, a few tokens per layer, copying the weights out costs as much as the step's own
products (a small-preset batch-8 step copied its three `[E, D, F]` expert stacks per layer,
~190 MB a step, for 34 of 60 thunk-ms). A decode loop therefore splits the stacks once, before
the loop (`unstack_variables`, `unstack_cache`), and runs every layer as its own `Block` over
its own buffers (`forward`): the same parameters and the same numbers as `DeepSeekV3`, with no
per-step slicing of weights or cache. Prefill stays scanned (a long prompt amortizes the
slices).

`for_decoding` is what `generate` and speculative decoding call: the split layout on XLA:CPU,
where it pays; elsewhere the stacks as they are, since the split holds a second copy of the
weights for as long as the loop runs, which accelerator memory sized for one copy (a 671B
model's shards) cannot spare.

Layout (`Unstacked`): `dense` and `moe` hold one variables dict per layer ({'params', and
'fp8' under the delayed recipe}), `rest` the variables outside the stacks (embedding, final
norm, LM head, MTP modules, the `moe_bias` collection). An unstacked cache is
{'dense': (LatentCache, …), 'moe': (LatentCache, …), 'mtp': stacked as `init_cache` makes it}.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from dsv3_jax.backends import platform
from dsv3_jax.config import ModelConfig
from dsv3_jax.layers import ABSORBED
from dsv3_jax.mla import absorbed_kernels
from dsv3_jax.model import (
    Block,
    DeepSeekV3,
    ModelOutput,
    default_positions,
    embed_lookup,
    output_heads,
)

_STACKS = (("dense", "dense_layers", False), ("moe", "moe_layers", True))


@flax.struct.dataclass
class Unstacked:
    """A model's variables with each layer of the two stacks as a variables dict of its own."""

    dense: tuple  # L_dense × {collection: tree}
    moe: tuple  # L_moe × {collection: tree}
    rest: dict  # {collection: tree} without dense_layers / moe_layers


def _layers(config: ModelConfig, variables: dict, name: str, length: int) -> tuple:
    stacks = {col: tree[name] for col, tree in variables.items() if name in tree}
    layers = tuple(jax.tree.map(lambda a, i=i: a[i], stacks) for i in range(length))
    if config.fp8 != "none":
        return layers
    # the decode kernels, made once (`layers.ABSORBED`): MLA's (`mla.absorbed_kernels`) and a
    # dense SwiGLU's [gate | up]
    def decode_kernels(params):
        out = {"self_attn": absorbed_kernels(params["self_attn"])}
        if "gate_proj" in params["mlp"]:
            mlp = params["mlp"]
            out["mlp"] = {"gate_up": jnp.concatenate([mlp["gate_proj"]["kernel"],
                                                      mlp["up_proj"]["kernel"]], axis=1)}
        return out

    return tuple({**layer, ABSORBED: decode_kernels(layer["params"])} for layer in layers)


def unstack_variables(config: ModelConfig, variables: dict) -> Unstacked:
    """Splits the layer stacks of `DeepSeekV3` variables (boxed or plain) into per-layer ones:
    one copy of the weights, made once (call it outside the decode loop); without an FP8
    recipe each layer also holds its decode kernels (`layers.ABSORBED`)."""
    variables = nn.unbox(variables)
    names = {name for _, name, _ in _STACKS}
    rest = {col: {k: v for k, v in tree.items() if k not in names}
            for col, tree in variables.items()}
    return Unstacked(dense=_layers(config, variables, "dense_layers", config.num_dense_layers),
                     moe=_layers(config, variables, "moe_layers", config.num_moe_layers),
                     rest=rest)


def unstack_cache(cache: dict) -> dict:
    """`init_cache`'s layout → per-layer LatentCaches for the dense and MoE stacks; a
    one-sequence cache's without their batch axis (`LatentCache.squeeze`: written and read in
    place on XLA:CPU)."""
    def split(stack):
        layers = tuple(jax.tree.map(lambda a, i=i: a[i], stack)
                       for i in range(stack.c_kv.shape[0]))
        return tuple(c.squeeze() for c in layers) if stack.c_kv.shape[1] == 1 else layers

    return {key: split(value) if key in ("dense", "moe") else value
            for key, value in cache.items()}


def restack_cache(cache: dict) -> dict:
    """`unstack_cache`'s inverse: the layout `init_cache` makes and `DeepSeekV3` takes (a
    cache already in it is returned as it is)."""
    stack = lambda layers: jax.tree.map(lambda *a: jnp.stack(a), *(c.view() for c in layers))
    return {key: stack(value) if isinstance(value, tuple) else value
            for key, value in cache.items()}


def split_pays() -> bool:
    """Whether decode loops split the stacks (`for_decoding`): on XLA:CPU, where the code is
    traced for (`backends.platform`)."""
    return platform() == "cpu"


def for_decoding(config: ModelConfig, variables: dict, cache: dict):
    """(weights, cache, step) for a decode loop, made once before it: step(weights, tokens
    [B, T], positions [B, T], cache, cache_index) → ModelOutput (absorbed path, no MTP), the
    cache it returns in the layout it took. The per-layer layout when `split_pays()`, else
    `DeepSeekV3.apply` over the stacks (module docstring)."""
    split = split_pays()
    return (decoding_weights(config, variables, split), decoding_cache(cache, split),
            decoding_forward(config, split))


def decoding_weights(config: ModelConfig, variables: dict, split: bool) -> Unstacked | dict:
    """`for_decoding`'s weights: `unstack_variables` when split, else the variables as given."""
    return unstack_variables(config, variables) if split else variables


def decoding_cache(cache: dict, split: bool) -> dict:
    """`for_decoding`'s cache from `init_cache`'s layout: `unstack_cache` when split."""
    return unstack_cache(cache) if split else cache


def decoding_forward(config: ModelConfig, split: bool):
    """`for_decoding`'s step function over `decoding_weights` and `decoding_cache`."""
    if split:
        return lambda w, tokens, positions, cache, index: forward(
            config, w, tokens, positions, cache=cache, cache_index=index)
    model = DeepSeekV3(config)
    return lambda w, tokens, positions, cache, index: model.apply(
        w, tokens, positions, cache=cache, cache_index=index, absorb=True, mtp=False)


class _Heads(nn.Module):
    """The final norm and LM head (parameters named as in DeepSeekV3)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        hidden, logits, *_ = output_heads(self.config, x, (), None, None, None, None)
        return hidden, logits


def forward(config: ModelConfig, variables: Unstacked, tokens: jax.Array,
            positions: jax.Array | None = None, *, cache: dict, cache_index,
            absorb: bool = True) -> ModelOutput:
    """`DeepSeekV3(config).apply(variables, tokens, positions, cache=…, cache_index=…,
    absorb=…, mtp=False)` over unstacked variables and an unstacked cache (module docstring):
    the same outputs, with `cache` the updated unstacked cache and no MTP logits."""
    c = config
    if not isinstance(variables, Unstacked):
        raise TypeError(f"unstacked.forward takes unstack_variables(config, variables); got "
                        f"{type(variables).__name__}")
    for key, _, _ in _STACKS:
        if key in cache and not isinstance(cache[key], tuple):
            raise TypeError(f"unstacked.forward takes unstack_cache(cache); cache[{key!r}] is "
                            f"stacked ({type(cache[key]).__name__})")
    if positions is None:
        positions = default_positions(*tokens.shape, cache_index)
    params = variables.rest["params"]
    bias = variables.rest["moe_bias"]["e_score_correction_bias"]
    x = nn.with_logical_constraint(embed_lookup(params["embed_tokens"], tokens, c),
                                   ("batch", "length", "embed"))
    cache, counts, balance = dict(cache), [], []
    for key, _, moe in _STACKS:
        layers, new = getattr(variables, key), []
        for i, layer in enumerate(layers):
            x, (layer_cache, layer_counts, layer_balance) = Block(c, moe=moe, absorb=absorb).apply(
                layer, x, positions, cache_index, bias[i] if moe else None, cache[key][i])
            new.append(layer_cache)
            if moe:
                counts.append(layer_counts)
                balance.append(layer_balance)
        if layers:
            cache[key] = tuple(new)
    heads = {"params": {k: params[k] for k in ("norm", "lm_head")}}
    hidden, logits = _Heads(c).apply(heads, x)
    return ModelOutput(
        logits=logits, mtp_logits=(),
        expert_counts=(jnp.stack(counts) if counts
                       else jnp.zeros((0, c.n_routed_experts), jnp.int32)),
        balance_loss=sum(b.sum() for b in balance) if balance else jnp.zeros(()),
        hidden=hidden, cache=cache)
