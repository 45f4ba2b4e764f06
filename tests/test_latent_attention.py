"""The absorbed MLA decode attention kernel (`dsv3_jax.latent_attention`, an XLA FFI call)
against its pure-JAX formula and against a NumPy loop over the cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import cpu_kernels, latent_attention


def _numpy(c_kv, k_pe, q_latent, q_pe, positions, scale):
    """One query at a time, in float64: softmax over the slots up to its position."""
    B, N, T, C = q_latent.shape
    out = np.zeros((B, N, T, C))
    for b in range(B):
        for n in range(N):
            for t in range(T):
                if positions[b, t] < 0:  # no visible slot: uniform weights over all of them
                    out[b, n, t] = c_kv[b].mean(0)
                    continue
                visible = positions[b, t] + 1
                s = (c_kv[b, :visible] @ q_latent[b, n, t] + k_pe[b, :visible] @ q_pe[b, n, t])
                w = np.exp((s - s.max()) * scale)
                out[b, n, t] = w @ c_kv[b, :visible] / w.sum()
    return out


@pytest.mark.usefixtures("each_blas")
@pytest.mark.parametrize("B, S, C, R, N, T", [(1, 17, 8, 4, 3, 1), (3, 40, 16, 8, 4, 2),
                                              (2, 129, 32, 16, 2, 5), (1, 301, 12, 6, 5, 3),
                                              (1, 700, 12, 6, 5, 3), (2, 600, 16, 8, 2, 2)])
def test_kernel_matches_a_loop_and_its_gradient_the_formulas(B, S, C, R, N, T):
    """Random cache and queries, each query at its own position (some early in the cache:
    the slots after it must not count), head dims and slot counts that are not whole vector
    lanes or score tiles, long caches at one or two sequences (their slots split over the
    threads, the pieces' partial softmaxes combined): the kernel equals the NumPy loop to
    fp32 noise (≤ 1e-5 of the largest value) and the pure-JAX `reference`, and so does a
    one-sequence cache passed without its batch axis; its gradient (the formula's, through
    `jax.custom_jvp`) equals the reference's."""
    assert cpu_kernels.runs_here(jnp.float32)
    rng = np.random.default_rng(B * S)
    c_kv, k_pe = rng.standard_normal((B, S, C)), rng.standard_normal((B, S, R))
    q_latent, q_pe = rng.standard_normal((B, N, T, C)), rng.standard_normal((B, N, T, R))
    positions = rng.integers(0, S, (B, T))
    positions[0, 0] = 0  # one query sees only slot 0
    if T > 1:
        positions[-1, -1] = -1  # and one sees none: the mean of all slots, as the JAX path
    args = [jnp.asarray(a, jnp.float32) for a in (c_kv, k_pe, q_latent, q_pe)]
    args.append(jnp.asarray(positions, jnp.int32))
    got = np.asarray(jax.jit(latent_attention.attend, static_argnums=5)(*args, 0.2))
    want = _numpy(c_kv, k_pe, q_latent, q_pe, positions, 0.2)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(got, np.asarray(latent_attention.reference(*args, 0.2)),
                               rtol=0, atol=1e-5 * np.abs(want).max())
    if B == 1:
        stored = jax.jit(latent_attention.attend, static_argnums=5)(args[0][0], args[1][0],
                                                                     *args[2:], 0.2)
        np.testing.assert_allclose(np.asarray(stored), want, rtol=0,
                                   atol=1e-5 * np.abs(want).max())
    probe = jnp.asarray(rng.standard_normal(got.shape), jnp.float32)

    def grads(fn):
        loss = lambda *a: (fn(*a, args[4], 0.2) * probe).sum()
        return jax.grad(loss, (0, 1, 2, 3))(*args[:4])

    for a, b in zip(grads(latent_attention.attend), grads(latent_attention.reference),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)


def test_bad_shapes_are_refused_by_name():
    c, k = jnp.zeros((2, 9, 8)), jnp.zeros((2, 9, 4))
    q, p, pos = jnp.zeros((2, 3, 1, 8)), jnp.zeros((2, 3, 1, 4)), jnp.zeros((2, 1), jnp.int32)
    with pytest.raises(ValueError, match=r"c_kv \(2, 9, 8\), k_pe \(2, 9, 4\), q_latent "
                                         r"\(2, 3, 1, 7\).*expected \[B, S, C\]"):
        latent_attention.attend(c, k, jnp.zeros((2, 3, 1, 7)), p, pos, 1.0)
    with pytest.raises(ValueError, match=r"positions \(2, 2\)"):
        latent_attention.attend(c, k, q, p, jnp.zeros((2, 2), jnp.int32), 1.0)
    with pytest.raises(ValueError, match=r"c_kv \(9, 8\).*one-sequence cache \[S, C\]"):
        latent_attention.attend(c[0], k[0], q, p, pos, 1.0)  # two sequences' queries
    with pytest.raises(ValueError, match=r"c_kv \(2, 0, 8\).*must be positive"):
        latent_attention.attend(jnp.zeros((2, 0, 8)), jnp.zeros((2, 0, 4)), q, p, pos, 1.0)
    empty = latent_attention.attend(c, k, jnp.zeros((2, 3, 0, 8)), jnp.zeros((2, 3, 0, 4)),
                                    jnp.zeros((2, 0), jnp.int32), 1.0)
    assert empty.shape == (2, 3, 0, 8)  # no queries: an empty result, no kernel call
