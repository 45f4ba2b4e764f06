"""MLA's causal attention for training and prefill as CPU kernel calls
(`dsv3_jax.fused_attention`: forward and backward XLA FFI calls) against a NumPy loop and
against the gradient of its pure-JAX formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import cpu_kernels, fused_attention


def _numpy(q_nope, q_pe, k_nope, k_pe, v, positions, scale):
    """One query at a time, in float64: softmax over the keys s ≤ t at positions ≤ its own."""
    B, N, T, _ = q_nope.shape
    out = np.zeros((B, N, T, v.shape[3]))
    for b in range(B):
        for n in range(N):
            for t in range(T):
                seen = np.flatnonzero(positions[b, :t + 1] <= positions[b, t])
                s = (k_nope[b, n, seen] @ q_nope[b, n, t] + k_pe[b, seen] @ q_pe[b, t, n])
                w = np.exp((s - s.max()) * scale)
                out[b, n, t] = w @ v[b, n, seen] / w.sum()
    return out


@pytest.mark.usefixtures("each_blas")
@pytest.mark.parametrize("B, N, T, H, R, A", [(1, 1, 1, 8, 4, 4), (2, 3, 9, 8, 4, 5),
                                              (1, 2, 130, 16, 8, 12), (2, 1, 200, 32, 16, 32)])
def test_kernel_matches_a_loop_and_its_gradient_the_formulas(B, N, T, H, R, A):
    """Random operands at one query block, several with a ragged last one (64 queries per
    block), odd head dims; positions with gaps, repeats and one sequence with a position
    lower than an earlier one (hidden from the queries after it): the kernel's output equals
    the NumPy loop to fp32 noise (≤ 1e-5 of the largest value), and its gradient in every
    operand equals that of `reference` (jax.grad of the formula) to ≤ 2e-6 of the largest."""
    assert cpu_kernels.runs_here(jnp.float32)
    rng = np.random.default_rng(T)
    shapes = [(B, N, T, H), (B, T, N, R), (B, N, T, H), (B, T, R), (B, N, T, A)]
    arrays = [rng.standard_normal(s) for s in shapes]
    positions = np.cumsum(rng.integers(0, 3, (B, T)), axis=1)
    if T > 4:
        positions[-1, 3] = 0
    args = [jnp.asarray(a, jnp.float32) for a in arrays] + [jnp.asarray(positions, jnp.int32)]
    got = np.asarray(jax.jit(fused_attention.attend, static_argnums=6)(*args, 0.3))
    want = _numpy(*arrays, positions, 0.3)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    probe = jnp.asarray(rng.standard_normal(got.shape), jnp.float32)

    def grads(fn):
        loss = lambda *a: (fn(*a, args[5], 0.3) * probe).sum()
        return jax.jit(jax.grad(loss, (0, 1, 2, 3, 4)))(*args[:5])

    for name, a, b in zip(["q_nope", "q_pe", "k_nope", "k_pe", "v"],
                          grads(fused_attention.attend), grads(fused_attention.reference),
                          strict=True):
        b = np.asarray(b)
        np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=2e-6 * np.abs(b).max(),
                                   err_msg=name)


def test_bad_shapes_are_refused_by_name():
    qn, qp, kp, v = (jnp.zeros(s) for s in [(2, 3, 5, 8), (2, 5, 3, 4), (2, 5, 4), (2, 3, 5, 6)])
    pos = jnp.zeros((2, 5), jnp.int32)
    with pytest.raises(ValueError, match=r"q_nope, q_pe, k_nope, k_pe, v, positions "
                                         r"\(2, 3, 5, 8\), \(2, 3, 5, 4\).*expected "
                                         r"\[B, N, T, H\], \[B, T, N, R\]"):
        fused_attention.attend(qn, jnp.zeros((2, 3, 5, 4)), qn, kp, v, pos, 1.0)
    with pytest.raises(ValueError, match=r"\(2, 4\)\: expected"):
        fused_attention.attend(qn, qp, qn, kp, v, jnp.zeros((2, 4), jnp.int32), 1.0)
    with pytest.raises(ValueError, match=r"with H, R, A ≥ 1"):  # an empty head dim
        fused_attention.attend(qn, qp, qn, kp, jnp.zeros((2, 3, 5, 0)), pos, 1.0)
