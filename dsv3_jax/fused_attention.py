"""MLA's causal attention for training and prefill as one CPU kernel call each way.

Dimension key: B batch · N heads · T positions (queries and keys: one sequence) · H qk_nope
head dim · R qk_rope head dim · A v head dim. For q_nope, k_nope [B, N, T, H], q_pe
[B, T, N, R], k_pe [B, T, R] (MLA's decoupled rope key, one for all heads), v [B, N, T, A] and
positions [B, T]:

    scores = (q_nope k_nopeᵀ + q_pe k_peᵀ) · scale     [B, N, T, T]
    p      = softmax(scores) over the keys s ≤ t with positions[s] ≤ positions[t]
    out    = p v                                       [B, N, T, A]

On XLA:CPU the pure-JAX form (`mla.causal_attention`: the rope key broadcast to every head and
concatenated, then chunks of products, mask, max, exponentials and sums, each a separate pass
over [B, N, T, T] buffers, and its gradient as many more) was ~25 ms of a 100 ms bench-config
layer. `attend` runs the forward as one FFI call (`kernels/causal_attention.cc`): per
(sequence, head, block of 64 queries) two sgemms for the scores against the keys the block can
reach, the masked softmax in place (a vectorized exp), one sgemm with the values; it keeps each
query's log-sum-exp, from which the backward call rebuilds the probabilities block by block and
forms every gradient (FlashAttention's recomputation: no [T, T] buffer is kept between the
calls). Runs where `cpu_kernels.runs_here` (float32, one CPU device); `reference` is the formula.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax import cpu_kernels


def visible(positions: jax.Array, start: int = 0, end: int | None = None) -> jax.Array:
    """[B, end − start, end] bool: key s < end is visible to query t in [start, end)
    (s ≤ t and positions[s] ≤ positions[t]); by default every query."""
    end = positions.shape[1] if end is None else end
    causal = jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None]
    return causal[None] & (positions[:, None, :end] <= positions[:, start:end, None])


def reference(q_nope, q_pe, k_nope, k_pe, v, positions, scale: float) -> jax.Array:
    """The formula in the module docstring, in float32 (what the kernel computes)."""
    f32 = lambda a: a.astype(jnp.float32)
    scores = (jnp.einsum("BNTH,BNSH->BNTS", f32(q_nope), f32(k_nope))
              + jnp.einsum("BTNR,BSR->BNTS", f32(q_pe), f32(k_pe))) * scale
    scores = jnp.where(visible(positions)[:, None], scores, -jnp.inf)
    return jnp.einsum("BNTS,BNSA->BNTA", jax.nn.softmax(scores, axis=-1), f32(v))


def attend(q_nope: jax.Array, q_pe: jax.Array, k_nope: jax.Array, k_pe: jax.Array,
           v: jax.Array, positions: jax.Array, scale: float) -> jax.Array:
    """[B, N, T, A] float32: causal attention within each sequence (module docstring), with
    its gradient in every float operand. q_nope, k_nope [B, N, T, H], q_pe [B, T, N, R],
    k_pe [B, T, R], v [B, N, T, A], positions [B, T] int. Check `cpu_kernels.runs_here`
    first."""
    shapes = [a.shape for a in (q_nope, q_pe, k_nope, k_pe, v, positions)]
    if q_nope.ndim != 4 or q_pe.ndim != 4 or v.ndim != 4:
        ok = False
    else:
        B, N, T, _ = q_nope.shape
        R = q_pe.shape[3]
        ok = (q_pe.shape == (B, T, N, R) and k_nope.shape == q_nope.shape
              and k_pe.shape == (B, T, R) and v.shape[:3] == (B, N, T)
              and positions.shape == (B, T) and min(q_nope.shape[3], R, v.shape[3]) > 0)
    if not ok:
        raise ValueError(f"fused_attention.attend: q_nope, q_pe, k_nope, k_pe, v, positions "
                         f"{', '.join(map(str, shapes))}: expected [B, N, T, H], [B, T, N, R], "
                         "[B, N, T, H], [B, T, R], [B, N, T, A], [B, T] with H, R, A ≥ 1")
    if not cpu_kernels.available():
        raise RuntimeError("the CPU kernels are unavailable (see the warning logged by "
                           "dsv3_jax.cpu_kernels): use fused_attention.reference")
    f32 = lambda a: a.astype(jnp.float32)
    return _attend(*map(f32, (q_nope, q_pe, k_nope, k_pe, v)), positions.astype(jnp.int32),
                   float(scale))


def _forward(q_nope, q_pe, k_nope, k_pe, v, positions, scale):
    B, N, T, _ = q_nope.shape
    call = jax.ffi.ffi_call("dsv3_causal_attention_fwd",
                            (jax.ShapeDtypeStruct(v.shape, jnp.float32),
                             jax.ShapeDtypeStruct((B, N, T), jnp.float32)),
                            vmap_method="sequential")
    return call(q_nope, q_pe, k_nope, k_pe, v, positions, scale=np.float32(scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attend(q_nope, q_pe, k_nope, k_pe, v, positions, scale):
    return _forward(q_nope, q_pe, k_nope, k_pe, v, positions, scale)[0]


def _attend_fwd(q_nope, q_pe, k_nope, k_pe, v, positions, scale):
    out, lse = _forward(q_nope, q_pe, k_nope, k_pe, v, positions, scale)
    return out, (q_nope, q_pe, k_nope, k_pe, v, positions, out, lse)


def _attend_bwd(scale, residuals, dout):
    q_nope, q_pe, k_nope, k_pe, v, positions, out, lse = residuals
    B, N, T, _ = q_nope.shape
    shape = lambda *dims: jax.ShapeDtypeStruct(dims, jnp.float32)
    call = jax.ffi.ffi_call("dsv3_causal_attention_bwd",
                            (shape(*q_nope.shape), shape(*q_pe.shape), shape(*k_nope.shape),
                             shape(B, N, T, k_pe.shape[2]), shape(*v.shape)),
                            vmap_method="sequential")
    dq_nope, dq_pe, dk_nope, dk_pe_heads, dv = call(
        q_nope, q_pe, k_nope, k_pe, v, positions, out, lse, dout.astype(jnp.float32),
        scale=np.float32(scale))
    return dq_nope, dq_pe, dk_nope, dk_pe_heads.sum(1), dv, None


_attend.defvjp(_attend_fwd, _attend_bwd)
