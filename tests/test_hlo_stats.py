"""Collective summary of compiled HLO: kinds, loop trip counts, bytes."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from sharding.hlo_stats import summarize


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
    assert got["all-reduce"].count == 5
    assert got["all-reduce"].bytes == 5 * 4 * 16 * 4
    assert got["all-to-all"].count == 1 and got["all-to-all"].bytes == 4 * 16 * 4
    assert got["all-gather"].count == 1 and got["all-gather"].bytes == 32 * 16 * 4
    np.testing.assert_allclose(np.asarray(f(x))[:4], 8 ** 5 * 0.5 ** 5)


def test_no_collectives_on_one_device():
    f = jax.jit(lambda x: (x @ x.T).sum())
    assert summarize(f.lower(jnp.ones((8, 8))).compile().as_text()) == {}
