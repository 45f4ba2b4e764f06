"""The CPU grouped-GEMM kernel (`dsv3_jax.grouped_gemm`, an XLA FFI call into a BLAS) against
a NumPy loop over the groups, and its gradients against `jax.lax.ragged_dot`'s."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import cpu_kernels, grouped_gemm


def _reference(x, w, sizes):
    """NumPy: row i of group g times w[g]; rows past the groups zero."""
    out = np.zeros((x.shape[0], w.shape[-1]), np.float64)
    start = 0
    for g, n in enumerate(sizes):
        out[start:start + n] = x[start:start + n].astype(np.float64) @ w[g]
        start += n
    return out


@pytest.mark.usefixtures("each_blas")
@pytest.mark.parametrize("sizes", [
    [50, 0, 60, 1, 80, 30, 40],  # empty and one-row groups, 39 rows past the groups
    [300, 0, 0, 0, 0, 0, 0],  # one group holds every row
    [0, 0, 0, 0, 0, 0, 0],  # no rows at all: zeros out, zero kernel gradients
    [129, 129, 42, 0, 0, 0, 0],  # groups split into several row pieces
])
def test_ragged_matmul_matches_a_loop_and_ragged_dot_gradients(sizes):
    """Forward against the NumPy loop to fp32 noise (≤ 1e-5 of the largest value); the
    gradients of x and w against jax.lax.ragged_dot's (XLA's own lowering, the same products):
    ≤ 1e-5 relative. Empty groups get exactly zero kernel gradients, rows past the groups
    exactly zero outputs and input gradients."""
    assert cpu_kernels.available()
    rng = np.random.default_rng(sum(sizes))
    M, K, N, G = 300, 48, 40, 7
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((G, K, N)).astype(np.float32)
    dy = rng.standard_normal((M, N)).astype(np.float32)
    group_sizes = jnp.asarray(sizes, jnp.int32)
    filled = sum(sizes)

    y = np.asarray(jax.jit(grouped_gemm.ragged_matmul)(x, w, group_sizes))
    ref = _reference(x, w, sizes)
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5 * max(1.0, np.abs(ref).max()))
    assert not y[filled:].any()

    def grads(fn):
        return jax.jit(jax.grad(lambda x, w: (fn(x, w, group_sizes) * dy).sum(), (0, 1)))(x, w)

    dx, dw = (np.asarray(a) for a in grads(grouped_gemm.ragged_matmul))
    dx_ref, dw_ref = (np.asarray(a) for a in grads(jax.lax.ragged_dot))
    for a, b in ((dx, dx_ref), (dw, dw_ref)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * max(1.0, np.abs(b).max()))
    assert not dx[filled:].any()
    assert not dw[np.asarray(sizes) == 0].any()


@pytest.mark.usefixtures("each_blas")
def test_stack_layer_is_read_in_place_and_the_gradient_reaches_the_slice():
    """With stack=[L, G, K, N] and a traced layer, the kernels are that layer of the stack (the
    other layers differ): output equal to the slice's; the kernel gradient goes to `w` (the
    slice) and equals the unstacked one; nothing flows into the stack."""
    rng = np.random.default_rng(1)
    M, K, N, G, L = 64, 16, 24, 4, 3
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.float32)
    stack = jnp.asarray(rng.standard_normal((L, G, K, N)), jnp.float32)
    sizes = jnp.asarray([10, 30, 0, 20], jnp.int32)
    dy = jnp.asarray(rng.standard_normal((M, N)), jnp.float32)

    def loss(x, w, stack, layer):
        return (grouped_gemm.ragged_matmul(x, w, sizes, stack=stack, layer=layer) * dy).sum()

    for layer in range(L):
        got = jax.jit(jax.grad(loss, (0, 1, 2)))(x, stack[layer], stack, jnp.int32(layer))
        want = jax.grad(lambda x, w: (grouped_gemm.ragged_matmul(x, w, sizes) * dy).sum(),
                        (0, 1))(x, stack[layer])
        for a, b in zip(got[:2], want):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)
        assert not np.asarray(got[2]).any()


def _swiglu_formula(x, gate, up, sizes, scale):
    """jax.lax.ragged_dot's SwiGLU (XLA's own lowering), each row's hidden units times its
    scale: what `swiglu_hidden` fuses."""
    g = jax.lax.ragged_dot(x, gate, sizes, precision=jax.lax.Precision.HIGHEST)
    u = jax.lax.ragged_dot(x, up, sizes, precision=jax.lax.Precision.HIGHEST)
    return jax.nn.silu(g) * u * scale[:, None]


@pytest.mark.usefixtures("each_blas")
@pytest.mark.parametrize("sizes", [
    [50, 0, 60, 1, 80, 30, 40],  # empty and one-row groups, 39 rows past the groups
    [129, 129, 42, 0, 0, 0, 0],  # groups split into several row pieces
])
def test_swiglu_hidden_matches_a_loop_and_the_formulas_gradients(sizes):
    """`swiglu_hidden` (gate and up GEMMs and the activation in one call; F = 36, not whole
    lanes) against a float64 NumPy loop over the groups to ≤ 1e-5 of the largest value, with
    pre-activations up to |g| ~ 20 (the sigmoid near 0 and 1); its gradients in x, gate, up
    and scale against the ragged_dot formula's to ≤ 1e-5 of each one's largest; rows past the
    groups give zeros and zero gradients, empty groups zero kernel gradients. Read as layer
    1 of [3, …] stacks, the same numbers, the kernel gradients reaching the slices."""
    rng = np.random.default_rng(len(sizes) + sum(sizes))
    M, D, F, G, L = 300, 24, 36, 7, 3
    x = jnp.asarray(rng.standard_normal((M, D)), jnp.float32)
    stacks = [jnp.asarray(rng.standard_normal((L, G, D, F)), jnp.float32) for _ in range(2)]
    gate, up = stacks[0][1], stacks[1][1]
    scale = jnp.asarray(rng.random(M), jnp.float32)
    group_sizes, filled = jnp.asarray(sizes, jnp.int32), sum(sizes)
    probe = jnp.asarray(rng.standard_normal((M, F)), jnp.float32)

    g, u = (_reference(np.asarray(x), np.asarray(w), sizes) for w in (gate, up))
    want = g / (1 + np.exp(-g)) * u * np.asarray(scale, np.float64)[:, None]
    for kwargs in ({}, {"stacks": tuple(stacks), "layer": jnp.int32(1)}):
        def loss(fn, x, gate, up, scale):
            return (fn(x, gate, up, group_sizes, scale) * probe).sum()

        fused = lambda *a: grouped_gemm.swiglu_hidden(*a, **kwargs)
        got = np.asarray(jax.jit(fused)(x, gate, up, group_sizes, scale))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
        assert not got[filled:].any()
        grads = jax.jit(jax.grad(lambda *a: loss(fused, *a), (0, 1, 2, 3)))(x, gate, up, scale)
        refs = jax.jit(jax.grad(lambda *a: loss(_swiglu_formula, *a), (0, 1, 2, 3)))(
            x, gate, up, scale)
        for name, a, b in zip(["x", "gate", "up", "scale"], grads, refs, strict=True):
            a, b = np.asarray(a), np.asarray(b)
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max(), err_msg=name)
        assert not np.asarray(grads[0])[filled:].any() and not np.asarray(grads[3])[filled:].any()
        for kernel_grad in grads[1:3]:
            assert not np.asarray(kernel_grad)[np.asarray(sizes) == 0].any()


def test_bad_operands_are_refused_by_name():
    """Shapes that do not line up, and dtypes other than float32, are a ValueError naming
    them, never the kernel reading past a buffer."""
    x, w, sizes = jnp.zeros((4, 2)), jnp.zeros((3, 2, 5)), jnp.asarray([1, 2, 1], jnp.int32)
    with pytest.raises(ValueError, match=r"x \(4, 3\), w \(3, 2, 5\).*expected x \[M, K\]"):
        grouped_gemm.ragged_matmul(jnp.zeros((4, 3)), w, sizes)
    with pytest.raises(ValueError, match=r"sizes \(2,\)"):
        grouped_gemm.ragged_matmul(x, w, sizes[:2])
    with pytest.raises(ValueError, match=r"stack \(2, 3, 2, 4\)"):
        grouped_gemm.ragged_matmul(x, w, sizes, stack=jnp.zeros((2, 3, 2, 4)))
    with pytest.raises(ValueError, match="bfloat16.*float32 only"):
        grouped_gemm.ragged_matmul(x.astype(jnp.bfloat16), w, sizes)
    with pytest.raises(ValueError, match=r"swiglu_hidden: x \(4, 2\), gate \(3, 2, 5\), up "
                                         r"\(3, 2, 4\).*expected"):
        grouped_gemm.swiglu_hidden(x, w, jnp.zeros((3, 2, 4)), sizes)
    with pytest.raises(ValueError, match=r"\(D, F ≥ 1\)"):  # an empty hidden width
        grouped_gemm.swiglu_hidden(x, jnp.zeros((3, 2, 0)), jnp.zeros((3, 2, 0)), sizes)
    with pytest.raises(ValueError, match=r"scale \(3,\)"):
        grouped_gemm.swiglu_hidden(x, w, w, sizes, jnp.ones(3))
    with pytest.raises(ValueError, match="bfloat16.*float32 only"):
        grouped_gemm.swiglu_hidden(x, w.astype(jnp.bfloat16), w.astype(jnp.bfloat16), sizes)


def test_without_a_compiler_the_kernels_are_unavailable_and_the_jax_paths_run(
        monkeypatch, tmp_path, caplog):
    """No C++ compiler (CXX pointing nowhere, an empty kernel cache): `available()` is False
    with one warning naming the failure, the kernels' entry points refuse by name, moe_impl
    "auto" runs the blocks path on this CPU and the absorbed decode attention its products
    (a batch-2 decode step still equals the full forward: tests/test_generate.py's checks run
    the same code)."""
    from dsv3_jax import ModelConfig
    from dsv3_jax.expert_compute import resolve_moe_impl
    cpu_kernels.available.cache_clear()
    try:
        with monkeypatch.context() as env:
            env.setenv("CXX", str(tmp_path / "no-such-compiler"))
            env.setenv("DSV3_JAX_KERNEL_CACHE", str(tmp_path / "cache"))
            with caplog.at_level("WARNING", logger="dsv3_jax.cpu_kernels"):
                assert not cpu_kernels.available()
            assert "the CPU kernels are unavailable (FileNotFoundError" in caplog.text
            assert resolve_moe_impl(ModelConfig.preset("tiny")) == "blocks"
            assert not cpu_kernels.runs_here(jnp.float32)
            with pytest.raises(RuntimeError, match="CPU kernels are unavailable"):
                grouped_gemm.ragged_matmul(jnp.zeros((4, 2)), jnp.zeros((1, 2, 3)),
                                           jnp.asarray([4], jnp.int32))
    finally:
        cpu_kernels.available.cache_clear()
    assert cpu_kernels.available()  # the real cache again
