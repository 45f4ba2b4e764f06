"""Sharded == single device: the tiny model's logits, expert counts and gradients on five meshes
of the 8 emulated CPU devices equal the unsharded result (fp32, highest matmul precision).

Relative error of an array = max|sharded − single| / max|single|; the test bounds the largest
over logits and every gradient leaf by 1e-5. Run with -s to print the errors per mesh.

The same compile of each mesh's step is also checked for what XLA says and does: no
"Involuntary full rematerialization" on stderr (SPMD replicating a tensor it cannot reshard,
printed by C++, caught at the file descriptor by capfd), and on expert-parallel meshes every
all-to-all of the program over exactly the expert groups, 4 per MoE layer forward and 3 backward.
"""

import collections

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import DeepSeekV3, ModelConfig
from sharding import hlo_stats, placement, plan, rules
from sharding import mesh as mesh_lib

MESHES = {
    "data8": dict(data=8),
    "data2_expert4": dict(data=2, expert=4),
    "data2_expert2_tensor2": dict(data=2, expert=2, tensor=2),
    "fsdp4_tensor2": dict(fsdp=4, tensor=2),
    "data2_fsdp2_expert2": dict(data=2, fsdp=2, expert=2),
}
# Most of a device's share of the parameter bytes (fsdp layout). Routed experts are ~2/3 of the
# tiny model's bytes: split 4 ways they leave a device about 1/3 + 2/3/4 = 1/2; with fsdp x
# tensor every weight matrix is split 4 to 8 ways.
MAX_FRACTION = {"data8": 1.0, "data2_expert4": 0.5, "data2_expert2_tensor2": 0.37,
                "fsdp4_tensor2": 0.16, "data2_fsdp2_expert2": 0.37}
CONFIG = ModelConfig.preset("tiny")
MODEL = DeepSeekV3(CONFIG)
MOE_LAYERS = CONFIG.num_moe_layers + CONFIG.num_nextn_predict_layers  # 3 scanned + 1 MTP
REMAT_WARNING = "Involuntary full rematerialization"


def loss_fn(params, variables, tokens):
    """LM cross-entropy + MTP cross-entropy + balance loss: every output feeds the gradient."""
    out = MODEL.apply({**variables, "params": params}, tokens[:, :-1])
    ce = lambda logits, targets: -jnp.take_along_axis(
        jax.nn.log_softmax(logits), targets[..., None], -1).mean()
    loss = ce(out.logits, tokens[:, 1:]) + 0.01 * out.balance_loss
    loss = loss + 0.3 * ce(out.mtp_logits[0][:, :-1], tokens[:, 2:])
    return loss, (out.logits, out.expert_counts)


STEP = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))


@pytest.fixture(scope="module")
def reference():
    tokens = jax.random.randint(jax.random.key(1), (8, 17), 0, CONFIG.vocab_size)
    variables = nn.unbox(MODEL.init(jax.random.key(0), tokens[:, :-1]))
    return tokens, variables, STEP(variables["params"], variables, tokens)


def relative_error(ref, got) -> float:
    return float(np.abs(np.asarray(got) - np.asarray(ref)).max() / np.abs(np.asarray(ref)).max())


def sharded_step(mesh, variables, tokens, layout="fsdp"):
    """Reshards the reference variables into the layout and compiles the step under the mesh."""
    layout = rules.get_layout(layout)
    with placement.use_mesh(mesh, layout):
        abstract = jax.eval_shape(placement.model_init_fn(CONFIG, 8), jax.random.key(0))
        variables = jax.device_put(variables, placement.tree_shardings(abstract, mesh, layout))
        compiled = STEP.lower(variables["params"], variables, tokens).compile()
        return compiled, variables, compiled(variables["params"], variables, tokens)


