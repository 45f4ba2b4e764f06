"""An MLA layer's absorbed decode step as one CPU kernel call: a decode step's attention.

Dimension key (`dsv3_jax/mla.py`'s): B sequences, T new tokens, D model, S cache slots,
N heads, H qk_nope head dim, R qk_rope head dim, A v head dim, Q q_lora_rank (0: no query
compression), C kv_lora_rank, X the fused projection's width (Q + C + R; N·(H + R) + C + R
without query compression).

    layer(x [B, T, D], weights, cos, sin [B, T, R/2], index [B], positions [B, T],
          c_kv [B, S, C], k_pe [B, S, R]   (one sequence's cache may come [S, ·]))
        -> (y [B, T, D], c_kv, k_pe with the new entries written)

computes, as `mla.MLA`'s absorbed path does with the decode layout's kernels
(`mla.absorbed_kernels`):

    h       = RMSNorm(x; norm)                          (x itself when norm is None)
    p       = h · w_x = [q_a | kv_a | k_new]            ([q | kv_a | k_new] without Q)
    q       = RMSNorm(q_a; q_norm) · w_qb = [q_nope (N, H) | q_pe (N, R)]
    cache[index[b] + t] ← (RMSNorm(kv_a; kv_norm), rope(k_new))  (a window past the end moved
                                                                  back, as dynamic_update_slice)
    out[n]  = attention over the cache of (q_nope[n] · k[n], rope(q_pe[n])) at `positions`
              (`latent_attention.reference`)                                     [B, N, T, C]
    y       = [out[n] · v[n] for n] · w_o

with rope the rotation of interleaved pairs by (cos, sin) (`rope.rope_tables`). A decode step's
attention otherwise runs as four kernel calls (the fused projection, the query's, the latent
attention, o_proj) between ~12 XLA thunks (norms, rotations, absorbed products, cache writes):
`kernels/mla_decode.cc` does it all in one, the cache updated in place (its operands aliased
to the outputs). `mla.MLA` takes this path for at most `MAX_ROWS` float32 rows (B·T) where the
CPU kernels run, without an FP8 recipe, with the decode layout's kernels (`pays`). Its
derivatives are those of `reference` (the same formula in XLA ops), which then also computes
the value.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax import cpu_kernels, latent_attention
from dsv3_jax.rms_norm import rms_norm
from dsv3_jax.rope import rotate
from dsv3_jax.skinny_matmul import MAX_ROWS


class Weights(NamedTuple):
    """One MLA layer's decode weights, in the decode layout (`mla.absorbed_kernels`)."""

    norm: jax.Array | None  # [D] the block's input norm, or None (x is normalized already)
    x: jax.Array  # [D, X] [q_a | kv_a | k_pe] (without Q: [q_nope | q_pe | kv_a | k_pe])
    q_norm: jax.Array | None  # [Q], None without query compression
    q_b: jax.Array | None  # [Q, N·(H + R)] [q_b_nope | q_b_pe], None without query compression
    kv_norm: jax.Array  # [C]
    k: jax.Array  # [N, H, C]
    v: jax.Array  # [N, C, A]
    o: jax.Array  # [N, A, D]


def pays(x, c_kv, k_pe, weights: Weights) -> bool:
    """Whether `layer` runs the kernel here: 1 ≤ B·T ≤ MAX_ROWS rows, T ≤ S, everything float32
    on one CPU device with the kernels built (arrays or their shapes)."""
    arrays = [x, c_kv, k_pe, *(w for w in weights if w is not None)]
    return (x.ndim == 3 and 1 <= x.shape[0] * x.shape[1] <= MAX_ROWS
            and x.shape[1] <= c_kv.shape[-2]
            and cpu_kernels.runs_here(*(a.dtype for a in arrays)))


def layer(x, weights: Weights, cos, sin, index, positions, c_kv, k_pe, *, eps: float,
          scale: float):
    """(y [B, T, D] float32, c_kv, k_pe) by the kernel (module docstring; check `pays` first):
    `index` [B] (or a scalar) the first slot written per sequence, `eps` the norms', `scale`
    the softmax's (`rope.softmax_scale`)."""
    _check(x, weights, cos, sin, index, positions, c_kv, k_pe)
    if not cpu_kernels.available():
        raise RuntimeError("the CPU kernels are unavailable (see the warning logged by "
                           "dsv3_jax.cpu_kernels): use mla_decode.reference")
    index = jnp.broadcast_to(jnp.asarray(index, jnp.int32).reshape(-1), x.shape[:1])
    return _layer(x, weights, cos, sin, index, jnp.asarray(positions, jnp.int32), c_kv, k_pe,
                  float(eps), float(scale))


