"""Absorbed MLA decode attention over the latent cache as one CPU kernel call.

Dimension key: B sequences, S cache slots (slot s holds position s), C latent (kv_lora_rank),
R rope key, N heads, T new queries. With the up-projections absorbed (`dsv3_jax/mla.py`), each
query attends over the cache itself:

    scores = (q_latent · c_kvᵀ + q_pe · k_peᵀ) · scale       [B, N, T, S]
    out    = softmax(scores masked to s ≤ position) · c_kv    [B, N, T, C]

On XLA:CPU these are skinny batched products (`[S, C] × [C, N·T]` per sequence) that stream the
cache at a fraction of the memory bandwidth, with the mask, max, exp and sums as separate
passes. `attend` runs them as one FFI call (`kernels/latent_attention.cc`): per sequence the
scores by register-tiled loops over the slots its queries reach, the masked softmax in place
in vector lanes, one product with the cache, the division by the sums; with fewer sequences
than threads, a long cache's slots are split over the threads and the pieces' partial
softmaxes combined (FlashDecoding), a short one's queries. Inference only: its gradient
(`jax.custom_jvp`) is that of the pure-JAX formula, which also runs wherever the kernel does
not (`cpu_kernels.runs_here`: float32 on one CPU device).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax import cpu_kernels


def reference(c_kv, k_pe, q_latent, q_pe, positions, scale: float) -> jax.Array:
    """The formula in the module docstring, in float32 (what the kernel computes)."""
    f32 = lambda a: a.astype(jnp.float32)
    if c_kv.ndim == 2:  # one sequence's cache, stored without its batch axis
        c_kv, k_pe = c_kv[None], k_pe[None]
    scores = (jnp.einsum("BNTC,BSC->BNTS", f32(q_latent), f32(c_kv))
              + jnp.einsum("BNTR,BSR->BNTS", f32(q_pe), f32(k_pe))) * scale
    S = c_kv.shape[1]
    mask = jnp.arange(S)[None, None, None, :] <= positions[:, None, :, None]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    # a query that sees no slot (a position < 0) averages them all, as `mla._masked_attend`
    weights = jnp.exp(scores - jax.lax.stop_gradient(scores.max(-1, keepdims=True)))
    out = jnp.einsum("BNTS,BSC->BNTC", weights, f32(c_kv))
    return out / weights.sum(-1, keepdims=True)


def attend(c_kv: jax.Array, k_pe: jax.Array, q_latent: jax.Array, q_pe: jax.Array,
           positions: jax.Array, scale: float) -> jax.Array:
    """[B, N, T, C] float32: each query's attention over the cache slots at or before its
    position (module docstring). c_kv [B, S, C], k_pe [B, S, R], q_latent [B, N, T, C],
    q_pe [B, N, T, R], positions [B, T] int; a one-sequence cache may come without its batch
    axis (c_kv [S, C], k_pe [S, R]: `mla.LatentCache.squeeze`, read where it is stored). Check
    `cpu_kernels.runs_here` first."""
    B = c_kv.shape[0] if c_kv.ndim == 3 else 1
    if (c_kv.ndim not in (2, 3) or k_pe.shape[:-1] != c_kv.shape[:-1]
            or q_latent.ndim != 4 or q_latent.shape[0] != B or q_latent.shape[3] != c_kv.shape[-1]
            or q_pe.shape != q_latent.shape[:3] + k_pe.shape[-1:]
            or positions.shape != (B, q_latent.shape[2])):
        raise ValueError(f"latent_attention.attend: c_kv {c_kv.shape}, k_pe {k_pe.shape}, "
                         f"q_latent {q_latent.shape}, q_pe {q_pe.shape}, positions "
                         f"{positions.shape}: expected [B, S, C], [B, S, R], [B, N, T, C], "
                         "[B, N, T, R], [B, T] (or a one-sequence cache [S, C], [S, R])")
    if 0 in (c_kv.shape[-2], c_kv.shape[-1], k_pe.shape[-1]):
        raise ValueError(f"latent_attention.attend: c_kv {c_kv.shape}, k_pe {k_pe.shape}: the "
                         "cache's slots S and dims C, R must be positive")
    if q_latent.size == 0:  # no queries: nothing to attend
        return jnp.zeros(q_latent.shape, jnp.float32)
    if not cpu_kernels.available():
        raise RuntimeError("the CPU kernels are unavailable (see the warning logged by "
                           "dsv3_jax.cpu_kernels): use latent_attention.reference")
    return _attend_kernel(c_kv, k_pe, q_latent, q_pe, positions.astype(jnp.int32),
                          float(scale))


@functools.partial(jax.custom_jvp, nondiff_argnums=(5,))
def _attend_kernel(c_kv, k_pe, q_latent, q_pe, positions, scale):
    call = jax.ffi.ffi_call("dsv3_latent_attention",
                            jax.ShapeDtypeStruct(q_latent.shape, jnp.float32),
                            vmap_method="sequential")
    f32 = lambda a: a.astype(jnp.float32)
    return call(f32(c_kv), f32(k_pe), f32(q_latent), f32(q_pe), positions,
                scale=np.float32(scale))


@_attend_kernel.defjvp
def _attend_jvp(scale, primals, tangents):
    *arrays, positions = primals
    f = lambda c, k, q, p: reference(c, k, q, p, positions, scale)
    return jax.jvp(f, tuple(arrays), tuple(tangents[:4]))
