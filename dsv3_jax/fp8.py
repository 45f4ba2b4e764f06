"""FP8 mixed precision for the weight projections: per-tensor delayed scaling and DeepSeek-V3's
fine-grained (1×128 / 128×128) recipe.

Every weight projection is an einsum `x · w` that `project` rewrites as a batched GEMM
(dimension key: G groups — experts or token blocks —, M rows, K contraction, N columns):
x → [G, M, K], w → [G, K, N], y → [G, M, N]. Only weight projections come here
(`layers.project`); activation-by-activation products (attention scores, probs·V) and the
router never do, so no recipe can quantize them.

Scales are dequantization multipliers: x ≈ q · scale, q = clip(x / scale, ±fp8_max) cast to
the format (clipping first: ml_dtypes turns E4M3 overflow into NaN and E5M2 overflow into inf).

`delayed` (TransformerEngine's HYBRID recipe, Flax `fp8_ops` semantics): each GEMM keeps, for
its input, its weight and its output gradient, an amax history of length L and a scale. Step t
quantizes with the scale computed after step t−1: amax_max · 2^margin / fp8_max over the last L
amaxes, kept unchanged when that max is 0 or not finite. Inputs and weights are E4M3, output
gradients E5M2. The forward records the input and weight amaxes, the backward the gradient's;
the new state leaves through the custom_vjp cotangent of the state (Flax's
overwrite-with-gradient idea) with `seen` = 1, and `merge_state` keeps the old state of every
GEMM whose backward did not run (its output never reached the loss), so no scale becomes 0.
Amaxes are global maxima: jnp.max over a sharded array in SPMD code, and a pmax over every
manual axis inside shard_map (`_amax`); per-layer state slices under nn.scan — amax is never
summed.

`blockwise` (DeepSeek-V3 §3.3, no state): scales computed online, E4M3 everywhere. The forward
quantizes x in 1×128 tiles along K and w in 128×128 blocks; the input gradient takes dY in 1×128
tiles along its contraction axis (N) against the same weight blocks; the weight gradient takes
X and dY in 128×1 tiles along the token axis (M). Each 128-wide slice of the contraction is an
f8 × f8 dot accumulated in float32 and scaled, then the slices are summed (DeepGEMM's promotion
every 128 elements). Tile amaxes are floored at 1e-4 so all-zero tiles stay finite; edges not
divisible by 128 are zero-padded.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax import skinny_matmul
from dsv3_jax.config import FP8_RECIPES

E4M3 = jnp.float8_e4m3fn  # max 448
E5M2 = jnp.float8_e5m2  # max 57344
RECIPES = FP8_RECIPES  # none, delayed, blockwise (validated in ModelConfig)
TILE = 128
AMAX_FLOOR = 1e-4  # DeepGEMM's clamp: an all-zero tile gets a finite scale


def fp8_max(dtype) -> float:
    return float(jnp.finfo(dtype).max)


def quantize(x: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """clip(x / scale, ±fp8_max) cast to `dtype` (scale broadcasts against x)."""
    m = fp8_max(dtype)
    return jnp.clip(x.astype(jnp.float32) / scale, -m, m).astype(dtype)


# ---- fine-grained quantizers (shared with the HF loader) --------------------------------------

def _pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    pad = -x.shape[axis] % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def tilewise_quantize(x: jax.Array, tile: int = TILE, dtype=E4M3):
    """One scale per 1×`tile` slice of the last axis.

    Returns (q [..., I] in `dtype`, scale_inv [..., ceil(I/tile)] float32), x ≈ q · scale_inv.
    """
    I = x.shape[-1]
    xp = _pad_to(x.astype(jnp.float32), -1, tile)
    tiles = xp.reshape(*xp.shape[:-1], -1, tile)  # [..., nI, tile]
    scale = jnp.maximum(jnp.abs(tiles).max(-1), AMAX_FLOOR) / fp8_max(dtype)
    q = quantize(tiles, scale[..., None], dtype).reshape(xp.shape)[..., :I]
    return q, scale


def blockwise_quantize(w: jax.Array, block: tuple[int, int] = (TILE, TILE), dtype=E4M3):
    """One scale per `block` of the last two axes (w as [..., out, in], DeepSeek's checkpoints).

    Returns (q [..., O, I] in `dtype`, scale_inv [..., ceil(O/bo), ceil(I/bi)] float32), with
    w ≈ q · scale_inv per block: the released checkpoints' `weight_scale_inv` convention.
    """
    O, I = w.shape[-2:]
    bo, bi = block
    wp = _pad_to(_pad_to(w.astype(jnp.float32), -2, bo), -1, bi)
    blocks = wp.reshape(*wp.shape[:-2], wp.shape[-2] // bo, bo, wp.shape[-1] // bi, bi)
    scale = jnp.maximum(jnp.abs(blocks).max((-3, -1)), AMAX_FLOOR) / fp8_max(dtype)
    q = quantize(blocks, scale[..., :, None, :, None], dtype).reshape(wp.shape)[..., :O, :I]
    return q, scale


def expand_blocks(scale_inv, shape: tuple[int, int], block: tuple[int, int] = (TILE, TILE)):
    """[..., nO, nI] block scales → [..., O, I], each block's scale over its elements (NumPy
    in, NumPy out; JAX in, JAX out)."""
    xp = np if isinstance(scale_inv, np.ndarray) else jnp
    s = xp.repeat(xp.repeat(scale_inv, block[0], axis=-2), block[1], axis=-1)
    return s[..., :shape[0], :shape[1]]


def blockwise_dequantize(q, scale_inv, block: tuple[int, int] = (TILE, TILE),
                         dtype=jnp.float32):
    """q [..., O, I] · its block scales [..., ceil(O/bo), ceil(I/bi)] → `dtype`.

    The one definition of the checkpoints' convention: NumPy arrays stay on the host (the HF
    loader, `hf.dequantize_fp8_blocks`), JAX arrays stay JAX.
    """
    xp = np if isinstance(q, np.ndarray) else jnp
    s = expand_blocks(xp.asarray(scale_inv, xp.float32), q.shape[-2:], block)
    return (q.astype(xp.float32) * s).astype(dtype)


# ---- the canonical GEMM of an einsum ---------------------------------------------------------

@functools.cache
def _letters(eqn: str) -> tuple[str, str, str]:
    """(x, w, output) index letters of "x,w->out"."""
    inputs, out = eqn.replace(" ", "").split("->")
    xs, ws = inputs.split(",")
    return xs, ws, out


@functools.cache
def _gemm_plan(eqn: str):
    """(group, rows, contraction, columns, output) letters of "x,w->out"."""
    xs, ws, out = _letters(eqn)
    group = "".join(c for c in xs if c in ws and c in out)
    contract = "".join(c for c in xs if c in ws and c not in out)
    rows = "".join(c for c in xs if c not in ws)
    cols = "".join(c for c in ws if c not in xs)
    if set(out) != set(group + rows + cols) or any(c not in out for c in rows + cols):
        raise ValueError(f"{eqn!r} is not a projection (every free index must reach the output)")
    return group, rows, contract, cols, out


def _skinny_projection(eqn: str, x: jax.Array, w: jax.Array) -> jax.Array | None:
    """einsum(eqn, x, w) through `skinny_matmul` when it runs here (`skinny_matmul.pays`: a few
    float32 rows on one CPU device), else None. The equation must have no letter shared by all
    three operands and w's contracted letters must come before its column letters, so w is read
    as stored, [K, N]; x, a few rows, is transposed to [M, K] (its rows in x's order, its
    contracted letters in w's), which also covers heads-first activations ("BNTA,NAD->BTD",
    the absorbed decode's o_proj)."""
    group, rows, contract, cols, out = _gemm_plan(eqn)
    xs, ws, _ = _letters(eqn)
    k, m, n = [c for c in ws if c in contract], list(rows), list(cols)  # k in w's order
    if group or ws != "".join(k + n):
        return None
    size = {**dict(zip(xs, x.shape, strict=True)), **dict(zip(ws, w.shape, strict=True))}
    rows, depth, width = (math.prod(size[c] for c in part) for part in (m, k, n))
    if not skinny_matmul.pays(jax.ShapeDtypeStruct((rows, depth), x.dtype),
                              jax.ShapeDtypeStruct((depth, width), w.dtype)):
        return None
    x2 = jnp.transpose(x, [xs.index(c) for c in m + k]).reshape(rows, depth)
    y = skinny_matmul.matmul(x2, w.reshape(depth, width)).reshape([size[c] for c in m + n])
    return jnp.transpose(y, [(m + n).index(c) for c in out])


def _plain_projection(eqn: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """einsum(eqn, x, w) in float32 as one dot_general of (at most) 2-D operands: each run of
    row, contracted and column letters that sits together in both its operands and the output
    is merged into one dimension by a free reshape, and the contracted and batch dimensions go
    in w's axis order, so the weight is read as stored.

    Why: jnp.einsum orders contracted dimensions alphabetically (for "BTNA,NAD->BTD" that is
    (A, N)), and XLA:CPU then copied the kernel transposed on every call; and the backward pass
    of a dot with two row dimensions ("BTD,DF->BTF"), a weight gradient contracting over both,
    ran as a strided transpose of the [B, T, F] cotangent fused into the elementwise op before
    it (measured on 2 cores, a [8, 256, 256] SwiGLU with F = 768, forward and backward:
    64 ms as written against 35 ms with [B·T] rows). A few float32 rows on one CPU device (a
    decode step's) go through `skinny_matmul`'s kernel instead (`_skinny_projection`)."""
    skinny = _skinny_projection(eqn, x, w)
    if skinny is not None:
        return skinny
    group, rows, contract, cols, out = _gemm_plan(eqn)
    xs, ws, _ = _letters(eqn)
    summed = "".join(c for c in ws if c in contract)  # w's order
    size = {**dict(zip(xs, x.shape, strict=True)), **dict(zip(ws, w.shape, strict=True))}
    runs = {"0": (rows, xs, out), "1": (summed, xs, ws), "2": (cols, ws, out)}
    merges = {tag: run for tag, (run, *where) in runs.items()
              if len(run) > 1 and all(run in letters for letters in where)}
    for tag, run in merges.items():
        xs, ws, out = (letters.replace(run, tag) for letters in (xs, ws, out))
        size[tag] = math.prod(size[c] for c in run)
    x, w = x.reshape([size[c] for c in xs]), w.reshape([size[c] for c in ws])
    batch = [c for c in ws if c in group]
    summed = [c for c in ws if c not in group and c in xs]
    dims = (([xs.index(c) for c in summed], [ws.index(c) for c in summed]),
            ([xs.index(c) for c in batch], [ws.index(c) for c in batch]))
    y = jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)
    letters = "".join(batch) + "".join(c for c in xs if c not in ws) + "".join(
        c for c in ws if c not in xs)  # dot_general's order: batch, x's free, w's free
    y = jnp.transpose(y, [letters.index(c) for c in out])
    for tag, run in merges.items():
        out = out.replace(tag, run)
    return y.reshape([size[c] for c in out])


def _to_gemm(eqn: str, x: jax.Array, w: jax.Array):
    group, rows, contract, cols, _ = _gemm_plan(eqn)
    xs, ws, _ = _letters(eqn)
    size = {**dict(zip(xs, x.shape, strict=True)), **dict(zip(ws, w.shape, strict=True))}
    n = lambda letters: math.prod(size[c] for c in letters)
    x3 = jnp.einsum(f"{xs}->{group}{rows}{contract}", x).reshape(n(group), n(rows), n(contract))
    w3 = jnp.einsum(f"{ws}->{group}{contract}{cols}", w).reshape(n(group), n(contract), n(cols))
    return x3, w3, size


def _from_gemm(eqn: str, y3: jax.Array, size: dict) -> jax.Array:
    group, rows, _, cols, out = _gemm_plan(eqn)
    letters = group + rows + cols
    return jnp.einsum(f"{letters}->{out}", y3.reshape([size[c] for c in letters]))


def _dot(a, b):
    """[G, M, K] · [G, K, N] → [G, M, N] float32, operands as they are (f8 stays f8)."""
    return jnp.einsum("gmk,gkn->gmn", a, b, preferred_element_type=jnp.float32)


# ---- delayed per-tensor scaling --------------------------------------------------------------

def init_state(history_length: int) -> dict[str, jax.Array]:
    """One GEMM's delayed-scaling state: amax histories (newest at index 0) and scales of its
    input (x), weight (w) and output gradient (g); `seen` marks a state the backward wrote."""
    zeros = jnp.zeros((history_length,), jnp.float32)
    one = jnp.ones((), jnp.float32)
    return {"x_history": zeros, "x_scale": one, "w_history": zeros, "w_scale": one,
            "g_history": zeros, "g_scale": one, "seen": jnp.zeros((), jnp.float32)}


def _amax(x: jax.Array) -> jax.Array:
    """max |x|: global in SPMD code; inside shard_map also reduced (by max) over manual axes."""
    amax = jnp.max(jnp.abs(x)).astype(jnp.float32)
    manual = tuple(jax.sharding.get_abstract_mesh().manual_axes)
    return jax.lax.pmax(amax, manual) if manual else amax


def _record(history: jax.Array, scale: jax.Array, amax: jax.Array, dtype, margin: int):
    """(new history, new scale) after observing `amax` (Flax's roll-then-set layout)."""
    history = jnp.roll(history, -1).at[0].set(amax)
    top = history.max()
    new = top * (2.0 ** margin) / fp8_max(dtype)
    return history, jnp.where(jnp.isfinite(top) & (top > 0), new, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _delayed_gemm(x3, w3, state, margin):
    return _delayed_fwd(x3, w3, state, margin)[0]


def _delayed_fwd(x3, w3, state, margin):
    sx, sw = state["x_scale"], state["w_scale"]
    qx, qw = quantize(x3, sx, E4M3), quantize(w3, sw, E4M3)
    y = _dot(qx, qw) * (sx * sw)
    xh, xs = _record(state["x_history"], sx, _amax(x3), E4M3, margin)
    wh, ws = _record(state["w_history"], sw, _amax(w3), E4M3, margin)
    new = {"x_history": xh, "x_scale": xs, "w_history": wh, "w_scale": ws}
    return y.astype(x3.dtype), (qx, qw, state, new, _dtype_tag(x3), _dtype_tag(w3))


def _dtype_tag(x: jax.Array) -> jax.Array:
    """A zero-size slice of x: carries its dtype (and, inside shard_map, the mesh axes it
    varies over) through custom_vjp residuals."""
    return x.reshape(-1)[:0]


def _cotangent(ct: jax.Array, tag: jax.Array) -> jax.Array:
    """`ct` in the primal's dtype, summed over the mesh axes it varies over and the primal
    does not (inside shard_map: what autodiff's psum would do for an input used against a
    sharded operand, e.g. x against a tensor-split weight)."""
    varying = lambda a: jax.typeof(a).manual_axis_type.varying
    extra = tuple(sorted(varying(ct) - varying(tag)))
    if extra:
        ct = jax.lax.psum(ct, extra)
    return ct.astype(tag.dtype)


def _delayed_bwd(margin, residuals, g3):
    qx, qw, state, new, x_tag, w_tag = residuals
    sx, sw, sg = state["x_scale"], state["w_scale"], state["g_scale"]
    qg = quantize(g3, sg, E5M2)
    dx = _dot(qg, jnp.swapaxes(qw, 1, 2)) * (sg * sw)
    dw = _dot(jnp.swapaxes(qx, 1, 2), qg) * (sx * sg)
    gh, gs = _record(state["g_history"], sg, _amax(g3), E5M2, margin)
    ct = {**new, "g_history": gh, "g_scale": gs, "seen": jnp.ones((), jnp.float32)}
    return _cotangent(dx, x_tag), _cotangent(dw, w_tag), ct


_delayed_gemm.defvjp(_delayed_fwd, _delayed_bwd)


def merge_state(old: Any, cotangent: Any) -> Any:
    """The next delayed-scaling state from the step's state cotangents: the backward's values
    where it ran (`seen` > 0), the old state where it did not (output never reached the loss).
    Works on any tree of GEMM states (stacked per layer too)."""
    def merge(o, c):
        seen = c["seen"]
        out = {}
        for k in o:
            s = seen.reshape(seen.shape + (1,) * (o[k].ndim - seen.ndim))
            out[k] = jnp.where(s > 0, c[k], o[k]) if k != "seen" else jnp.zeros_like(o[k])
        return out

    is_state = lambda t: isinstance(t, dict) and "seen" in t
    return jax.tree.map(merge, old, cotangent, is_leaf=is_state)


# ---- fine-grained blockwise scaling ----------------------------------------------------------

def _scaled_dot(a_q, a_s, b_q, b_s) -> jax.Array:
    """Σ_j a_s[g,m,j] · b_s[g,j,n] · (a_q[g,m,j,:] · b_q[g,j,:,n]): 128-wide contraction
    slices as f8 dots accumulated in float32, each scaled, then summed.

    a_q [G, M, K], a_s [G, M, nK]; b_q [G, K, N], b_s [G, nK, N].
    """
    G, M, _ = a_q.shape
    N = b_q.shape[-1]
    a = _pad_to(a_q, 2, TILE).reshape(G, M, -1, TILE)
    b = _pad_to(b_q, 1, TILE).reshape(G, -1, TILE, N)
    partial = jnp.einsum("gmjk,gjkn->gmjn", a, b, preferred_element_type=jnp.float32)
    return jnp.einsum("gmjn,gmj,gjn->gmn", partial, a_s, b_s)


@jax.custom_vjp
def _blockwise_gemm(x3, w3):
    return _blockwise_fwd(x3, w3)[0]


def _blockwise_fwd(x3, w3):
    qx, sx = tilewise_quantize(x3)  # 1×128 tiles along K
    qw, sw = blockwise_quantize(w3)  # 128×128 blocks of (K, N): scales [G, nK, nN]
    y = _scaled_dot(qx, sx, qw, expand_blocks(sw, (sw.shape[1], w3.shape[2]), (1, TILE)))
    return y.astype(x3.dtype), (x3, qw, sw, _dtype_tag(x3), _dtype_tag(w3))


def _blockwise_bwd(residuals, g3):
    x3, qw, sw, x_tag, w_tag = residuals
    K = x3.shape[2]
    # dX = dY · Wᵀ: dY in 1×128 tiles along N, the same weight blocks transposed.
    qg, sg = tilewise_quantize(g3)
    swt = jnp.swapaxes(sw, 1, 2)  # [G, nN, nK]
    dx = _scaled_dot(qg, sg, jnp.swapaxes(qw, 1, 2),
                     expand_blocks(swt, (swt.shape[1], K), (1, TILE)))
    # dW = Xᵀ · dY: X and dY in 128×1 tiles along the token axis M.
    qxt, sxt = tilewise_quantize(jnp.swapaxes(x3, 1, 2))  # [G, K, M], [G, K, nM]
    qgt, sgt = tilewise_quantize(jnp.swapaxes(g3, 1, 2))  # [G, N, M], [G, N, nM]
    dw = _scaled_dot(qxt, sxt, jnp.swapaxes(qgt, 1, 2), jnp.swapaxes(sgt, 1, 2))
    return _cotangent(dx, x_tag), _cotangent(dw, w_tag)


_blockwise_gemm.defvjp(_blockwise_fwd, _blockwise_bwd)


# ---- the entry point -------------------------------------------------------------------------

def project(eqn: str, x: jax.Array, w: jax.Array, recipe: str = "none",
            state: dict | None = None, margin: int = 0) -> jax.Array:
    """The projection `einsum(eqn, x, w)` under an FP8 recipe, float32 accumulation.

    x and w arrive in the compute dtype; the result is float32 (the caller casts).
    Args:
      recipe: "none" (plain einsum), "delayed" (needs this GEMM's `state`) or "blockwise".
    """
    if recipe == "none":
        return _plain_projection(eqn, x, w)
    x3, w3, size = _to_gemm(eqn, x, w)
    if recipe == "delayed":
        if state is None:
            raise ValueError("the delayed FP8 recipe needs the GEMM's state")
        y3 = _delayed_gemm(x3, w3, state, margin)
    elif recipe == "blockwise":
        y3 = _blockwise_gemm(x3, w3)
    else:
        raise ValueError(f"unknown FP8 recipe {recipe!r}; allowed: {RECIPES}")
    return _from_gemm(eqn, y3.astype(jnp.float32), size)
