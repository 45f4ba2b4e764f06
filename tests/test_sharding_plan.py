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
import pytest

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


def test_v3_layout_per_device_bytes():
    """EP64 x PP16 x DP2 (ZeRO-1): parameters replicate over data, AdamW state splits 2048 ways.

    Hand check of the optimizer figure: every parameter's two fp32 moments are split over all
    128 data-like devices of a stage (experts over expert x data, the rest along embed / q_lora
    / kv_lora over data x expert) and the 16 stages: 8 B x 682.6B / 2048 = 2.67e9 B.
    """
    report = plan.make_plan(ModelConfig.preset("deepseek-v3-671b"), V3_MESH, 2048, "zero1")
    per = report["per_device_bytes"]
    total = report["total_params"]
    assert abs(total - 682.6e9) < 0.5e9  # 670.9B + the MTP module's own 11.7B
    assert per["opt_state"] == pytest.approx(8 * total / 2048, rel=1e-3)
    assert per["grads"] == per["params"]
    # Experts are 1/64 each; the ~24B non-expert weights stay whole on every EP rank.
    assert 6.0 * 2**30 < per["params"] < 7.0 * 2**30
    assert report["replicated_above_threshold"]  # by design: ZeRO-1 replicates parameters
    assert all(not r["path"].startswith("opt_state") for r in report["replicated_above_threshold"])


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


def test_plan_command_line():
    out = subprocess.run(
        [sys.executable, "-m", "sharding.plan", "--preset=deepseek-v3-671b",
         "--mesh=expert=64,pipe=16,data=-1", "--devices=2048", "--layout=zero1"],
        capture_output=True, text=True, check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"},
        cwd=pathlib.Path(__file__).parent.parent).stdout
    assert "2048 devices" in out and "opt_state" in out and "largest per-device" in out
