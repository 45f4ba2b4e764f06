"""Which routed-expert computation runs, and the ragged one: sorted rows through grouped GEMMs.

`ModelConfig.moe_impl` names the computation (dimension key as in `dsv3_jax/moe.py`; M rows
sorted by expert, M = N·K here):
  * "blocks": dropless; assignments sorted by expert into padded blocks, each block a plain
    matmul on its expert's kernels (`block_matmul`, via `moe.grouped_swiglu`). Fast on XLA:CPU.
  * "ragged": dropless; assignments sorted by expert, then `jax.lax.ragged_dot` with the
    per-expert group sizes for each SwiGLU GEMM (`ragged_swiglu`): megablox on TPU, a grouped
    GEMM on GPU, no padding. On XLA:CPU it costs as much as every expert densely.
  * "capacity": `capacity_factor`·N·K/E slots per expert, overflow dropped.
  * "auto": "capacity" when `capacity_factor` is set (the older spelling of capacity mode),
    else "ragged" on TPU and GPU and "blocks" on CPU and under an FP8 recipe (ragged_dot has
    none). The platform is that of the mesh being traced under (`jax.set_mesh`, e.g. a
    described TPU slice for an AOT compile), else JAX's default backend. Each resolution is
    logged once.

The ragged path calls `jax.lax.ragged_dot` directly, not `layers.project`: its operands and
outputs are in the compute dtype (the kernels accumulate in fp32), and no precision recipe
applies (config validation refuses moe_impl="ragged" with an FP8 recipe).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.layers import Weight, dtype_of

_ACCELERATORS = ("tpu", "gpu", "cuda", "rocm")
_logged: set[tuple[str, str]] = set()


def platform() -> str:
    """The platform code is traced for: the current mesh's devices, else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def resolve_moe_impl(config: ModelConfig) -> str:
    """"blocks", "ragged" or "capacity": `config.moe_impl` with "auto" resolved (see the module
    docstring); an automatic choice is logged once per (platform, choice)."""
    if config.moe_impl != "auto":
        return config.moe_impl
    where = platform()
    if config.capacity_factor is not None:
        choice = "capacity"
    elif where in _ACCELERATORS and config.fp8 == "none":
        choice = "ragged"
    else:
        choice = "blocks"
    if (where, choice) not in _logged:
        _logged.add((where, choice))
        logging.getLogger(__name__).info("moe_impl='auto' runs the routed experts as %r on %s",
                                         choice, where)
    return choice


