"""Parameter, KV-cache and FLOP accounting from abstract shapes (no allocation, works for 671B)."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.model import DeepSeekV3
from dsv3_jax.moe import chosen_share


@functools.lru_cache(maxsize=32)
def _param_shapes(config: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{path: shape} of every parameter, from jax.eval_shape of init."""
    abstract = jax.eval_shape(
        lambda: DeepSeekV3(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    flat = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract["params"]))[0]
    return {tuple(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
            for path, leaf in flat}


def count_params(config: ModelConfig) -> dict[str, int]:
    """Parameter counts.

    Returns:
      total: the main model (embedding, blocks, norm, head), MTP modules excluded.
      activated: parameters one token uses in the main model (K of E routed experts).
      mtp: the MTP modules' own parameters (they share embedding and head).
      embedding: the input embedding table (inside total and activated).
    """
    total = mtp = routed = embedding = 0
    for path, shape in _param_shapes(config).items():
        size = math.prod(shape)
        if path[0].startswith("mtp_"):
            mtp += size
            continue
        total += size
        if "experts" in path and "shared_experts" not in path:
            routed += size
        if path[0] == "embed_tokens":
            embedding += size
    unused = routed * (1 - config.num_experts_per_tok / config.n_routed_experts)
    return {"total": total, "activated": int(round(total - unused)), "mtp": mtp,
            "embedding": embedding}


class CacheBytes(int):
    """Latent-cache bytes per token per layer (an int), with the MHA-equivalent beside it."""

    mha_equivalent: int

    def __new__(cls, latent: int, mha_equivalent: int):
        obj = super().__new__(cls, latent)
        obj.mha_equivalent = mha_equivalent
        return obj

    @property
    def ratio(self) -> float:
        return self.mha_equivalent / int(self)


def kv_cache_bytes(config: ModelConfig, dtype=jnp.bfloat16) -> CacheBytes:
    """Bytes per token per layer of MLA's latent cache (c_kv + k_pe).

    `.mha_equivalent` is what caching per-head keys [N, H+R] and values [N, A] would cost.
    DeepSeek-V3 in bf16: 576 values = 1,152 B vs 40,960 values = 81,920 B (71x).
    """
    itemsize = np.dtype(jnp.dtype(dtype)).itemsize
    latent = (config.kv_lora_rank + config.qk_rope_head_dim) * itemsize
    mha = config.num_attention_heads * (config.qk_head_dim + config.v_head_dim) * itemsize
    return CacheBytes(latent, mha)


def flops_per_token(config: ModelConfig, seq_len: int, *, include_mtp: bool = True) -> float:
    """Training FLOPs per token (forward + backward = 3 × forward).

    Matmuls: 2 FLOPs per activated weight (the embedding lookup is not a matmul; the head is
    applied once more per MTP module). Causal attention: each query sees (T+1)/2 keys on average,
    with qk (H+R) and v (A) products per head.
    """
    counts = count_params(config)
    c = config
    matmul_params = counts["activated"] - counts["embedding"]
    attention_layers = c.num_hidden_layers
    if include_mtp and c.num_nextn_predict_layers:
        moe_expert_params = 3 * c.hidden_size * c.moe_intermediate_size
        mtp_unused = (c.n_routed_experts - c.num_experts_per_tok) * moe_expert_params
        per_module = counts["mtp"] / c.num_nextn_predict_layers - mtp_unused
        matmul_params += c.num_nextn_predict_layers * (per_module + c.hidden_size * c.vocab_size)
        attention_layers += c.num_nextn_predict_layers
    attention = (2 * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * (seq_len + 1) / 2
                 * attention_layers)
    return 3.0 * (2.0 * matmul_params + attention)


def decode_step_bytes(config: ModelConfig, batch: int, context: int, dtype=jnp.float32) -> float:
    """Bytes one decode step of `batch` sequences must read at least, at `dtype`'s size: every
    main-model weight once (of the embedding table only the batch's rows), of the routed experts
    those the batch selects, and each sequence's latent cache over `context` positions in every
    layer. Under uniform routing a MoE layer reads E·(1 − (1 − K/E)^B) experts on average
    (`moe.chosen_share`; exactly K for one sequence). Steps per second ≤ memory bandwidth /
    these bytes: decode's roofline."""
    c = config
    itemsize = np.dtype(jnp.dtype(dtype)).itemsize
    dense = routed = 0
    for path, shape in _param_shapes(c).items():
        size = math.prod(shape)
        if path[0].startswith("mtp_"):
            continue
        if path[0] == "embed_tokens":
            size = batch * c.hidden_size
        if "experts" in path and "shared_experts" not in path:
            routed += size
        else:
            dense += size
    selected = chosen_share(batch, c) if c.n_routed_experts else 0.0
    cache = int(kv_cache_bytes(c, dtype)) * context * c.num_hidden_layers * batch
    return (dense + routed * selected) * itemsize + cache
