"""Parameter, cache and FLOP accounting against counts worked out by hand from the dimensions
(REFERENCE §1), and against the published figures."""

import jax.numpy as jnp
import pytest

from dsv3_jax import ModelConfig, count_params, flops_per_token, kv_cache_bytes

# ---- DeepSeek-V3 671B by hand: D 7168, V 129280, 128 heads, q_lora 1536, kv_lora 512,
# qk_nope 128, qk_rope 64, v_head 128; 61 layers (3 dense, 58 MoE); 256 routed experts
# (8 active) + 1 shared, expert width 2048; dense FFN width 18432; one MTP module.
ATTENTION_671B = (
    7168 * 1536  # q_a_proj                                  11,010,048
    + 1536  # q_a_layernorm
    + 1536 * 128 * (128 + 64)  # q_b_proj: per head nope + rope    37,748,736
    + 7168 * (512 + 64)  # kv_a_proj_with_mqa: latent + rope key  4,128,768
    + 512  # kv_a_layernorm
    + 512 * 128 * (128 + 128)  # kv_b_proj: per head k_nope + v  16,777,216
    + 128 * 128 * 7168  # o_proj                            117,440,512
)  # = 187,107,328 (REFERENCE: 187.1M)
NORMS_671B = 2 * 7168  # input and post-attention RMSNorm per block
EXPERT_671B = 3 * 7168 * 2048  # gate, up, down of one SwiGLU expert: 44,040,192
GATE_671B = 7168 * 256  # router: 1,835,008
EMBED_671B = 7168 * 129280  # = the head: 926,679,040
TOTAL_671B = (2 * EMBED_671B + 7168  # embedding, head, final norm
              + 61 * (ATTENTION_671B + NORMS_671B)
              + 3 * 3 * 7168 * 18432  # dense FFN 396,361,728 × 3
              + 58 * (GATE_671B + 257 * EXPERT_671B))  # MoE: 256 routed + 1 shared
ACTIVATED_671B = TOTAL_671B - 58 * (256 - 8) * EXPERT_671B  # 248 idle experts per MoE layer
MTP_671B = (2 * 7168 * 7168  # eh_proj [2D, D]: 102,760,448
            + 3 * 7168  # enorm, hnorm, shared_head_norm
            + ATTENTION_671B + NORMS_671B + GATE_671B + 257 * EXPERT_671B)  # one MoE block


def test_671b_counts_by_hand_and_published():
    counts = count_params(ModelConfig.preset("deepseek-v3-671b"))
    assert counts == {"total": TOTAL_671B, "activated": ACTIVATED_671B, "mtp": MTP_671B,
                      "embedding": EMBED_671B}
    assert (TOTAL_671B, ACTIVATED_671B, MTP_671B) == (671_026_404_352, 37_552_282_624,
                                                      11_610_067_968)
    # Published: 670.9B total ("671B"), 37.4B activated ("37B"), MTP ≈ 11.6B of its own.
    assert abs(TOTAL_671B - 670.9e9) <= 0.003 * 670.9e9
    assert abs(ACTIVATED_671B - 37.4e9) <= 0.5e9
    assert abs(MTP_671B - 11.6e9) <= 0.05e9


def test_tiny_counts_by_hand():
    # tiny: D 64, V 384, 4 heads, q_lora 32, kv_lora 32, nope 16, rope 8, v 16; 4 layers
    # (1 dense, 3 MoE); 16 routed experts (4 active) + 1 shared, width 32; dense width 128.
    attention = (64 * 32 + 32  # q_a_proj 2,048 + its norm
                 + 32 * 4 * (16 + 8)  # q_b_proj 3,072
                 + 64 * (32 + 8) + 32  # kv_a_proj 2,560 + its norm
                 + 32 * 4 * (16 + 16)  # kv_b_proj 4,096
                 + 4 * 16 * 64)  # o_proj 4,096        → 15,936
    norms = 2 * 64
    expert = 3 * 64 * 32  # 6,144
    moe = 64 * 16 + 16 * expert + expert  # gate 1,024 + 16 routed + 1 shared = 105,472
    total = (2 * 384 * 64 + 64  # embedding, head, final norm: 49,216
             + 4 * (attention + norms)  # 64,256
             + 3 * 64 * 128  # dense FFN: 24,576
             + 3 * moe)  # 316,416
    assert (attention, total) == (15_936, 454_464)
    counts = count_params(ModelConfig.preset("tiny"))
    assert counts["total"] == total
    assert counts["activated"] == total - 3 * (16 - 4) * expert == 233_280
    assert counts["mtp"] == 2 * 64 * 64 + 3 * 64 + attention + norms + moe == 129_920
    assert counts["embedding"] == 384 * 64