def sort_by_expert(experts: jax.Array, num_experts: int,
                   valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Assignments in expert order.

    Args:
      experts: [M] expert id of each assignment.
      valid: [M] False for assignments to leave out (sorted last, counted nowhere).
    Returns:
      (order [M]: the assignment in each sorted position, group_sizes [E] int32).
    """
    key = experts if valid is None else jnp.where(valid, experts, num_experts)
    order = jnp.argsort(key, stable=True)
    sizes = jnp.zeros(num_experts, jnp.int32).at[key].add(1, mode="drop")
    return order.astype(jnp.int32), sizes


def ragged_swiglu(rows: jax.Array, group_sizes: jax.Array, weights: tuple[Weight, ...],
                  config: ModelConfig) -> jax.Array:
    """Rows sorted by expert through their experts' SwiGLU, as grouped GEMMs.

    Args:
      rows: [M, D]; the first group_sizes[0] rows go to expert 0, the next to expert 1, ...;
        rows past sum(group_sizes) come out zero.
      group_sizes: [E] int32.
      weights: (gate [E, D, F], up [E, D, F], down [E, F, D]).
    Returns:
      [M, D] in the compute dtype.
    """
    dtype = dtype_of(config.dtype)
    gate, up, down = (w.kernel.astype(dtype) for w in weights)

    def gemm(x, w):
        # Out in the compute dtype (accumulated in fp32 by the kernels): an fp32 out would give
        # the backward pass fp32 cotangents against compute-dtype operands, a mixed-type
        # ragged_dot that TPU's Mosaic kernel refuses ("Bad rhs type").
        # A narrower compute dtype multiplies at its own precision: an inherited "highest"
        # (fp32 contract precision) on bf16 operands is another refusal of the TPU kernel.
        precision = None if dtype == jnp.float32 else jax.lax.Precision.DEFAULT
        return jax.lax.ragged_dot(x.astype(dtype), w, group_sizes, precision=precision,
                                  preferred_element_type=dtype)

    return gemm(jax.nn.silu(gemm(rows, gate)) * gemm(rows, up), down)


def ragged_experts(tokens: jax.Array, experts: jax.Array, weights: tuple[Weight, ...],
                   config: ModelConfig) -> jax.Array:
    """[N, D] tokens through their K experts [N, K] by sorting and grouped GEMMs: [N, K, D]."""
    N, K = experts.shape
    order, sizes = sort_by_expert(experts.reshape(-1), config.n_routed_experts)
    y_sorted = ragged_swiglu(jnp.take(tokens, order // K, axis=0), sizes, weights, config)
    y = jnp.zeros_like(y_sorted).at[order].set(y_sorted, unique_indices=True)
    return y.reshape(N, K, -1)


def block_matmul(x: jax.Array, kernels: jax.Array, block_expert: jax.Array,
                 config: ModelConfig, out_dtype=None, used: jax.Array | None = None) -> jax.Array:
    """x [P, b, I] token blocks, block p times kernels[block_expert[p]] ([E, I, O] stacked
    kernels): [P, b, O], operands in the compute dtype, fp32 accumulation, out in `out_dtype`
    (default the compute dtype).

    One block at a time (a loop), each a plain matmul on its expert's kernel as stored: no
    [P, I, O] buffer of gathered kernels, and on XLA:CPU a sequence of plain dots runs faster
    than the batched dot over gathered kernels (measured on 2 cores, 144 blocks of 64 × 256 by
    256 × 128: 35-39 ms forward and backward against 55-58). The backward pass is the same: dx
    one block at a time, dW accumulated into each block's expert. Not for use inside shard_map:
    dW is not summed over the map's other axes (JAX refuses the mismatched type).

    `used` (int32 scalar, default P): only blocks [0, used) are computed, forward and backward;
    the rest come out 0 and get no gradient. A dropless slot buffer is sized for any routing
    (⌈N·K/b⌉ + E blocks) but a routing fills about N·K/b + E/2 of them (`moe.plan_slots`'
    `used_blocks`), so the loop stops where the filled blocks end."""
    dtype = dtype_of(config.dtype)
    used = jnp.asarray(x.shape[0] if used is None else used, jnp.int32)
    out = _block_matmul(x.astype(dtype), kernels.astype(dtype), block_expert, used)
    return out.astype(dtype if out_dtype is None else out_dtype)


def _by_block(count, a, kernels, block_expert, product):
    """[P, b, O] fp32: product(a[p], kernels[block_expert[p]]) for p < count, 0 after.

    A loop over all P blocks whose body skips the product past `count` (a `cond`), rather
    than a loop of `count` trips: the program keeps a static trip count, so XLA's cost
    analysis (the AOT report's FLOPs) still counts every block, an upper bound."""
    shape = jax.eval_shape(product, a[0], kernels[0])

    def block(p):
        return jax.lax.cond(p < count, lambda: product(a[p], kernels[block_expert[p]]),
                            lambda: jnp.zeros(shape.shape, shape.dtype))

    return jax.lax.map(block, jnp.arange(a.shape[0]))


def _dot(a, w):
    return jnp.dot(a, w, preferred_element_type=jnp.float32)


@jax.custom_vjp
def _block_matmul(x, kernels, block_expert, used):
    return _by_block(used, x, kernels, block_expert, _dot)


def _block_matmul_fwd(x, kernels, block_expert, used):
    return _block_matmul(x, kernels, block_expert, used), (x, kernels, block_expert, used)


def _block_matmul_bwd(residuals, g):
    x, kernels, block_expert, used = residuals
    g = g.astype(x.dtype)
    dx = _by_block(used, g, kernels, block_expert, lambda a, w: _dot(a, w.T))

    def add_block(p, dw):
        e = block_expert[p]
        return jax.lax.cond(p < used, lambda: dw.at[e].add(_dot(x[p].T, g[p])), lambda: dw)

    dw = jax.lax.fori_loop(0, x.shape[0], add_block, jnp.zeros(kernels.shape, jnp.float32))
    float0 = lambda a: np.zeros(np.shape(a), jax.dtypes.float0)
    return dx.astype(x.dtype), dw.astype(kernels.dtype), float0(block_expert), float0(used)


_block_matmul.defvjp(_block_matmul_fwd, _block_matmul_bwd)
