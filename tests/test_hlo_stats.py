"""Collective summary of compiled HLO: kinds, loop trip counts, bytes, device groups."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sharding import tpu
from sharding.hlo_stats import (
    CollectiveOp,
    collective_ops,
    parse_replica_groups,
    summarize,
    traffic_per_device,
)


def _mesh():
    return jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))


def test_collectives_inside_scan_count_once_per_iteration():
    mesh = _mesh()

    def per_device(x):  # x: [4, 16] on each device
        def body(c, _):
            return jax.lax.pcast(jax.lax.psum(c, "x") * 0.5, "x", to="varying"), None
        y, _ = jax.lax.scan(body, x, None, length=5)
        z = jax.lax.all_to_all(y, "x", 1, 1, tiled=True)  # [4,16] -> [4,16] per device
        return jax.lax.all_gather(z, "x", tiled=True)  # [32, 16] per device

    f = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P("x"), out_specs=P(),
                                check_vma=False))
    x = jnp.ones((32, 16), jnp.float32)
    hlo = f.lower(x).compile().as_text()
    got = summarize(hlo)
    ops = {op.kind: op for op in collective_ops(hlo)}
    assert ops["all-reduce"].count == 5 and ops["all-to-all"].count == 1  # one op each
    assert ops["all-to-all"].bytes == 4 * 16 * 4 and "all_to_all" in ops["all-to-all"].op_name
    for op in ops.values():  # every collective spans the whole 8-device axis
        assert op.groups is None or sorted(map(sorted, op.groups)) == [list(range(8))], op
    assert got["all-reduce"].count == 5
    assert got["all-reduce"].bytes == 5 * 4 * 16 * 4
    assert got["all-to-all"].count == 1 and got["all-to-all"].bytes == 4 * 16 * 4
    assert got["all-gather"].count == 1 and got["all-gather"].bytes == 32 * 16 * 4
    # link bytes over the 8-device group: all-reduce 2·7/8 of its result, the others 7/8
    assert traffic_per_device(collective_ops(hlo), 8) == {
        "all-reduce": 5 * 2 * 7 / 8 * 256, "all-to-all": 7 / 8 * 256, "all-gather": 7 / 8 * 2048,
        "reduce-scatter": 0, "collective-permute": 0, "ragged-all-to-all": 0}
    np.testing.assert_allclose(np.asarray(f(x))[:4], 8 ** 5 * 0.5 ** 5)


def test_no_collectives_on_one_device():
    f = jax.jit(lambda x: (x @ x.T).sum())
    assert summarize(f.lower(jnp.ones((8, 8))).compile().as_text()) == {}


@pytest.mark.parametrize("text, groups", [
    ("replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}", ((0, 1, 2, 3), (4, 5, 6, 7))),
    ("replica_groups={{0,2},{1,3}}, metadata={}", ((0, 2), (1, 3))),
    ("replica_groups=[2,4]<=[8], dimensions={0}", ((0, 1, 2, 3), (4, 5, 6, 7))),
    # iota(8) as [4, 2] transposed: [[0,1],[2,3],[4,5],[6,7]]^T = [[0,2,4,6],[1,3,5,7]]
    ("replica_groups=[2,4]<=[4,2]T(1,0), x", ((0, 2, 4, 6), (1, 3, 5, 7))),
    # iota(8) as [2,2,2] with axes 0 and 1 swapped: 0,1,4,5,2,3,6,7
    ("replica_groups=[4,2]<=[2,2,2]T(1,0,2), x", ((0, 1), (4, 5), (2, 3), (6, 7))),
    # a 2 x 4 device mesh holding ids 0,1,4,5 / 2,3,6,7; groups along axis_0: its columns
    ("replica_groups=mesh['axis_0'=2,'axis_1'=4], device_ids=([2,2,2]T(1,0,2)) {'axis_0'}, "
     "dimensions={0}", ((0, 2), (1, 3), (4, 6), (5, 7))),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, x", ((0, 1, 2, 3), (4, 5, 6, 7))),
    ("replica_groups={}, dimensions={0}", None),
    ("channel_id=1, dimensions={0}", None),
])
def test_replica_groups_in_every_spelling(text, groups):
    assert parse_replica_groups(text) == groups


def test_unknown_replica_groups_are_an_error():
    with pytest.raises(ValueError, match="unknown replica_groups form"):
        parse_replica_groups("replica_groups=<<future>>, x")


def test_link_traffic_and_roofline_bounds_of_hand_made_collectives():
    """Link bytes per device on 8 devices, worked by hand (R result bytes, n group size), then
    the two step-time bounds at 1 GB/s of ICI."""
    quads, pairs = ((0, 1, 2, 3), (4, 5, 6, 7)), ((0, 1), (2, 3), (4, 5), (6, 7))
    ops = [CollectiveOp("all-reduce", "ar", 3, 1024, quads, ""),  # 3 x 2·(3/4)·1024 = 4608
           CollectiveOp("all-reduce", "solo", 10, 999, tuple((d,) for d in range(8)), ""),  # 0
           CollectiveOp("reduce-scatter", "rs", 2, 256, quads, ""),  # 2 x 3·256 = 1536
           CollectiveOp("all-gather", "ag", 1, 800, None, ""),  # all 8: (7/8)·800 = 700
           CollectiveOp("all-to-all", "a2a", 4, 100, pairs, ""),  # 4 x (1/2)·100 = 200
           CollectiveOp("collective-permute", "cp", 5, 64, None, "")]  # 5 x 64 = 320
    traffic = traffic_per_device(ops, devices=8)
    assert traffic == {"all-reduce": 4608, "reduce-scatter": 1536, "all-gather": 700,
                       "all-to-all": 200, "collective-permute": 320, "ragged-all-to-all": 0}

    # communication: 7364 bytes / 1e9 B/s = 7.364 µs, more than compute (2 µs) or HBM (1 µs)
    b = tpu.step_time_bounds(2e-6, 1e-6, traffic, ici_bandwidth=1e9)
    assert b["communication_seconds"]["all-reduce"] == pytest.approx(4.608e-6)
    assert b["communication_seconds"]["collective-permute"] == pytest.approx(0.32e-6)
    assert b["communication_seconds"]["total"] == pytest.approx(7.364e-6)
    assert b["roofline_overlapped_step_seconds"] == pytest.approx(7.364e-6)
    assert b["roofline_exposed_step_seconds"] == pytest.approx(2e-6 + 7.364e-6)
    assert b["roofline_bound"] == "communication"
    # 10 µs of compute hides it when overlapped; exposed adds it
    b = tpu.step_time_bounds(10e-6, 1e-6, traffic, ici_bandwidth=1e9)
    assert b["roofline_overlapped_step_seconds"] == 10e-6 and b["roofline_bound"] == "compute"
    assert b["roofline_exposed_step_seconds"] == pytest.approx(17.364e-6)
    # no collectives: both bounds are max(compute, HBM)
    b = tpu.step_time_bounds(1e-6, 3e-6, {}, ici_bandwidth=1e9)
    assert b["roofline_overlapped_step_seconds"] == b["roofline_exposed_step_seconds"] == 3e-6
    assert b["roofline_bound"] == "memory" and b["communication_seconds"]["total"] == 0