def test_kv_cache_bytes():
    c = ModelConfig.preset("deepseek-v3-671b")
    cache = kv_cache_bytes(c, jnp.bfloat16)
    assert cache == 1152  # (512 + 64) values × 2 bytes
    assert cache.mha_equivalent == 81920  # 128 heads × (192 + 128) × 2
    assert kv_cache_bytes(c, jnp.float32) == 2304


def test_flops_per_token_671b_by_hand():
    """flops_per_token's docstring: training = 3 × forward; forward = 2 FLOPs per activated
    weight (norm scales included, the embedding lookup not) + causal attention, each query
    seeing (T+1)/2 keys with a (qk_nope + qk_rope)-long score product and a v_head-long value
    product per head, 2 FLOPs per multiply-add."""
    c = ModelConfig.preset("deepseek-v3-671b")
    T = 4096
    attention_per_layer = 2 * 128 * (192 + 128) * (T + 1) / 2  # 167,813,120 forward
    main_weights = ACTIVATED_671B - EMBED_671B  # 36,625,603,584 (the head included)
    want = 3 * (2 * main_weights + 61 * attention_per_layer)
    assert abs(want - 250_463_422_464) < 1
    got = flops_per_token(c, T, include_mtp=False)
    assert abs(got - want) <= 1e-9 * want

    # The MTP module, per token: eh_proj 2D·D, its enorm/hnorm/shared_head_norm, its block's
    # attention and norms, the router and 9 of 257 experts (8 routed + the shared one), and the
    # shared head D·V applied once more; plus one more layer of attention scores.
    mtp_weights = (2 * 7168 * 7168 + 3 * 7168 + ATTENTION_671B + NORMS_671B + GATE_671B
                   + 9 * EXPERT_671B + 7168 * 129280)  # 1,614,779,392
    assert mtp_weights == 1_614_779_392
    want_mtp = 3 * (2 * (main_weights + mtp_weights) + 62 * attention_per_layer)
    assert abs(want_mtp - 260_655_538_176) < 1
    got_mtp = flops_per_token(c, T)
    assert abs(got_mtp - want_mtp) <= 1e-9 * want_mtp


def test_decode_step_bytes_against_the_arrays_and_sampled_routing():
    """The bytes a decode step must read, against the model's own arrays: every main-model
    parameter's nbytes (MTP modules excluded), of the embedding table one row per sequence, of
    the routed experts K of E for one sequence, plus `init_cache`'s main-model arrays for the
    context.
    For a batch the share of the routed experts' bytes it counts, against the share of experts
    chosen by 20,000 sampled batches of uniform top-K choices (sampling error ~0.001; 0.005)."""
    import jax
    import numpy as np

    from dsv3_jax import init_cache, init_variables
    from dsv3_jax.accounting import decode_step_bytes

    c = ModelConfig.preset("tiny")
    params = jax.tree_util.tree_flatten_with_path(
        jax.eval_shape(lambda: init_variables(c, jax.random.key(0)))["params"])[0]
    E, K = c.n_routed_experts, c.num_experts_per_tok
    weights = routed = 0
    for path, leaf in params:
        keys = [str(getattr(k, "key", k)) for k in path]
        nbytes = np.prod(leaf.shape) * leaf.dtype.itemsize
        if keys[0].startswith("mtp_"):
            continue
        if keys[0] == "embed_tokens":
            nbytes = nbytes // c.vocab_size
        if "experts" in keys and "shared_experts" not in keys:
            routed += nbytes
        else:
            weights += nbytes
    stacks = jax.eval_shape(lambda: init_cache(c, 1, 100))
    cache = sum(np.prod(a.shape) * a.dtype.itemsize
                for a in jax.tree.leaves((stacks["dense"], stacks["moe"])))  # not "mtp"

    assert cache > 0 and routed > 0
    assert decode_step_bytes(c, 1, 100) == pytest.approx(weights + routed * K / E + cache)

    rng = np.random.default_rng(0)
    for B in (2, 8):
        picks = rng.random((20000, B, E)).argsort(-1)[..., :K]  # K distinct experts per token
        seen = np.zeros((20000, E), bool)
        np.put_along_axis(seen, picks.reshape(20000, -1), True, axis=1)
        counted = (decode_step_bytes(c, B, 0) - weights - (B - 1) * c.hidden_size * 4) / routed
        assert counted == pytest.approx(seen.mean(), abs=0.005)
