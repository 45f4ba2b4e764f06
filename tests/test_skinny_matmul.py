"""The few-rows projection kernel (`dsv3_jax.skinny_matmul`, an XLA FFI call: streamed products of
one or two rows, `kernels/stream_product.h`, else a BLAS) against
NumPy, and where `layers.project` takes it: float32 projections of at most MAX_ROWS rows on
one CPU device, with the derivatives of XLA's dot."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import ModelConfig, fp8, skinny_matmul
from dsv3_jax.layers import Weight, project
from dsv3_jax.rms_norm import rms_norm


@pytest.mark.usefixtures("each_blas")
@pytest.mark.parametrize("M, K, N", [
    (1, 256, 768),  # a decode step's token: W's rows in 12 chunks summed (row_chunks.h)
    (8, 512, 1000),  # 16 chunks (the most), 8 rows (the most that are chunked)
    (2, 301, 130),  # 2 chunks of 150 and 151 rows
    (8, 96, 200),  # N not a multiple of the 16-column block edges
    (32, 64, 48),  # N below one block: one sgemm
    (3, 1, 5),  # K = 1
    (1, 77, 200),  # one row streamed: column blocks of 256, 128, 64 and 8 (AVX-512)
    (2, 33, 7),  # two rows streamed, N inside one vector
    (1, 40, 1),  # N = 1
])
def test_kernel_matches_numpy(M, K, N):
    """≤ 1e-5 of the largest value (float32 accumulation over K)."""
    rng = np.random.default_rng(M * K * N)
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((K, N)).astype(np.float32)
    assert skinny_matmul.pays(jnp.asarray(x), jnp.asarray(w))
    y = np.asarray(jax.jit(skinny_matmul.matmul)(x, w))
    ref = x.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def _lowered(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


@pytest.mark.parametrize("eqn, x_shape, w_shape", [
    ("BTD,DNH->BTNH", (2, 3, 64), (64, 4, 8)),  # rows and columns merged
    ("BNTA,NAD->BTD", (2, 4, 3, 8), (4, 8, 64)),  # heads-first rows: x transposed first
    ("BTQ,QNH->BNTH", (2, 1, 16), (16, 4, 8)),  # heads-first output
])
def test_project_takes_the_kernel_for_a_few_float32_rows_and_keeps_dots_gradients(
        eqn, x_shape, w_shape):
    """`project(eqn)` of 2 × 3 (or 2 × 1) tokens runs the kernel (one call in the lowered
    program) and equals the einsum to float32 noise, and so do its gradients (XLA's dot);
    64 times the batch (past MAX_ROWS) or bfloat16 keep XLA's dot."""
    config = ModelConfig.preset("tiny")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)
    fn = lambda x, w: project(eqn, x, Weight(w), config, out_dtype=jnp.float32)
    assert _lowered(fn, x, w).count("dsv3_skinny_matmul") == 1
    ref = np.einsum(eqn.lower(), np.float64(x), np.float64(w))
    np.testing.assert_allclose(np.asarray(jax.jit(fn)(x, w)), ref, rtol=0,
                               atol=1e-5 * np.abs(ref).max())
    loss = lambda f: jax.grad(lambda x, w: (f(x, w) ** 2).sum(), (0, 1))
    got = jax.jit(loss(fn))(x, w)
    want = jax.jit(loss(lambda x, w: jnp.einsum(eqn, x, w,
                                                preferred_element_type=jnp.float32)))(x, w)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0,
                                   atol=1e-5 * float(jnp.abs(b).max()))

    many = jnp.ones((64 * x_shape[0], *x_shape[1:]), jnp.float32)  # B is a row letter
    assert skinny_matmul.MAX_ROWS < many.shape[0]  # its rows: at least the batch
    assert "dsv3_skinny_matmul" not in _lowered(fn, many, w)
    bf16 = config.replace(dtype="bfloat16")
    assert "dsv3_skinny_matmul" not in _lowered(
        lambda x, w: project(eqn, x, Weight(w), bf16), x, w)


def test_per_head_products_keep_xlas_dot():
    """A letter in all three operands (the absorbed decode's per-head products) is a batch of
    products, not one projection: XLA's dot."""
    per_head = lambda q, k: fp8.project("BTNH,NHC->BTNC", q, k)
    assert "dsv3_skinny_matmul" not in _lowered(per_head, jnp.ones((1, 1, 4, 8)),
                                                jnp.ones((4, 8, 16)))


@pytest.mark.parametrize("M, K, N", [(1, 256, 224), (5, 40, 24), (16, 64, 96)])
def test_a_norm_weight_normalizes_the_rows_first(M, K, N):
    """matmul(x, w, norm, eps) = rms_norm(x, norm, eps) · w (float64 NumPy, ≤ 1e-5 of the
    largest value; rows of scales 1e-3 to 1e3, so the normalization is what makes them
    comparable), chunked (1, 5 rows) or not (16); its gradients wrt x, w and the norm are the
    formula's (XLA's)."""
    rng = np.random.default_rng(K)
    x = (rng.standard_normal((M, K)) * np.logspace(-3, 3, M)[:, None]).astype(np.float32)
    w = rng.standard_normal((K, N)).astype(np.float32)
    g = rng.uniform(0.5, 1.5, K).astype(np.float32)
    eps = 1e-6
    y = np.asarray(jax.jit(lambda x, w, g: skinny_matmul.matmul(x, w, g, eps))(x, w, g))
    x64 = x.astype(np.float64)
    ref = (x64 / np.sqrt((x64 ** 2).mean(1, keepdims=True) + eps) * g) @ w
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    probe = rng.standard_normal((M, N)).astype(np.float32)
    loss = lambda f: jax.jit(jax.grad(lambda x, w, g: (f(x, w, g) * probe).sum(), (0, 1, 2)))
    got = loss(lambda x, w, g: skinny_matmul.matmul(x, w, g, eps))(x, w, g)
    want = loss(lambda x, w, g: rms_norm(x, g, eps) @ w)(x, w, g)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0,
                                   atol=1e-5 * np.abs(np.asarray(b)).max())


def test_bad_operands_are_refused_by_name():
    with pytest.raises(ValueError, match=r"norm \(4,\) for x \(2, 3\): expected one weight"):
        skinny_matmul.matmul(jnp.ones((2, 3)), jnp.ones((3, 5)), jnp.ones(4))
    with pytest.raises(ValueError, match=r"x \(2, 3\), w \(4, 5\): expected x \[M, K\]"):
        skinny_matmul.matmul(jnp.ones((2, 3)), jnp.ones((4, 5)))
    with pytest.raises(ValueError, match="float32 only"):
        skinny_matmul.matmul(jnp.ones((2, 3), jnp.bfloat16), jnp.ones((3, 5), jnp.bfloat16))
    assert not skinny_matmul.pays(jnp.ones((0, 3)), jnp.ones((3, 5)))  # no rows: XLA's dot