def _check(x, w: Weights, cos, sin, index, positions, c_kv, k_pe):
    """Raises ValueError naming every operand whose shape does not fit the others'."""
    if x.ndim != 3 or len(w.k.shape) != 3 or c_kv.ndim not in (2, 3):
        raise ValueError(f"mla_decode.layer: x {x.shape}, weights.k {w.k.shape}, c_kv "
                         f"{c_kv.shape}: expected [B, T, D], [N, H, C], [B, S, C] or [S, C]")
    B, T, D = x.shape
    N, H, C = w.k.shape
    A, R, S = w.v.shape[-1], k_pe.shape[-1], c_kv.shape[-2]
    Q = 0 if w.q_norm is None else w.q_norm.shape[0]
    cache = (B, S) if c_kv.ndim == 3 else (S,)
    expected = {"weights.x": (D, (Q or N * (H + R)) + C + R), "weights.kv_norm": (C,),
                "weights.v": (N, C, A), "weights.o": (N, A, D), "cos": (B, T, R // 2),
                "sin": (B, T, R // 2), "positions": (B, T), "c_kv": (*cache, C),
                "k_pe": (*cache, R), "weights.norm": None if w.norm is None else (D,),
                "weights.q_b": None if w.q_norm is None else (Q, N * (H + R))}
    shape_of = lambda a: None if a is None else tuple(jnp.shape(a))
    got = {"weights.x": shape_of(w.x), "weights.kv_norm": shape_of(w.kv_norm),
           "weights.v": shape_of(w.v), "weights.o": shape_of(w.o), "cos": shape_of(cos),
           "sin": shape_of(sin), "positions": shape_of(positions), "c_kv": shape_of(c_kv),
           "k_pe": shape_of(k_pe), "weights.norm": shape_of(w.norm),
           "weights.q_b": shape_of(w.q_b)}
    bad = [f"{name} {got[name]} (expected {want})" for name, want in expected.items()
           if got[name] != want]
    if jnp.shape(index) not in ((), (1,), (B,)):
        bad.append(f"index {jnp.shape(index)} (expected a scalar or ({B},))")
    if (c_kv.ndim == 2 and B != 1) or T > S or R % 2:
        bad.append(f"B={B}, T={T}, S={S}, R={R} (a cache without its batch axis holds one "
                   "sequence; T ≤ S; R even)")
    if bad:
        raise ValueError("mla_decode.layer: " + "; ".join(bad))


@functools.partial(jax.custom_jvp, nondiff_argnums=(8, 9))
def _layer(x, weights, cos, sin, index, positions, c_kv, k_pe, eps, scale):
    w, f32 = weights, lambda a: a.astype(jnp.float32)
    none = jnp.zeros((0,), jnp.float32)
    call = jax.ffi.ffi_call(
        "dsv3_mla_decode",
        (jax.ShapeDtypeStruct(x.shape, jnp.float32), jax.ShapeDtypeStruct(c_kv.shape, jnp.float32),
         jax.ShapeDtypeStruct(k_pe.shape, jnp.float32)),
        vmap_method="sequential", input_output_aliases={13: 1, 14: 2})
    return call(f32(x), none if w.norm is None else f32(w.norm), f32(w.x),
                none if w.q_norm is None else f32(w.q_norm),
                jnp.zeros((0, 0), jnp.float32) if w.q_b is None else f32(w.q_b),
                f32(w.kv_norm), f32(w.k), f32(w.v), f32(w.o).reshape(-1, x.shape[-1]), f32(cos),
                f32(sin), index, positions, f32(c_kv), f32(k_pe),
                eps=np.float32(eps), scale=np.float32(scale))


def reference(x, weights: Weights, cos, sin, index, positions, c_kv, k_pe, eps: float,
              scale: float):
    """The module docstring's formula in XLA ops, float32: the kernel's outputs."""
    w, f32 = weights, lambda a: a.astype(jnp.float32)
    B, T, _ = x.shape
    N, H, C = w.k.shape
    R = k_pe.shape[-1]
    h = f32(x) if w.norm is None else rms_norm(x, w.norm, eps, jnp.float32)
    p = jnp.einsum("BTD,DX->BTX", h, f32(w.x))
    if w.q_b is None:
        q, kv_at = p[..., :N * (H + R)], N * (H + R)
    else:
        Q = w.q_b.shape[0]
        q, kv_at = jnp.einsum("BTQ,QY->BTY", rms_norm(p[..., :Q], w.q_norm, eps, jnp.float32),
                              f32(w.q_b)), Q
    new_c = rms_norm(p[..., kv_at:kv_at + C], w.kv_norm, eps, jnp.float32)
    new_k = rotate(p[..., kv_at + C:], cos, sin)
    index = jnp.broadcast_to(jnp.asarray(index, jnp.int32).reshape(-1), (B,))
    squeezed = c_kv.ndim == 2
    c_kv, k_pe = (c_kv[None], k_pe[None]) if squeezed else (c_kv, k_pe)
    # per row, a window past the end moved back (mla.write_entries' semantics; mla imports
    # this module, so its function is not imported here: tests/test_layering.py)
    put = jax.vmap(lambda buf, new, i: jax.lax.dynamic_update_slice(buf, new, (i, 0)))
    c_kv, k_pe = put(f32(c_kv), new_c, index), put(f32(k_pe), new_k, index)
    q_nope = q[..., :N * H].reshape(B, T, N, H)
    q_pe = rotate(q[..., N * H:].reshape(B, T, N, R), cos[:, :, None], sin[:, :, None])
    q_latent = jnp.einsum("BTNH,NHC->BNTC", q_nope, f32(w.k))
    out = latent_attention.reference(c_kv, k_pe, q_latent, jnp.swapaxes(q_pe, 1, 2),
                                     jnp.asarray(positions), scale)
    y = jnp.einsum("BNTA,NAD->BTD", jnp.einsum("BNTC,NCA->BNTA", out, f32(w.v)), f32(w.o))
    return (y, c_kv[0], k_pe[0]) if squeezed else (y, c_kv, k_pe)


@_layer.defjvp
def _layer_jvp(eps, scale, primals, tangents):
    f = lambda *a: reference(*a, eps, scale)
    return jax.jvp(f, primals, tangents)
