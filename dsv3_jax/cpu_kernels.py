"""The project's CPU kernels (`kernels/*.cc`): XLA FFI handlers built on first use, registered
with XLA:CPU.

The handlers call a single-threaded BLAS `sgemm` (`kernels/blas.h`), or, with OpenBLAS, for
products of one or two rows their own streamed loops (`kernels/stream_product.h`: no packing of
the weight), and split their work over XLA's own intra-op thread pool (`kernels/parallel.h`). A
pool task that helped with a short job lingers for the next one, up to
`DSV3_JAX_KERNEL_LINGER_US` microseconds (default 1000; 0 never lingers; another value fails the
import), no more at once than one call's helpers (a call splits over XLA's pool's threads, at
most the usable cores: `threads()`): a decode step's kernel calls, and its next step's, come
closer together than a parked pool thread takes to wake. The BLAS is Intel MKL's sequential one
where the `mkl` wheel is installed (the `[mkl]` extra) and the CPU is Intel's, else OpenBLAS
(the `scipy-openblas32` wheel, linked): MKL was 10-25% faster than OpenBLAS on the kernels'
skinny products on an AVX-512 Xeon, but 1.4-1.5x slower at decode steps (1.1x at the train step)
on an AMD EPYC (Zen 4), where its Intel-tuned code paths do not run.
`DSV3_JAX_BLAS=auto|mkl|openblas` chooses (another value fails the import), `blas()` says which
is in use.

All sources compile into one library (~5 s with the system's C++ compiler, `$CXX` or `c++`,
against jaxlib's FFI headers), cached under `$DSV3_JAX_KERNEL_CACHE` (default
`~/.cache/dsv3_jax`) by a hash of the sources and the versions they build against. Without a
compiler or the OpenBLAS wheel `available()` is False (one warning) and every caller keeps its
pure-JAX path. Users:
  * `dsv3_jax.grouped_gemm`: the routed experts' grouped GEMMs (`ragged_dot`) and their SwiGLU,
    training too;
  * `dsv3_jax.latent_attention`: absorbed MLA decode attention over the latent cache;
  * `dsv3_jax.fused_attention`: causal attention for training and prefill, with its gradient;
  * `dsv3_jax.skinny_matmul`: weight projections of a few rows (decode steps);
  * `dsv3_jax.few_token_moe`: a decode step's whole MoE layer;
  * `dsv3_jax.mla_decode`: a decode step's whole attention layer (absorbed MLA).
Built for the machine that builds them (`-march=native`): the CPU's feature flags are part of
the cache key.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import logging
import os
import platform as platform_module
import subprocess
import sysconfig
import tempfile
from pathlib import Path

import jax

from dsv3_jax.backends import platform

_KERNELS = Path(__file__).parent / "kernels"
# FFI target name → handler symbol
HANDLERS = {
    "dsv3_ragged_rows": "Dsv3RaggedRowsTimesKernels",
    "dsv3_ragged_grads": "Dsv3RaggedKernelGradients",
    "dsv3_swiglu_hidden": "Dsv3SwigluHidden",
    "dsv3_swiglu_hidden_grads": "Dsv3SwigluHiddenGrads",
    "dsv3_latent_attention": "Dsv3LatentAttention",
    "dsv3_causal_attention_fwd": "Dsv3CausalAttentionForward",
    "dsv3_causal_attention_bwd": "Dsv3CausalAttentionBackward",
    "dsv3_skinny_matmul": "Dsv3SkinnyMatmul",
    "dsv3_few_token_moe": "Dsv3FewTokenMoe",
    "dsv3_mla_decode": "Dsv3MlaDecode",
}
BLAS_CHOICES = ("auto", "mkl", "openblas")
LINGER_ENV, DEFAULT_LINGER_US = "DSV3_JAX_KERNEL_LINGER_US", 1000
_MKL_THREADING_SEQUENTIAL, _MKL_INTERFACE_LP64 = 1, 0
_log = logging.getLogger(__name__)
_blas_in_use: str | None = None
_library: ctypes.CDLL | None = None


def _openblas():
    import scipy_openblas32  # the `scipy-openblas32` wheel: header, library, its directory
    return (scipy_openblas32.get_include_dir(), scipy_openblas32.get_lib_dir(),
            scipy_openblas32.get_library())


def _cpuinfo_field(*names: str, info: str | None = None) -> str | None:
    """The value of the first line of `info` (default: /proc/cpuinfo) named one of `names`
    (None: not Linux, or no such line)."""
    try:
        info = Path("/proc/cpuinfo").read_text() if info is None else info
    except OSError:
        return None
    for line in info.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in names:
            return value.strip()
    return None


def intel_cpu() -> bool:
    """Whether this is an Intel CPU (/proc/cpuinfo's vendor_id GenuineIntel): `auto` chooses
    MKL only there."""
    return _cpuinfo_field("vendor_id") == "GenuineIntel"


def _cpu_flags() -> bytes:
    """The instruction sets `-march=native` builds for (Linux: /proc/cpuinfo's flags)."""
    return (_cpuinfo_field("flags", "Features") or platform_module.machine()).encode()


def _build() -> Path:
    """The compiled library, built once per (sources, jaxlib, OpenBLAS, Python ABI)."""
    include, libdir, library = _openblas()
    sources = sorted(_KERNELS.glob("*.cc"))
    parts = [p.read_bytes() for p in sorted(_KERNELS.glob("*.[ch]*"))]
    key = hashlib.sha256(b"\0".join([
        *parts, jax.__version__.encode(), jax.ffi.include_dir().encode(), libdir.encode(),
        str(sysconfig.get_config_var("SOABI")).encode(), _cpu_flags()])).hexdigest()[:16]
    cache = Path(os.environ.get("DSV3_JAX_KERNEL_CACHE",
                                Path.home() / ".cache" / "dsv3_jax"))
    target = cache / f"kernels-{key}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    compiler = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:  # built aside, then moved: atomic
        out = Path(tmp) / target.name
        command = [compiler, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w",
                   f"-I{jax.ffi.include_dir()}", f"-I{include}", f"-I{_KERNELS}",
                   *map(str, sources), "-o", str(out),
                   f"-L{libdir}", f"-l{library}", f"-Wl,-rpath,{libdir}"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
        os.replace(out, target)
    return target


def _blas_choice() -> str:
    choice = os.environ.get("DSV3_JAX_BLAS", "auto").strip().lower() or "auto"
    if choice not in BLAS_CHOICES:
        raise ValueError(f"DSV3_JAX_BLAS={os.environ['DSV3_JAX_BLAS']!r}: expected one of "
                         f"{', '.join(BLAS_CHOICES)}")
    return choice


def _linger_us() -> int:
    text = os.environ.get(LINGER_ENV, "").strip()
    if not text:
        return DEFAULT_LINGER_US
    if not text.isdecimal() or int(text) > 1_000_000:
        raise ValueError(f"{LINGER_ENV}={os.environ[LINGER_ENV]!r}: expected whole microseconds "
                         "from 0 (never linger) to 1000000")
    return int(text)


_blas_choice()  # a bad DSV3_JAX_BLAS fails the import, before anything is traced
_linger_us()  # and so does a bad DSV3_JAX_KERNEL_LINGER_US


def mkl_runtime() -> Path | None:
    """The `mkl` wheel's `libmkl_rt` (None: the wheel is not installed)."""
    try:
        files = importlib.metadata.files("mkl") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    runtime = next((f for f in files if f.name.startswith("libmkl_rt.so")), None)
    return None if runtime is None else Path(runtime.locate()).resolve()


def _mkl_sgemm() -> int | None:
    """The address of MKL's `cblas_sgemm` with MKL's sequential threading layer and 32-bit
    sizes, from `mkl_runtime()`; None where the wheel is not installed, does not load, or MKL
    was already set up otherwise in this process (another library's threaded layer; both
    logged)."""
    runtime = mkl_runtime()
    if runtime is None:
        return None
    try:
        mkl = ctypes.CDLL(str(runtime))
        layer = mkl.MKL_Set_Threading_Layer(_MKL_THREADING_SEQUENTIAL)
        interface = mkl.MKL_Set_Interface_Layer(_MKL_INTERFACE_LP64)
        sgemm = ctypes.cast(mkl.cblas_sgemm, ctypes.c_void_p).value
    except (OSError, AttributeError) as e:  # a broken install: a library or symbol missing
        _log.warning("MKL's runtime did not load (%s: %s): the kernels call OpenBLAS",
                     type(e).__name__, str(e).splitlines()[0])
        return None
    if layer != _MKL_THREADING_SEQUENTIAL or interface != _MKL_INTERFACE_LP64:
        _log.warning("MKL is set up in this process with threading layer %d, interface %d "
                     "(the kernels need sequential, LP64): they call OpenBLAS", layer, interface)
        return None
    return sgemm


def _use_blas(library, choice: str) -> str:
    """Installs the chosen BLAS's sgemm in the loaded kernels; returns its name."""
    wants_mkl = choice == "mkl" or (choice == "auto" and intel_cpu())
    sgemm = _mkl_sgemm() if wants_mkl else None
    if sgemm is None and choice == "mkl":
        raise RuntimeError("DSV3_JAX_BLAS=mkl, but MKL is unavailable here (the `mkl` wheel: "
                           "pip install -e \".[mkl]\"): unset it or choose openblas")
    library.Dsv3UseSgemm(ctypes.c_void_p(sgemm))  # None: OpenBLAS's
    return "openblas" if sgemm is None else "mkl"


def blas() -> str | None:
    """"mkl" or "openblas": the BLAS the kernels call (None: the kernels are unavailable)."""
    return _blas_in_use if available() else None


def jobs_handed_over() -> int:
    """How many kernel jobs this process offered to pool tasks it found lingering (one may
    time out just before taking its job: the calling thread then runs it all); 0 where the
    kernels are unavailable."""
    return int(_library.Dsv3JobsHandedOver()) if available() else 0


def most_lingering() -> int:
    """The most pool tasks that lingered at once in this process so far: never more than
    `threads()` but one (`kernels/parallel.h`); 0 where the kernels are unavailable."""
    return int(_library.Dsv3MostLingering()) if available() else 0


def threads() -> int:
    """How many threads the last kernel call split its work over: XLA's intra-op pool's, at
    most the cores this process may use (XLA sizes the pool by emulated devices where there
    are more of them than cores); 0 before any call."""
    return int(_library.Dsv3Threads()) if available() else 0


@functools.cache
def available() -> bool:
    """Whether the kernels are built and registered with XLA:CPU (built on the first call).
    Raises on an invalid `DSV3_JAX_BLAS` or `DSV3_JAX_KERNEL_LINGER_US`, or on `mkl` chosen
    where MKL is not installed."""
    global _blas_in_use, _library
    choice, linger = _blas_choice(), _linger_us()
    try:
        library = ctypes.cdll.LoadLibrary(str(_build()))
    except Exception as e:  # no compiler, no OpenBLAS wheel, a failed build
        _log.warning("the CPU kernels are unavailable (%s: %s); the pure-JAX paths run instead",
                     type(e).__name__, str(e).splitlines()[0])
        return False
    _blas_in_use = _use_blas(library, choice)
    library.Dsv3SetLingerMicroseconds(ctypes.c_int64(linger))
    library.Dsv3JobsHandedOver.restype = ctypes.c_uint64
    _library = library
    for target, symbol in HANDLERS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                    platform="cpu")
    return True


def runs_here(*dtypes) -> bool:
    """Whether the kernels run where code is being traced, on operands of `dtypes`: all
    float32, for one CPU device (no multi-device mesh, not inside shard_map: an FFI call has
    no partitioning rule), the kernels available."""
    mesh = jax.sharding.get_abstract_mesh()
    return (all(jax.numpy.dtype(d) == jax.numpy.float32 for d in dtypes)
            and platform() == "cpu" and (mesh.empty or mesh.size == 1)
            and not mesh.manual_axes and available())