@pytest.mark.parametrize("name", list(MESHES))
def test_sharded_equals_single_device(name, reference, capfd):
    tokens, variables, ((loss, (logits, counts)), grads) = reference
    mesh = mesh_lib.make_mesh(MESHES[name])
    capfd.readouterr()
    compiled, sharded, ((loss_s, (logits_s, counts_s)), grads_s) = sharded_step(
        mesh, variables, tokens)
    xla_said = capfd.readouterr().err
    assert REMAT_WARNING not in xla_said, (name, xla_said[-3000:])
    if mesh.shape["expert"] > 1:
        check_all_to_alls(compiled.as_text(), mesh)

    np.testing.assert_array_equal(counts_s, counts)
    errors = {"logits": relative_error(logits, logits_s), "loss": relative_error(loss, loss_s)}
    grad_errors = jax.tree_util.tree_map_with_path(
        lambda p, a, b: (placement.path_name(p), relative_error(a, b)), grads, grads_s)
    worst_grad = max(jax.tree.leaves(grad_errors, is_leaf=lambda x: isinstance(x, tuple)),
                     key=lambda x: x[1])
    print(f"\n{name}: logits {errors['logits']:.2e}  loss {errors['loss']:.2e}  "
          f"grads {worst_grad[1]:.2e} ({worst_grad[0]})")
    assert errors["logits"] <= 1e-5 and errors["loss"] <= 1e-5, errors
    assert worst_grad[1] <= 1e-5, worst_grad

    # Each device holds exactly the bytes the plan predicts from abstract shapes alone.
    specs = placement.tree_specs(
        jax.eval_shape(placement.model_init_fn(CONFIG, 8), jax.random.key(0)), dict(mesh.shape),
        "fsdp")
    expected = plan.per_device_bytes(sharded, specs, dict(mesh.shape))
    total = sum(leaf.nbytes for leaf in jax.tree.leaves(sharded))
    assert expected <= MAX_FRACTION[name] * total, (expected / total, name)
    for device in mesh.devices.flat:
        held = sum(s.data.nbytes for leaf in jax.tree.leaves(sharded)
                   for s in leaf.addressable_shards if s.device == device)
        assert held == expected, (device, held, expected)


def expert_groups(mesh) -> set[tuple[int, ...]]:
    """Device-id groups that vary only along the mesh's expert axis."""
    axis = mesh.axis_names.index("expert")
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    rows = np.moveaxis(ids, axis, -1).reshape(-1, mesh.shape["expert"])
    return {tuple(sorted(r)) for r in rows.tolist()}


def check_all_to_alls(hlo: str, mesh) -> None:
    """Every all-to-all of the compiled step is expert dispatch/combine inside the expert
    groups: per MoE layer (the stack's layers, each in the HLO when it is unrolled and once as
    the scan's body when it is not, and the MTP block) 4 forward (tokens, ids, weights out;
    outputs back) and 3 backward (the ids carry no gradient), executed 7 times per MoE layer
    per step."""
    ops = [op for op in hlo_stats.collective_ops(hlo) if op.kind == "all-to-all"]
    want = expert_groups(mesh)
    for op in ops:
        assert op.groups is not None and {tuple(sorted(g)) for g in op.groups} == want, (
            op.name, op.op_name, op.groups, want)
        assert "shard_map/all_to_all" in op.op_name, (op.name, op.op_name)  # nothing else
    per_pass = collections.Counter(
        ("backward" if "transpose(" in op.op_name else "forward",
         "mtp" if "/mtp_0/" in op.op_name else "stack") for op in ops)
    bodies = CONFIG.num_moe_layers if CONFIG.unrolled(CONFIG.num_moe_layers) else 1
    assert per_pass == {("forward", "stack"): 4 * bodies, ("forward", "mtp"): 4,
                        ("backward", "stack"): 3 * bodies, ("backward", "mtp"): 3}, per_pass
    assert sum(op.count for op in ops) == 7 * MOE_LAYERS, [(op.name, op.count) for op in ops]


def test_no_large_parameter_left_replicated():
    """With fsdp × tensor every parameter above 4 KiB is split; a layout with a hole is named."""
    abstract = jax.eval_shape(placement.model_init_fn(CONFIG, 8), jax.random.key(0))
    shape = mesh_lib.mesh_shape(MESHES["fsdp4_tensor2"], 8)
    assert plan.replicated_above(nn.unbox(abstract), placement.tree_specs(abstract, shape, "fsdp"),
                                 4096) == []
    holey = rules.Layout("holey", opt_state=(), params=tuple(  # no embed rule
        r for r in rules.LAYOUTS["fsdp"].params if r[0] != "embed"))
    found = plan.replicated_above(nn.unbox(abstract), placement.tree_specs(abstract, shape, holey),
                                  4096)
    assert "params/embed_tokens" not in dict(found)  # vocab still goes over tensor
    assert "params/moe_layers/mlp/gate/kernel" in dict(found)
    with pytest.raises(ValueError, match="moe_layers/mlp/gate/kernel"):
        plan.check_sharded(nn.unbox(abstract), placement.tree_specs(abstract, shape, holey), 4096)
