"""Grouped GEMMs on XLA:CPU: `jax.lax.ragged_dot` over rows sorted by group, as one FFI call.

XLA:CPU lowers `ragged_dot` to every group's product on every row (E times the work), and a
loop of per-group products copies each group's kernel slice before its dot. This module runs
the grouped GEMM as an XLA FFI handler (`kernels/ragged_gemm.cc`) that calls OpenBLAS's
`sgemm` once per non-empty group on that group's rows and its kernel read in place: no
padding, no kernel copies, one thunk. Dimension key: M rows sorted by group, G groups,
K contraction, N output width, L layers of a stack.

    ragged_matmul(x [M, K], w [G, K, N], sizes [G]) -> [M, N]     row i of group g: x_i · w_g

Rows past sum(sizes) come out zero (as `ragged_dot`'s). The backward pass is two more calls
of the kernel: dx = dy · w_gᵀ per group, dw_g = x_gᵀ · dy_g (zero for an empty group). With
`stack` ([L, G, K, N]) and `layer`, the kernels are read as layer `layer` of the stack in
place and `w` (that layer's slice) only receives the gradient: a layer of an unrolled stack
then reads no copy of its slice.

float32 only (OpenBLAS `sgemm`), on one CPU device. The kernel is compiled on first use with
the system's C++ compiler against jaxlib's FFI headers and the `scipy-openblas32` wheel
(~3 s), cached under `$DSV3_JAX_KERNEL_CACHE` (default `~/.cache/dsv3_jax`); without a compiler
or the wheel, `available()` is False (logged once) and callers keep `ragged_dot`.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import subprocess
import sysconfig
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.backends import platform

_SOURCE = Path(__file__).parent / "kernels" / "ragged_gemm.cc"
_TARGETS = {"rows": "Dsv3RaggedRowsTimesKernels", "grads": "Dsv3RaggedKernelGradients"}
_log = logging.getLogger(__name__)


def _openblas():
    import scipy_openblas32  # the `scipy-openblas32` wheel: header, library, its directory
    return (scipy_openblas32.get_include_dir(), scipy_openblas32.get_lib_dir(),
            scipy_openblas32.get_library())


def _build() -> Path:
    """The compiled kernel library, built once per (source, jaxlib, OpenBLAS, Python ABI)."""
    include, libdir, library = _openblas()
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([
        source, jax.__version__.encode(), jax.ffi.include_dir().encode(), libdir.encode(),
        str(sysconfig.get_config_var("SOABI")).encode()])).hexdigest()[:16]
    cache = Path(os.environ.get("DSV3_JAX_KERNEL_CACHE",
                                Path.home() / ".cache" / "dsv3_jax"))
    target = cache / f"ragged_gemm-{key}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    compiler = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:  # built aside, then moved: atomic
        out = Path(tmp) / target.name
        command = [compiler, "-O3", "-std=c++17", "-shared", "-fPIC", "-w",
                   f"-I{jax.ffi.include_dir()}", f"-I{include}", str(_SOURCE), "-o", str(out),
                   f"-L{libdir}", f"-l{library}", f"-Wl,-rpath,{libdir}"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
        os.replace(out, target)
    return target


@functools.cache
def available() -> bool:
    """Whether the kernel is built and registered with XLA:CPU (built on the first call)."""
    try:
        import ctypes
        library = ctypes.cdll.LoadLibrary(str(_build()))
        for name, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(f"dsv3_ragged_{name}",
                                        jax.ffi.pycapsule(getattr(library, symbol)),
                                        platform="cpu")
        return True
    except Exception as e:  # no compiler, no OpenBLAS wheel, a failed build: ragged_dot
        _log.warning("the CPU grouped-GEMM kernel is unavailable (%s: %s); grouped GEMMs "
                     "run as jax.lax.ragged_dot", type(e).__name__, str(e).splitlines()[0])
        return False


def runs_here(dtype) -> bool:
    """Whether `ragged_matmul` runs products of `dtype` where code is being traced: float32,
    for one CPU device (no multi-device mesh, not inside shard_map: an FFI call has no
    partitioning rule), the kernel available."""
    mesh = jax.sharding.get_abstract_mesh()
    return (jnp.dtype(dtype) == jnp.float32 and platform() == "cpu"
            and (mesh.empty or mesh.size == 1) and not mesh.manual_axes and available())


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
    kernels are read as its layer `layer` (w: that slice, for the gradient). Check `runs_here`
    first."""
    if not available():
        raise RuntimeError("the CPU grouped-GEMM kernel is unavailable (see the warning "
                           "logged by dsv3_jax.grouped_gemm): use jax.lax.ragged_dot")
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
