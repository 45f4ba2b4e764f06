"""Meshes from mesh configs, logical → mesh rules, and the errors for meshes that do not fit."""

import jax
import ml_collections
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from dsv3_jax import ModelConfig
from sharding import mesh as mesh_lib
from sharding import placement, rules


def test_mesh_shape_fills_minus_one():
    assert mesh_lib.mesh_shape(dict(data=-1, tensor=2), 8) == dict(
        data=4, fsdp=1, expert=1, tensor=2, pipe=1)
    config = ml_collections.ConfigDict(dict(data=1, fsdp=2, expert=-1, tensor=1, pipe=1))
    assert mesh_lib.mesh_shape(config, 8)["expert"] == 4


@pytest.mark.parametrize("sizes,devices,message", [
    (dict(data=3), 8, "has 3 devices but 8 are available"),
    (dict(data=2, expert=2), 8, "has 4 devices but 8 are available"),
    (dict(data=-1, expert=-1), 8, "at most one axis may be -1"),
    (dict(data=-1, expert=3), 8, "multiply to 3, which does not divide the 8 devices"),
    (dict(data=0, expert=8), 8, "mesh.data=0 is invalid"),
    (dict(data=2.0, expert=4), 8, "mesh.data=2.0 is invalid"),
    (dict(data=2, experts=4), 8, "unknown mesh axes \\['experts'\\]"),
])
def test_bad_mesh_sizes_are_clear_errors(sizes, devices, message):
    with pytest.raises(ValueError, match=message):
        mesh_lib.mesh_shape(sizes, devices)


def test_make_mesh_is_auto_and_ordered():
    mesh = mesh_lib.make_mesh(dict(data=2, expert=2, tensor=2))
    assert mesh.axis_names == mesh_lib.DEVICE_ORDER
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    assert dict(mesh.shape) == dict(pipe=1, data=2, fsdp=1, expert=2, tensor=2)
    # tensor is the fastest-varying axis: its pairs are neighbouring devices.
    assert [d.id for d in mesh.devices[0, 0, 0, 0, :]] == [0, 1]
    assert mesh_lib.batch_shards(mesh) == 4
    with pytest.raises(ValueError, match="pipeline parallelism is not implemented"):
        mesh_lib.make_mesh(dict(data=4, pipe=2))


def test_initialize_distributed_argument_checks():
    assert mesh_lib.initialize_distributed(None, None, None) is False
    with pytest.raises(ValueError, match="needs all of"):
        mesh_lib.initialize_distributed("127.0.0.1:1234", 2, None)
    with pytest.raises(ValueError, match="must be in \\[0, --num_processes=2\\)"):
        mesh_lib.initialize_distributed("127.0.0.1:1234", 2, 2)
    with pytest.raises(ValueError, match="host:port"):
        mesh_lib.initialize_distributed("127.0.0.1", 2, 0)


def test_spec_for_priorities_and_size_one_axes():
    shape = dict(data=2, fsdp=1, expert=4, tensor=2, pipe=1)
    zero1 = rules.LAYOUTS["zero1"]
    # Experts claim `expert` first; ZeRO-1 then splits embed over what is left (data; fsdp=1).
    assert rules.spec_for(("layers", "expert", "embed", "mlp"), (3, 16, 64, 32),
                          zero1.opt_state, shape) == P(None, "expert", "data", "tensor")
    # A non-expert weight takes all data-like axes of size > 1 along embed.
    assert rules.spec_for(("embed", "kv_lora"), (64, 32), zero1.opt_state, shape) == P(
        ("data", "expert"), None)
    assert rules.spec_for(("embed", "kv_lora"), (64, 32), zero1.params, shape) == P(None, None)


def test_spec_for_names_the_array_that_does_not_divide():
    shape = dict(data=1, fsdp=1, expert=1, tensor=8, pipe=1)
    with pytest.raises(ValueError, match="moe/o_proj: dimension 1 \\('heads', size 4, set by "
                                         "ModelConfig.num_attention_heads\\)"):
        rules.spec_for(("layers", "heads", "v_head", "embed"), (3, 4, 16, 64),
                       rules.LAYOUTS["fsdp"].params, shape, name="moe/o_proj")


@pytest.mark.parametrize("overrides,mesh,message", [
    (dict(), dict(tensor=8), "num_attention_heads=4 is not divisible by mesh.tensor=8"),
    (dict(n_routed_experts=12, n_group=3, topk_group=2), dict(expert=8),
     "n_routed_experts=12 is not divisible by mesh.expert=8"),
    (dict(vocab_size=390), dict(tensor=4, data=2),
     "vocab_size=390 is not divisible by mesh.tensor"),
    (dict(hidden_size=36), dict(fsdp=8), "'embed', size 36, set by ModelConfig.hidden_size"),
])
def test_model_that_does_not_fit_fails_before_compiling(overrides, mesh, message, monkeypatch):
    config = ModelConfig.preset("tiny", **overrides)
    device_mesh = mesh_lib.make_mesh(mesh)

    def no_compile(*args, **kwargs):
        raise AssertionError("jit reached: the error must come first")

    monkeypatch.setattr(jax, "jit", no_compile)
    with pytest.raises(ValueError, match=message):
        placement.init_model_variables(config, jax.random.key(0), device_mesh)


def test_unknown_layout():
    with pytest.raises(ValueError, match="unknown sharding layout 'zero3'"):
        rules.get_layout("zero3")
