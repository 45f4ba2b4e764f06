"""dsv3_jax.fp8 against independent references: NumPy + ml_dtypes loops for the quantizers,
hand-fed amax sequences for delayed scaling, float32 GEMMs for the blockwise recipe."""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dsv3_jax import fp8

E4M3_MAX = 448.0


def calc_diff(x, y) -> float:
    """DeepGEMM's measure: 1 − 2Σxy / Σ(x² + y²), in float64."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(1 - 2 * (x * y).sum() / (x * x + y * y).sum())


def ref_quantize_tiles(x: np.ndarray, tile: int):
    """Loop reference: one scale per 1×tile slice of the last axis (floor 1e-4)."""
    x = np.asarray(x, np.float32)
    n = math.ceil(x.shape[-1] / tile)
    q = np.zeros(x.shape, ml_dtypes.float8_e4m3fn)
    s = np.zeros(x.shape[:-1] + (n,), np.float32)
    for idx in np.ndindex(x.shape[:-1]):
        for j in range(n):
            t = x[idx][j * tile:(j + 1) * tile]
            s[idx + (j,)] = np.float32(max(np.abs(t).max(), np.float32(1e-4))) / np.float32(448)
            q[idx][j * tile:(j + 1) * tile] = np.clip(t / s[idx + (j,)], -448, 448).astype(
                ml_dtypes.float8_e4m3fn)
    return q, s


def ref_quantize_blocks(w: np.ndarray, block: int):
    w = np.asarray(w, np.float32)
    O, I = w.shape
    q = np.zeros(w.shape, ml_dtypes.float8_e4m3fn)
    s = np.zeros((math.ceil(O / block), math.ceil(I / block)), np.float32)
    for a in range(s.shape[0]):
        for b in range(s.shape[1]):
            blk = w[a * block:(a + 1) * block, b * block:(b + 1) * block]
            s[a, b] = np.float32(max(np.abs(blk).max(), np.float32(1e-4))) / np.float32(448)
            q[a * block:(a + 1) * block, b * block:(b + 1) * block] = np.clip(
                blk / s[a, b], -448, 448).astype(ml_dtypes.float8_e4m3fn)
    return q, s


def _inputs():
    rng = np.random.default_rng(0)
    return {
        "random": rng.normal(size=(4, 256)).astype(np.float32),
        "ragged": rng.normal(size=(3, 200)).astype(np.float32) * 5,  # 200 = 128 + 72
        "zeros": np.zeros((2, 130), np.float32),
        "huge": (rng.normal(size=(2, 128)) * 1e30).astype(np.float32),
        "tiny64": rng.normal(size=(5, 64)).astype(np.float32),  # the tiny preset's width
    }


@pytest.mark.parametrize("case", list(_inputs()))
def test_tilewise_quantize_matches_a_numpy_loop(case):
    x = _inputs()[case]
    q, s = fp8.tilewise_quantize(jnp.asarray(x))
    q_ref, s_ref = ref_quantize_tiles(x, 128)
    np.testing.assert_array_equal(np.asarray(q).view(np.uint8), q_ref.view(np.uint8))
    np.testing.assert_allclose(np.asarray(s), s_ref, rtol=1e-6)
    back = np.asarray(q.astype(jnp.float32)).reshape(x.shape)
    assert np.isfinite(back).all() and np.isfinite(np.asarray(s)).all()


@pytest.mark.parametrize("case", list(_inputs()))
def test_blockwise_quantize_matches_a_numpy_loop_and_the_loader_convention(case):
    w = _inputs()[case].reshape(-1, _inputs()[case].shape[-1])
    q, s = fp8.blockwise_quantize(jnp.asarray(w))
    q_ref, s_ref = ref_quantize_blocks(w, 128)
    np.testing.assert_array_equal(np.asarray(q).view(np.uint8), q_ref.view(np.uint8))
    np.testing.assert_allclose(np.asarray(s), s_ref, rtol=1e-6)
    # w ≈ q · scale_inv per block: dequantized error within E4M3's half-ulp (2^-4 relative)
    # of each block's largest value.
    back = np.asarray(fp8.blockwise_dequantize(q, s))
    # (XLA's product may differ from NumPy's in the last bit)
    np.testing.assert_allclose(back, fp8.blockwise_dequantize(np.asarray(q), s_ref),
                               rtol=2e-7)
    bound = np.repeat(np.repeat(s_ref * 448 / 16, 128, 0), 128, 1)[:w.shape[0], :w.shape[1]]
    assert (np.abs(back - w) <= bound + 1e-30).all()


def test_blockwise_gemm_forward_and_both_gradients_track_float32():
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (256, 512))
    w = jax.random.normal(kw, (384, 512))  # [out, in]
    g = jax.random.normal(kg, (256, 384))
    f = lambda x, w: fp8.project("MK,NK->MN", x, w, "blockwise")
    y, vjp = jax.vjp(f, x, w)
    dx, dw = vjp(g)
    # Measured 6.8e-4 for each; E4M3's 3 mantissa bits bound it near 1e-3.
    assert calc_diff(y, x @ w.T) < 1e-3
    assert calc_diff(dx, g @ w) < 1e-3
    assert calc_diff(dw, g.T @ x) < 1e-3
    assert calc_diff(y, x @ w.T) > 1e-5  # it did quantize


@pytest.mark.parametrize("recipe", ["none", "delayed", "blockwise"])
@pytest.mark.parametrize("eqn, xs, ws", [
    ("BTD,DNH->BTNH", (2, 3, 8), (8, 4, 5)),  # MLA q projection ("none": rows, columns merged)
    ("BTQ,QNH->BNTH", (2, 3, 8), (8, 4, 5)),  # heads ahead of positions in the output
    ("BTNA,NAD->BTD", (2, 3, 4, 5), (4, 5, 7)),  # o_proj: two contraction axes
    ("BNTA,NAD->BTD", (2, 4, 3, 5), (4, 5, 7)),  # ... not adjacent in x
    ("PbD,PDF->PbF", (3, 4, 8), (3, 8, 6)),  # dropless expert blocks: a group axis
    ("BTNH,CNH->BTNC", (2, 3, 4, 5), (6, 4, 5)),  # absorbed decode: heads as groups
    ("BNTH,CNH->BNTC", (2, 4, 3, 5), (6, 4, 5)),  # ... the group axis inside both
    ("BTD,DF->BTF", (2, 3, 8), (8, 6)),  # "none" merges the rows B, T into one
    ("TBD,DF->BTF", (3, 2, 8), (8, 6)),  # ... not when their order differs in the output
    ("BTD,DNH->BNTH", (2, 3, 8), (8, 4, 5)),  # rows and columns apart in the output
    ("BTND,DHN->BTH", (2, 3, 4, 5), (5, 6, 4)),  # contractions (N, D) apart in w
])
def test_every_projection_layout_is_exact_on_representable_values(recipe, eqn, xs, ws):
    """Integers in [-7, 7] are exact in E4M3 at per-tensor scale 1 (delayed's initial scale)
    and at block scale 7/448 = 1/64 (every tile and block here holds a 7): nothing rounds, so
    the result is the einsum exactly, which pins the GEMM layout (transposes, group axes,
    several contraction axes). "none" is the plain projection's own dot_general (runs of rows,
    contractions or columns adjacent in operand and output merged by a reshape, contractions
    in the weight's axis order)."""
    rng = np.random.default_rng(1)
    x = rng.integers(-7, 8, xs).astype(np.float32)
    w = rng.integers(-7, 8, ws).astype(np.float32)
    x[..., 0], w[..., 0] = 7, 7  # a 7 in every contraction tile of x and every block of w
    state = fp8.init_state(4)
    got = fp8.project(eqn, jnp.asarray(x), jnp.asarray(w), recipe, state)
    np.testing.assert_array_equal(np.asarray(got), np.einsum(eqn, x, w))


def _delayed_step(state, x, w):
    """One training step of one GEMM: forward, backward, state from the cotangent."""
    f = lambda x, w, s: fp8.project("MK,KN->MN", x, w, "delayed", s, 0).sum()
    (dx, dw, ct) = jax.grad(f, argnums=(0, 1, 2))(x, w, state)
    return fp8.merge_state(state, ct), (dx, dw)


def test_delayed_scales_fed_by_hand_in_a_scan():
    """amax 2, 3, 4 with L=3: the scales used are 1 → 2/448 → 3/448 and the histories run
    [2,0,0] → [3,0,2] → [4,2,3] (Flax's fp8_ops test)."""
    w = jnp.eye(4)
    xs = jnp.stack([jnp.full((4, 4), a) for a in (2.0, 3.0, 4.0)])

    def body(state, x):
        used = state["x_scale"]
        state, _ = _delayed_step(state, x, w)
        return state, (used, state["x_history"])

    _, (used, histories) = jax.jit(lambda s: jax.lax.scan(body, s, xs))(fp8.init_state(3))
    np.testing.assert_allclose(used, [1.0, 2 / 448, 3 / 448], rtol=1e-7)
    np.testing.assert_array_equal(histories, [[2, 0, 0], [3, 0, 2], [4, 2, 3]])


def test_delayed_spike_stays_finite_and_recovers_after_exactly_l_steps():
    L = 4
    w = jax.random.normal(jax.random.key(0), (16, 8))
    x = jax.random.normal(jax.random.key(1), (32, 16))
    state = fp8.init_state(L)
    for _ in range(L + 1):  # settle the history on the normal amax
        state, _ = _delayed_step(state, x, w)
    settled = state["x_scale"]
    step = jax.jit(_delayed_step)
    scales = []
    for t in range(L + 2):
        xt = x * 1e4 if t == 0 else x
        state, (dx, dw) = step(state, xt, w)
        assert np.isfinite(dx).all() and np.isfinite(dw).all()
        scales.append(float(state["x_scale"]))
    # The spike's amax stays in the window for L steps, then the pre-spike scale is back.
    assert all(s > 1e3 * float(settled) for s in scales[:L])
    np.testing.assert_allclose(scales[L], settled, rtol=1e-6)


def test_a_branch_whose_output_is_unused_keeps_its_scale():
    x = jax.random.normal(jax.random.key(0), (8, 16))
    w = jax.random.normal(jax.random.key(1), (16, 4))
    state = {"used": fp8.init_state(2), "unused": fp8.init_state(2)}
    state["unused"]["x_scale"] = jnp.float32(0.5)

    def loss(s):
        a = fp8.project("MK,KN->MN", x, w, "delayed", s["used"])
        fp8.project("MK,KN->MN", x, w, "delayed", s["unused"])  # never reaches the loss
        return a.sum()

    new = fp8.merge_state(state, jax.grad(loss)(state))
    assert float(new["unused"]["x_scale"]) == 0.5
    np.testing.assert_array_equal(new["unused"]["x_history"], [0, 0])
    assert float(new["used"]["x_scale"]) != 1.0  # the control: the used branch moved


def test_delayed_clips_before_the_cast():
    """A stale scale far too small saturates at ±448·scale instead of turning into NaN/inf."""
    state = fp8.init_state(2)
    state["x_scale"] = jnp.float32(1e-6)
    y = fp8.project("MK,KN->MN", jnp.full((2, 2), 1.0), jnp.eye(2), "delayed", state)
    np.testing.assert_allclose(y, np.eye(2) * 0 + 448e-6, rtol=1e-6)


def test_unknown_recipe_and_bad_equation():
    with pytest.raises(ValueError, match="unknown FP8 recipe 'fp4'; allowed"):
        fp8.project("MK,KN->MN", jnp.ones((2, 2)), jnp.ones((2, 2)), "fp4")
    with pytest.raises(ValueError, match="needs the GEMM's state"):
        fp8.project("MK,KN->MN", jnp.ones((2, 2)), jnp.ones((2, 2)), "delayed")
