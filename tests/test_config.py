"""ModelConfig: presets, HF round trip, validation errors that name the field."""

import dataclasses

import pytest

from dsv3_jax import PRESETS, ModelConfig, YarnScaling


def test_671b_preset_is_the_published_config():
    c = ModelConfig.preset("deepseek-v3-671b")
    published = dict(
        hidden_size=7168, num_hidden_layers=61, first_k_dense_replace=3, intermediate_size=18432,
        moe_intermediate_size=2048, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256,
        n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
        routed_scaling_factor=2.5, vocab_size=129280, rms_norm_eps=1e-6,
        num_nextn_predict_layers=1, max_position_embeddings=163840, rope_theta=10000.0)
    assert {k: getattr(c, k) for k in published} == published
    assert c.rope_scaling == YarnScaling(factor=40.0, original_max_position_embeddings=4096,
                                         beta_fast=32.0, beta_slow=1.0, mscale=1.0,
                                         mscale_all_dim=1.0)


def test_tiny_preset_has_dense_and_moe_layers_q_lora_yarn_group_routing_and_one_mtp():
    c = ModelConfig.preset("tiny")
    assert (c.num_dense_layers, c.num_moe_layers) == (1, 3)
    assert c.q_lora_rank == 32 and c.rope_scaling == YarnScaling(
        factor=4.0, original_max_position_embeddings=256)
    assert (c.n_routed_experts, c.n_group, c.topk_group, c.num_experts_per_tok) == (16, 4, 2, 4)
    assert c.n_shared_experts == 1 and c.num_nextn_predict_layers == 1


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_round_trip(name):
    c = ModelConfig.preset(name)
    hf = c.to_hf()
    assert hf["rope_scaling"] is None or hf["rope_scaling"]["type"] == "yarn"
    back = ModelConfig.from_hf(hf, dtype=c.dtype, param_dtype=c.param_dtype,
                               remat_policy=c.remat_policy,
                               expert_block_size=c.expert_block_size)
    assert back == c


def test_from_hf_accepts_transformers_v5_rope_parameters_and_file(tmp_path):
    hf = ModelConfig.preset("tiny").to_hf()
    rope = hf.pop("rope_scaling")
    hf["rope_parameters"] = {**rope, "rope_theta": 5000.0}
    del hf["rope_theta"]
    c = ModelConfig.from_hf(hf)
    assert c.rope_theta == 5000.0 and c.rope_scaling.factor == rope["factor"]
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 5000.0}
    import json
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert ModelConfig.from_hf(tmp_path).rope_scaling is None


