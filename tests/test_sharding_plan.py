"""The memory plan and golden sharding layouts, from abstract shapes only (no allocation).

Golden files hold one line per parameter and optimizer leaf: path, global shape, PartitionSpec,
per-device shape. Regenerate after an intended change with
  DSV3_UPDATE_GOLDEN=1 python -m pytest tests/test_sharding_plan.py
and review the diff.
"""

import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from dsv3_jax import ModelConfig
from sharding import mesh as mesh_lib
from sharding import placement, plan

GOLDEN = pathlib.Path(__file__).parent / "golden"
V3_MESH = dict(expert=64, pipe=16, data=-1)  # EP64 x PP16 x DP (ZeRO-1) over 2048 devices

CASES = {
    "sharding_tiny_fsdp.txt": ("tiny", dict(data=2, fsdp=2, expert=2), 8, "fsdp"),
    "sharding_tiny_tensor.txt": ("tiny", dict(fsdp=4, tensor=2), 8, "fsdp"),
    "sharding_671b_zero1.txt": ("deepseek-v3-671b", V3_MESH, 2048, "zero1"),
    "sharding_671b_fsdp.txt": ("deepseek-v3-671b", dict(expert=64, fsdp=-1, tensor=4), 2048,
                               "fsdp"),
}


@pytest.mark.parametrize("filename", list(CASES))
def test_golden_sharding(filename):
    preset, mesh, devices, layout = CASES[filename]
    shape = mesh_lib.mesh_shape(mesh, devices)
    abstract = plan.abstract_train_state(ModelConfig.preset(preset))
    text = plan.describe(nn.unbox(abstract), placement.tree_specs(abstract, shape, layout), shape)
    path = GOLDEN / filename
    if os.environ.get("DSV3_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{filename} changed; see the module docstring to update"


def counted_by_hand(c: ModelConfig) -> tuple[int, int]:
    """(routed-expert parameters, all other parameters) incl. MTP, from the dimensions alone."""
    D, N, H, R, A, C = (c.hidden_size, c.num_attention_heads, c.qk_nope_head_dim,
                        c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank)
    if c.q_lora_rank is None:
        query = D * N * (H + R)
    else:
        Q = c.q_lora_rank
        query = D * Q + Q + Q * N * (H + R)  # q_a_proj, q_a_layernorm, q_b_proj (nope, rope)
    attention = query + D * (C + R) + C + C * N * (H + A) + N * A * D  # kv_a, norm, kv_b, o
    norms = 2 * D  # input and post-attention RMSNorm
    dense = attention + norms + 3 * D * c.intermediate_size
    moe_blocks = c.num_moe_layers + c.num_nextn_predict_layers  # the MTP block is a MoE block
    moe_other = (attention + norms + D * c.n_routed_experts  # router
                 + 3 * D * c.moe_intermediate_size * c.n_shared_experts)
    mtp_own = 3 * D + 2 * D * D  # enorm, hnorm, shared_head_norm; eh_proj [2D, D]
    routed = moe_blocks * c.n_routed_experts * 3 * D * c.moe_intermediate_size
    other = (2 * c.vocab_size * D + D  # embedding, head, final norm
             + c.num_dense_layers * dense + moe_blocks * moe_other
             + c.num_nextn_predict_layers * mtp_own)
    return routed, other


def test_shard_bytes_of_a_known_tensor():
    """[3, 16, 64, 32] fp32 under P(None, expert, (data, fsdp), tensor) on data 2 x fsdp 2 x
    expert 4 x tensor 2: a [3, 4, 16, 16] shard, 3·4·16·16·4 = 12,288 B; bf16 half of it."""
    shape = dict(data=2, fsdp=2, expert=4, tensor=2, pipe=1)
    spec = P(None, "expert", ("data", "fsdp"), "tensor")
    assert plan.shard_bytes(jax.ShapeDtypeStruct((3, 16, 64, 32), jnp.float32), spec,
                            shape) == 12_288
    assert plan.shard_bytes(jax.ShapeDtypeStruct((3, 16, 64, 32), jnp.bfloat16), spec,
                            shape) == 6_144
    assert plan.shard_bytes(jax.ShapeDtypeStruct((64, 32), jnp.float32), P(), shape) == 8_192


@pytest.mark.parametrize("layout", ["dp", "fsdp", "zero1"])
def test_tiny_plan_by_hand(layout):
    """The tiny model on data 2 x expert 4, every figure from the dimensions: the routed
    experts are split 4 ways over expert; the rest (fp32, every leaf divisible by 4 and 8) is
    replicated (dp, zero1) or split 4 ways over expert along embed / q_lora / kv_lora (fsdp:
    EP ranks are the data-parallel ranks of the non-expert weights). Gradients are placed as
    the parameters; AdamW's two moments as the parameters (dp, fsdp) or 8 ways over
    data x expert (zero1), plus the step counters."""
    config = ModelConfig.preset("tiny")
    routed, other = counted_by_hand(config)
    report = plan.make_plan(config, dict(data=2, expert=4), 8, layout)
    per = report["per_device_bytes"]
    assert report["total_params"] == routed + other == 584_384  # incl. MTP
    params = 4 * (routed / 4 + (other / 4 if layout == "fsdp" else other))
    moments = 2 * 4 * (routed + other) / 8 if layout == "zero1" else 2 * params
    assert per["params"] == params, (per, params)
    assert per["grads"] == params, (per, params)
    assert moments <= per["opt_state"] <= moments + 16, (per, moments)  # + int32 counters
    assert per["moe_bias"] == 4 * 16 * (config.num_moe_layers + 1)  # [L_moe + MTP, E] fp32


def test_v3_layout_per_device_bytes():
    """EP64 x PP16 x DP2 (ZeRO-1): parameters replicate over data and split over the 16 pipe
    ranks, AdamW state splits over data x expert (x pipe where the size allows); each rank adds
    its stage copies, gathered over pipe.

    By hand, from the dimensions (`counted_by_hand`): 665.2B routed-expert parameters split
    over expert (64) and 17.4B others, all split over pipe along embed / q_lora / kv_lora, fp32:
    4 B x (665.2B / 64 + 17.4B) / 16 = 6.48 GiB of parameters, as many of gradients. The two
    fp32 moments: routed ones over expert x data x pipe = 2048, the others over data x expert =
    128 where embed (7168 = 2^10 x 7) cannot take pipe as well: 8 B x (665.2B / 2048 + 17.4B /
    128) ≈ 3.4 GiB (within 2%: a few smaller tensors split further). Stage copies (1F1B, 16
    stages: 3 dense slots and 4 MoE slots per rank): 3/3 of the dense stack and 4/58 of the MoE
    stack, not split over pipe.
    """
    config = ModelConfig.preset("deepseek-v3-671b")
    routed, other = counted_by_hand(config)
    report = plan.make_plan(config, V3_MESH, 2048, "zero1")
    per = report["per_device_bytes"]
    assert report["total_params"] == routed + other == 682_636_472_320  # 670.9B + MTP 11.7B
    assert routed == 59 * 256 * 3 * 7168 * 2048
    params = 4 * (routed / 64 + other) / 16
    assert per["params"] == params and per["grads"] == params, (per, params)
    assert per["opt_state"] == pytest.approx(8 * (routed / 2048 + other / 128), rel=0.02)
    assert per["params"] / 2**30 == pytest.approx(6.484, abs=5e-4)
    shape = mesh_lib.mesh_shape(V3_MESH, 2048)
    abstract = plan.abstract_train_state(config)
    tree, specs = nn.unbox(abstract)["params"], placement.tree_specs(abstract, shape,
                                                                     "zero1")["params"]
    gathered = {**shape, "pipe": 1}  # a rank's stage copies are whole over pipe
    stack = {k: plan.per_device_bytes(tree[k], specs[k], gathered)
             for k in ("dense_layers", "moe_layers")}
    assert per["stage_params"] == stack["dense_layers"] + 4 * stack["moe_layers"] // 58
    assert per["stage_grads"] == per["stage_params"]
    dual = plan.make_plan(config, V3_MESH, 2048, "zero1", schedule="dualpipe")
    assert dual["per_device_bytes"]["stage_params"] == 2 * per["stage_params"]  # two copies
    # ZeRO-1 replicates parameters over data, but pipe splits every one of them
    assert report["replicated_above_threshold"] == []
    flat = plan.make_plan(config, dict(expert=64, data=-1), 2048, "zero1")
    assert flat["replicated_above_threshold"]  # without pipe: replicated by design
    assert all(not r["path"].startswith("opt_state") for r in flat["replicated_above_threshold"])


def test_fsdp_layout_leaves_nothing_large_replicated():
    report = plan.make_plan(ModelConfig.preset("deepseek-v3-671b"),
                            dict(expert=64, fsdp=-1, tensor=4), 2048, "fsdp",
                            replicated_threshold=2**20)
    assert report["replicated_above_threshold"] == []


def test_plan_rejects_meshes_that_do_not_divide_the_model():
    v3 = ModelConfig.preset("deepseek-v3-671b")
    with pytest.raises(ValueError, match="n_routed_experts=256 is not divisible by mesh.expert"):
        plan.make_plan(v3, dict(expert=48, data=-1), 48 * 32)
    with pytest.raises(ValueError, match="num_attention_heads=128 is not divisible by mesh.tensor"):
        plan.make_plan(v3, dict(tensor=3, data=-1), 3 * 512)
    with pytest.raises(ValueError, match="vocab_size=386 is not divisible by mesh.tensor=4"):
        plan.make_plan(ModelConfig.preset("tiny", vocab_size=386), dict(tensor=4), 4)
    with pytest.raises(ValueError, match="hidden_size"):  # 7168 = 2^10 x 7 over fsdp=2048
        plan.make_plan(v3, dict(fsdp=-1), 2048)


# Not divided by pipe (the pipeline keeps the unpipelined state layout), plus one 1F1B stage's
# copies: 4 MoE layer slots (58 MoE layers + 3 dense + MTP on 16 stages: 3, 4 x 14, 2 + MTP).
# The state split over the 16 pipe ranks too; one 1F1B stage's gathered copies: 3 dense and 4
# MoE layer slots (58 MoE layers + 3 dense + MTP on 16 stages: 3, 4 x 14, 2 + MTP).
V3_TOTALS = ["params          6.484 GiB", "grads           6.484 GiB",
             "opt_state       3.386 GiB", "stage_params     12.618 GiB",
             "stage_grads     12.618 GiB", "total          41.589 GiB"]


@pytest.mark.parametrize("args", [
    # as the README shows it
    ["--config=configs/deepseek_v3_671b.py", "--config.mesh.expert=64", "--config.mesh.pipe=16",
     "--config.mesh.data=-1", "--config.mesh.layout=zero1", "--devices=2048"],
    ["--preset=deepseek-v3-671b", "--mesh=expert=64,pipe=16,data=-1", "--devices=2048",
     "--layout=zero1"],
], ids=["config", "preset"])
def test_plan_command_line(args):
    """The README's EP64 x PP16 x DP2 ZeRO-1 table (1F1B stage copies included)."""
    r = subprocess.run([sys.executable, "-m", "sharding.plan", *args], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                       cwd=pathlib.Path(__file__).parent.parent)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "682.64B parameters (incl. MTP) on 2048 devices" in out, out
    assert "layout zero1" in out and "data=2 x fsdp=1 x expert=64 x tensor=1 x pipe=16" in out
    for line in V3_TOTALS:
        assert f"  {line}\n" in out, (line, out)
    assert "largest per-device tensors:" in out


def test_plan_help_exits_zero():
    r = subprocess.run([sys.executable, "-m", "sharding.plan", "--help"], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                       cwd=pathlib.Path(__file__).parent.parent)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "python -m sharding.plan" in r.stdout and "--devices" in r.stdout, r.stdout[-2000:]
