"""Grouped GEMMs on XLA:CPU: `jax.lax.ragged_dot` over rows sorted by group, as one FFI call.

XLA:CPU lowers `ragged_dot` to every group's product on every row (E times the work), and a
loop of per-group products copies each group's kernel slice before its dot. This module runs
the grouped GEMM as an XLA FFI handler (`kernels/ragged_gemm.cc`) that calls a BLAS `sgemm`
(MKL's or OpenBLAS's: `cpu_kernels`) once per non-empty group on that group's rows and its
kernel read in place: no padding, no kernel copies, one thunk. Dimension key: M rows sorted by
group, G groups, K contraction, N output width, L layers of a stack.

    ragged_matmul(x [M, K], w [G, K, N], sizes [G]) -> [M, N]     row i of group g: x_i · w_g
    swiglu_hidden(x [M, D], gate, up [G, D, F], sizes, scale [M]) -> [M, F]
        silu(x_i · gate_g) ⊙ (x_i · up_g) · scale_i: both GEMMs and the activation per piece of
        rows while it is in cache (XLA:CPU ran the activation as single-threaded passes)

Rows past sum(sizes) come out zero (as `ragged_dot`'s). The backward pass is two more calls
of the kernel: dx = dy · w_gᵀ per group, dw_g = x_gᵀ · dy_g (zero for an empty group). With
`stack` ([L, G, K, N]) and `layer`, the kernels are read as layer `layer` of the stack in
place and `w` (that layer's slice) only receives the gradient: a layer of an unrolled stack
then reads no copy of its slice.

The SwiGLU's backward is one call as well (the activation's gradient per piece of rows, then
dx = dg · gateᵀ + du · upᵀ, and per group the two kernel gradients). float32 only (BLAS
`sgemm`), on one CPU device; the work is split into ~256-row pieces over
XLA's intra-op pool. Built on first use with the other CPU kernels (`cpu_kernels`); where they
are unavailable, callers keep `ragged_dot`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax import cpu_kernels


def _rows(x, w, sizes, layer, transpose: bool):
    width = w.shape[-2] if transpose else w.shape[-1]
    call = jax.ffi.ffi_call("dsv3_ragged_rows", jax.ShapeDtypeStruct((x.shape[0], width),
                                                                      jnp.float32),
                            vmap_method="sequential")
    return call(x, w, sizes, layer, transpose=np.int64(transpose))


def _grads(a, b, sizes):
    G = sizes.shape[0]
    call = jax.ffi.ffi_call("dsv3_ragged_grads",
                            jax.ShapeDtypeStruct((G, a.shape[1], b.shape[1]), jnp.float32),
                            vmap_method="sequential")
    return call(a, b, sizes)


@jax.custom_vjp
def _ragged_matmul(x, w, sizes, stack, layer):
    return _rows(x, w if stack is None else stack, sizes, layer, transpose=False)


def _fwd(x, w, sizes, stack, layer):
    # with a stack, w is only the gradient's destination: not kept
    kept = w if stack is None else None
    return _ragged_matmul(x, w, sizes, stack, layer), (x, kept, sizes, stack, layer)


def _bwd(residuals, dy):
    x, w, sizes, stack, layer = residuals
    dy = dy.astype(jnp.float32)
    dx = _rows(dy, w if stack is None else stack, sizes, layer, transpose=True)
    dw = _grads(x, dy, sizes)
    zero = lambda a: np.zeros(np.shape(a), jax.dtypes.float0)
    return dx, dw, zero(sizes), None, zero(layer)


_ragged_matmul.defvjp(_fwd, _bwd)


def ragged_matmul(x: jax.Array, w: jax.Array, sizes: jax.Array, *,
                  stack: jax.Array | None = None, layer: jax.Array | int = 0) -> jax.Array:
    """Rows x [M, K] sorted by group through their groups' kernels w [G, K, N]: [M, N] float32
    (the module docstring); `sizes` [G] int32 rows per group. With `stack` [L, G, K, N], the
    kernels are read as its layer `layer` (w: that slice, for the gradient). Check
    `cpu_kernels.runs_here` first."""
    if not cpu_kernels.available():
        raise RuntimeError("the CPU kernels are unavailable (see the warning logged by "
                           "dsv3_jax.cpu_kernels): use jax.lax.ragged_dot")
    kernels = w if stack is None else stack
    if x.ndim != 2 or w.ndim != 3 or x.shape[1] != w.shape[1] or sizes.shape != w.shape[:1] or (
            stack is not None and stack.shape[1:] != w.shape):
        raise ValueError(f"ragged_matmul: x {x.shape}, w {w.shape}, sizes {sizes.shape}, stack "
                         f"{None if stack is None else stack.shape}: expected x [M, K], "
                         "w [G, K, N], sizes [G], stack [L, G, K, N]")
    if any(a.dtype != jnp.float32 for a in (x, kernels)):
        raise ValueError(f"ragged_matmul: x {x.dtype}, kernels {kernels.dtype}: the CPU kernel "
                         "multiplies float32 only")
    if stack is not None:
        stack = jax.lax.stop_gradient(stack)
    return _ragged_matmul(x, w, sizes.astype(jnp.int32), stack,
                          jnp.asarray(layer, jnp.int32).reshape(1))


def _hidden(x, gate, up, sizes, layer, scale):
    M, F = x.shape[0], gate.shape[-1]
    out = jax.ShapeDtypeStruct((M, F), jnp.float32)
    call = jax.ffi.ffi_call("dsv3_swiglu_hidden", (out, out, out), vmap_method="sequential")
    return call(x, gate, up, sizes, layer, scale)


@jax.custom_vjp
def _swiglu_hidden(x, gate, up, sizes, scale, stacks, layer):
    kernels = (gate, up) if stacks is None else stacks
    return _hidden(x, *kernels, sizes, layer, scale)[0]


def _swiglu_fwd(x, gate, up, sizes, scale, stacks, layer):
    kernels = (gate, up) if stacks is None else stacks
    h, g, u = _hidden(x, *kernels, sizes, layer, scale)
    return h, (x, g, u, scale, kernels, sizes, layer)


def _swiglu_bwd(residuals, dh):
    x, g, u, scale, kernels, sizes, layer = residuals
    (M, D), (G, F) = x.shape, (sizes.shape[0], g.shape[1])
    shape = lambda *dims: jax.ShapeDtypeStruct(dims, jnp.float32)
    call = jax.ffi.ffi_call("dsv3_swiglu_hidden_grads",
                            (shape(M, D), shape(G, D, F), shape(G, D, F), shape(M)),
                            vmap_method="sequential")
    dx, dgate, dup, dscale = call(x, g, u, scale, dh.astype(jnp.float32), *kernels, sizes,
                                  layer)
    zero = lambda a: np.zeros(np.shape(a), jax.dtypes.float0)
    return dx, dgate, dup, zero(sizes), dscale, None, zero(layer)


_swiglu_hidden.defvjp(_swiglu_fwd, _swiglu_bwd)


def swiglu_hidden(x: jax.Array, gate: jax.Array, up: jax.Array, sizes: jax.Array,
                  scale: jax.Array | None = None, *,
                  stacks: tuple[jax.Array, jax.Array] | None = None,
                  layer: jax.Array | int = 0) -> jax.Array:
    """SwiGLU hidden units [M, F] float32 of rows x [M, D] sorted by group (the module
    docstring): silu(x · gate_g) ⊙ (x · up_g), times scale [M] per row (None: 1), with its
    gradient in x, gate, up and scale. With `stacks` (gate, up as [L, G, D, F] stacks) the
    kernels are read as their layer `layer` (gate, up: that slice, for the gradient). Check
    `cpu_kernels.runs_here` first."""
    if not cpu_kernels.available():
        raise RuntimeError("the CPU kernels are unavailable (see the warning logged by "
                           "dsv3_jax.cpu_kernels): use jax.lax.ragged_dot")
    M = x.shape[0]
    scale = jnp.ones((M,), jnp.float32) if scale is None else scale
    if (x.ndim != 2 or gate.ndim != 3 or up.shape != gate.shape or x.shape[1] != gate.shape[1]
            or sizes.shape != gate.shape[:1] or scale.shape != (M,) or 0 in gate.shape[1:]
            or (stacks is not None and any(s.shape[1:] != gate.shape for s in stacks))):
        raise ValueError(f"swiglu_hidden: x {x.shape}, gate {gate.shape}, up {up.shape}, sizes "
                         f"{sizes.shape}, scale {scale.shape}, stacks "
                         f"{None if stacks is None else [s.shape for s in stacks]}: expected "
                         "x [M, D], gate and up [G, D, F] (D, F ≥ 1), sizes [G], scale [M], "
                         "stacks [L, G, D, F]")
    kernels = (gate, up) if stacks is None else stacks
    if any(a.dtype != jnp.float32 for a in (x, *kernels)):
        raise ValueError(f"swiglu_hidden: x {x.dtype}, kernels {kernels[0].dtype}: the CPU "
                         "kernel multiplies float32 only")
    if stacks is not None:
        stacks = tuple(jax.lax.stop_gradient(s) for s in stacks)
    return _swiglu_hidden(x, gate, up, sizes.astype(jnp.int32), scale.astype(jnp.float32),
                          stacks, jnp.asarray(layer, jnp.int32).reshape(1))