# One case per check of config._validate, each with the exact message (the value, what is
# wrong, what is allowed). The tiny preset has 16 routed experts in 4 groups, keep 2, K = 4.
_INVALID = [
    # positive integers (bools and floats are not integers)
    (dict(hidden_size=0), "ModelConfig.hidden_size=0 is invalid: must be a positive integer"),
    (dict(num_attention_heads=-2),
     "ModelConfig.num_attention_heads=-2 is invalid: must be a positive integer"),
    (dict(vocab_size=True), "ModelConfig.vocab_size=True is invalid: must be a positive integer"),
    (dict(expert_block_size=16.0),
     "ModelConfig.expert_block_size=16.0 is invalid: must be a positive integer"),
    # integers >= 0
    (dict(first_k_dense_replace=-1),
     "ModelConfig.first_k_dense_replace=-1 is invalid: must be an integer >= 0"),
    (dict(num_nextn_predict_layers=-1),
     "ModelConfig.num_nextn_predict_layers=-1 is invalid: must be an integer >= 0"),
    (dict(q_lora_rank=0), "ModelConfig.q_lora_rank=0 is invalid: must be a positive integer or "
                          "None (no query compression)"),
    (dict(qk_rope_head_dim=7),
     "ModelConfig.qk_rope_head_dim=7 is invalid: must be even (RoPE rotates pairs)"),
    # routing: K ≤ E; groups divide E; kept groups ≤ groups; kept groups hold ≥ K experts
    (dict(num_experts_per_tok=17),
     "ModelConfig.num_experts_per_tok=17 is invalid: must be <= n_routed_experts=16"),
    (dict(n_group=3), "ModelConfig.n_group=3 is invalid: must divide n_routed_experts=16"),
    (dict(topk_group=5), "ModelConfig.topk_group=5 is invalid: must be <= n_group=4"),
    (dict(topk_group=1, num_experts_per_tok=5),  # 1 group of 4 experts < 5
     "ModelConfig.topk_group=1 is invalid: topk_group x experts per group (4) must be >= "
     "num_experts_per_tok=5"),
    (dict(scoring_func="softmax"),
     "ModelConfig.scoring_func='softmax' is invalid: allowed: 'sigmoid'"),
    (dict(topk_method="greedy"),
     "ModelConfig.topk_method='greedy' is invalid: allowed: 'noaux_tc'"),
    (dict(hidden_act="gelu"), "ModelConfig.hidden_act='gelu' is invalid: allowed: 'silu'"),
    (dict(tie_word_embeddings=True), "ModelConfig.tie_word_embeddings=True is invalid: "
                                     "DeepSeek-V3 has an untied head; allowed: False"),
    (dict(rms_norm_eps=0.0), "ModelConfig.rms_norm_eps=0.0 is invalid: must be > 0"),
    (dict(rope_theta=-1.0), "ModelConfig.rope_theta=-1.0 is invalid: must be > 0"),
    (dict(routed_scaling_factor=0.0),
     "ModelConfig.routed_scaling_factor=0.0 is invalid: must be > 0"),
    # rope_scaling: its type, then each YaRN field
    (dict(rope_scaling="yarn"), "ModelConfig.rope_scaling='yarn' is invalid: allowed: None, a "
                                "YarnScaling, or an HF dict with type 'yarn'"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}),
     "rope_scaling type 'dynamic' is not supported; allowed: 'yarn' or null"),
    (dict(rope_scaling=YarnScaling(factor=0.5)),
     "ModelConfig.rope_scaling.factor=0.5 is invalid: must be >= 1"),
    (dict(rope_scaling=YarnScaling(original_max_position_embeddings=0)),
     "ModelConfig.rope_scaling.original_max_position_embeddings=0 is invalid: must be > 0"),
    (dict(rope_scaling=YarnScaling(beta_slow=0.0)),
     "ModelConfig.rope_scaling.beta_fast/beta_slow=(32.0, 0.0) is invalid: must be > 0"),
    # numerics and implementation options
    (dict(dtype="int8"), "ModelConfig.dtype='int8' is invalid: allowed: 'float32', "
     "'bfloat16', 'float16', or a dtype or scalar type of one (jnp.bfloat16, np.float32, "
     "jnp.dtype('bfloat16'))"),
    (dict(param_dtype="float64"), "ModelConfig.param_dtype='float64' is invalid: allowed: "
     "'float32', 'bfloat16', 'float16', or a dtype or scalar type of one (jnp.bfloat16, "
     "np.float32, jnp.dtype('bfloat16'))"),
    (dict(remat_policy="sometimes"), "ModelConfig.remat_policy='sometimes' is invalid: allowed: "
     "('none', 'full', 'dots_saveable', 'dots_with_no_batch_dims_saveable')"),
    (dict(fp8="fp4"),
     "ModelConfig.fp8='fp4' is invalid: allowed: ('none', 'delayed', 'blockwise')"),
    (dict(fp8_amax_history_length=0),
     "ModelConfig.fp8_amax_history_length=0 is invalid: must be an integer >= 1"),
    (dict(fp8_margin=-1), "ModelConfig.fp8_margin=-1 is invalid: must be an integer >= 0"),
    (dict(expert_shard_limit=0), "ModelConfig.expert_shard_limit=0 is invalid: must be None "
                                 "(no device limit) or a positive integer"),
    (dict(capacity_factor=0.0),
     "ModelConfig.capacity_factor=0.0 is invalid: must be None (dropless) or > 0"),
    (dict(capacity_factor=float("inf")),
     "ModelConfig.capacity_factor=inf is invalid: must be None (dropless) or > 0"),
]


@pytest.mark.parametrize("changes, message", _INVALID,
                         ids=["-".join(f"{k}={v}" for k, v in c.items()) for c, _ in _INVALID])
def test_each_invalid_field_raises_its_exact_message(changes, message):
    with pytest.raises(ValueError) as error:
        dataclasses.replace(ModelConfig.preset("tiny"), **changes)
    assert str(error.value) == message


@pytest.mark.parametrize("changes", [
    dict(num_experts_per_tok=16, n_group=1, topk_group=1),  # K = E, one group: all allowed
    dict(topk_group=4),  # keep every group
    dict(topk_group=1),  # one group of 4 experts holds K = 4
    dict(q_lora_rank=None, rope_scaling=None, first_k_dense_replace=0,
         num_nextn_predict_layers=0, n_shared_experts=0),
    dict(rope_scaling={"type": "yarn", "factor": 2.0}),  # an HF dict
    dict(dtype="bfloat16", param_dtype="float16", remat_policy="dots_saveable",
         expert_shard_limit=2, capacity_factor=1.25),
    dict(fp8="delayed", fp8_amax_history_length=1, fp8_margin=0),
])
def test_boundary_values_are_accepted(changes):
    dataclasses.replace(ModelConfig.preset("tiny"), **changes)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'huge'.*allowed"):
        ModelConfig.preset("huge")


def test_config_is_hashable_for_jit():
    assert hash(ModelConfig.preset("tiny")) == hash(ModelConfig.preset("tiny"))
