"""Weight projections of a few rows on XLA:CPU as one FFI call: a decode step's matmuls.

Dimension key: M rows (tokens), K contraction, N columns. With a handful of rows, a
projection `y [M, N] = x [M, K] · w [K, N]` is a stream through the weight, which XLA:CPU's
own dot runs slower than a BLAS `sgemm` does (figures at `MAX_ROWS`). `matmul` runs it as one
call of `kernels/skinny_matmul.cc`: w's columns split into blocks over XLA's intra-op pool,
each block one single-threaded sgemm (MKL's or OpenBLAS's, `cpu_kernels`). `layers.project`
takes this path for float32 projections of at most `MAX_ROWS` rows on one CPU device
(`pays`), XLA's dot otherwise.

Inference only: its derivatives (`jax.custom_jvp`) are those of XLA's dot, which then also
computes the value, so training is unchanged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax import cpu_kernels
from dsv3_jax.rms_norm import rms_norm

# Most rows for which the kernel runs (decode batches, speculative verification): measured
# ahead of XLA's dot on 2 cores up to 128 rows (K × N of 256 × 768, 768 × 256, 256 × 512,
# 128 × 2048: 1.1-1.7x from 8 rows, 0.7-1.6x at one row). XLA:CPU's own dot read the weights
# of an 8-row product at half to a third of a one-row one's speed (the bench config: o_proj
# 19.7 against 9.6 µs; the dense SwiGLU's 2.4 MB, 254 µs of a 3.7 ms batch-8 step). The bench
# decode, mean of 16 steps after a prefill, 2 cores: batch 8 4.0-4.4 against 4.6-5.3 ms,
# batch 1 1.45-1.59 against 1.59 ms (README, session 22). Larger products (prefill,
# training) keep XLA's dot, whose multi-threaded blocking was not compared here.
MAX_ROWS = 64


def pays(x: jax.Array | jax.ShapeDtypeStruct, w: jax.Array | jax.ShapeDtypeStruct) -> bool:
    """Whether `matmul(x, w)` runs the kernel here: x [M, K] and w [K, N] float32 with
    1 ≤ M ≤ MAX_ROWS, traced for one CPU device with the kernels built (arrays or their
    shapes)."""
    return (x.ndim == 2 and w.ndim == 2 and x.shape[1] == w.shape[0]
            and 1 <= x.shape[0] <= MAX_ROWS and min(w.shape) >= 1
            and cpu_kernels.runs_here(x.dtype, w.dtype))


def matmul(x: jax.Array, w: jax.Array, norm: jax.Array | None = None,
           eps: float = 0.0) -> jax.Array:
    """x [M, K] · w [K, N] → [M, N] float32 through the kernel (check `pays` first). With
    `norm` [K], x's rows are normalized first, `rms_norm(x, norm, eps)` (the RMSNorm before a
    projection, inside the call)."""
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"skinny_matmul.matmul: x {x.shape}, w {w.shape}: expected x [M, K] "
                         "and w [K, N]")
    if norm is not None and norm.shape != (x.shape[1],):
        raise ValueError(f"skinny_matmul.matmul: norm {norm.shape} for x {x.shape}: expected "
                         "one weight per column of x")
    if x.dtype != jnp.float32 or w.dtype != jnp.float32:
        raise ValueError(f"skinny_matmul.matmul: x {x.dtype}, w {w.dtype}: the CPU kernel "
                         "multiplies float32 only")
    if not cpu_kernels.available():
        raise RuntimeError("the CPU kernels are unavailable (see the warning logged by "
                           "dsv3_jax.cpu_kernels): use jnp.dot")
    norm = jnp.zeros((0,), jnp.float32) if norm is None else norm.astype(jnp.float32)
    return _matmul(x, w, norm, float(eps))


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _matmul(x, w, norm, eps):
    call = jax.ffi.ffi_call("dsv3_skinny_matmul",
                            jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.float32),
                            vmap_method="sequential")
    return call(x, w, norm, eps=np.float32(eps))


def _formula(x, w, norm, eps):
    if norm.shape[0]:
        x = rms_norm(x, norm, eps, jnp.float32)
    return jnp.dot(x, w, preferred_element_type=jnp.float32)


@_matmul.defjvp
def _matmul_jvp(eps, primals, tangents):
    return jax.jvp(lambda x, w, norm: _formula(x, w, norm, eps), primals, tangents)
