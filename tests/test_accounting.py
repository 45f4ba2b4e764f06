"""Parameter and cache accounting, against the published figures and a real init."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax import ModelConfig, count_params, flops_per_token, init_variables, kv_cache_bytes


def test_671b_counts_from_abstract_shapes():
    counts = count_params(ModelConfig.preset("deepseek-v3-671b"))
    assert abs(counts["total"] - 670.9e9) <= 0.003 * 670.9e9, counts
    assert abs(counts["activated"] - 37.4e9) <= 1.5e9, counts
    assert abs(counts["mtp"] - 11.6e9) <= 0.2e9, counts  # eh_proj + one MoE layer


def test_counts_match_a_real_init():
    c = ModelConfig.preset("tiny")
    params = nn.unbox(init_variables(c, jax.random.key(0))["params"])
    sizes = {k: sum(math.prod(x.shape) for x in jax.tree.leaves(v)) for k, v in params.items()}
    counts = count_params(c)
    assert counts["mtp"] == sum(v for k, v in sizes.items() if k.startswith("mtp_"))
    assert counts["total"] == sum(sizes.values()) - counts["mtp"]
    per_expert = 3 * c.hidden_size * c.moe_intermediate_size
    idle = c.num_moe_layers * (c.n_routed_experts - c.num_experts_per_tok) * per_expert
    assert counts["activated"] == counts["total"] - idle


def test_kv_cache_bytes():
    c = ModelConfig.preset("deepseek-v3-671b")
    cache = kv_cache_bytes(c, jnp.bfloat16)
    assert cache == 1152  # (512 + 64) values × 2 bytes
    assert cache.mha_equivalent == 81920  # 128 heads × (192 + 128) × 2
    assert kv_cache_bytes(c, jnp.float32) == 2304


def test_flops_per_token_671b():
    c = ModelConfig.preset("deepseek-v3-671b")
    f = flops_per_token(c, 4096, include_mtp=False)
    # ≈ 6 × 36.6B matmul params (activated minus the embedding) + causal attention
    attention = 3 * 2 * 128 * 320 * (4097 / 2) * 61
    counts = count_params(c)
    assert abs(f - (6 * (counts["activated"] - counts["embedding"]) + attention)) < 1e6
    assert flops_per_token(c, 4096) > f
