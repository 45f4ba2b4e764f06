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


def test_tiny_preset_exercises_every_path():
    c = ModelConfig.preset("tiny")
    assert c.num_dense_layers >= 1 and c.num_moe_layers >= 1
    assert c.q_lora_rank is not None and c.rope_scaling is not None
    assert c.n_group > c.topk_group > 1 and c.num_nextn_predict_layers == 1


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


@pytest.mark.parametrize("changes, field", [
    (dict(num_experts_per_tok=17), "num_experts_per_tok"),
    (dict(n_group=3), "n_group"),
    (dict(topk_group=5), "topk_group"),
    (dict(topk_group=1, num_experts_per_tok=5), "topk_group"),  # 1 group of 4 < 5 experts
    (dict(hidden_size=0), "hidden_size"),
    (dict(num_attention_heads=-2), "num_attention_heads"),
    (dict(q_lora_rank=0), "q_lora_rank"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope_scaling"),
    (dict(rope_scaling=YarnScaling(factor=0.5)), "rope_scaling.factor"),
    (dict(scoring_func="softmax"), "scoring_func"),
    (dict(dtype="int8"), "dtype"),
    (dict(remat_policy="sometimes"), "remat_policy"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(first_k_dense_replace=-1), "first_k_dense_replace"),
    (dict(tie_word_embeddings=True), "tie_word_embeddings"),
])
def test_invalid_combinations_name_the_field(changes, field):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}=|{field}"):
        dataclasses.replace(ModelConfig.preset("tiny"), **changes)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'huge'.*allowed"):
        ModelConfig.preset("huge")


def test_config_is_hashable_for_jit():
    assert hash(ModelConfig.preset("tiny")) == hash(ModelConfig.preset("tiny"))
