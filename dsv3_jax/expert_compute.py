"""Which routed-expert computation runs, and the ragged one: sorted rows through grouped GEMMs.

`ModelConfig.moe_impl` names the computation (dimension key as in `dsv3_jax/moe.py`; M rows
sorted by expert, M = N·K here):
  * "blocks": dropless; assignments sorted by expert into padded blocks, each block plain
    matmuls on its expert's kernels (`block_swiglu`, via `moe.slotted_experts`). XLA:CPU's
    best without the CPU kernel; the FP8 recipes' path.
  * "ragged": dropless; assignments sorted by expert (gathers both ways: `sort_rows`), then a
    grouped GEMM with the per-expert group sizes for each SwiGLU projection
    (`ragged_swiglu`), no padding: `jax.lax.ragged_dot` (megablox on TPU, a grouped GEMM on
    GPU), or on one CPU device in float32 the FFI kernels of `dsv3_jax/grouped_gemm.py`
    (an sgemm per group, kernels read in place; gate, up and the activation one call).
    XLA:CPU's own `ragged_dot` costs as much as every expert densely.
  * "capacity": `capacity_factor`·N·K/E slots per expert, overflow dropped.
  * "auto": "capacity" when `capacity_factor` is set (the older spelling of capacity mode);
    "blocks" under an FP8 recipe (ragged_dot has none); else "ragged" on TPU and GPU, and on
    a CPU where the grouped-GEMM kernel runs (`cpu_kernels.runs_here`: float32, one device,
    the kernel built), "blocks" on other CPU setups. The platform is that of the mesh being
    traced under (`jax.set_mesh`, e.g. a described TPU slice for an AOT compile), else
    JAX's default backend. Each resolution is logged once.
A few tokens (`moe.few_token_path`) may instead run each expert they chose once over all of
them (`chosen_swiglu`), whatever the implementation.

The ragged path calls `jax.lax.ragged_dot` (or the CPU kernel) directly, not
`layers.project`: its operands and outputs are in the compute dtype (the kernels accumulate in
fp32), and no precision recipe applies (config validation refuses moe_impl="ragged" with an
FP8 recipe).
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax import cpu_kernels, grouped_gemm
from dsv3_jax.backends import platform
from dsv3_jax.config import ModelConfig
from dsv3_jax.layers import Weight, dtype_of

_ACCELERATORS = ("tpu", "gpu", "cuda", "rocm")
_logged: set[tuple[str, str]] = set()


def resolve_moe_impl(config: ModelConfig) -> str:
    """"blocks", "ragged" or "capacity": `config.moe_impl` with "auto" resolved (see the module
    docstring); an automatic choice is logged once per (platform, choice)."""
    if config.moe_impl != "auto":
        return config.moe_impl
    where = platform()
    if config.capacity_factor is not None:
        choice = "capacity"
    elif config.fp8 != "none":
        choice = "blocks"
    elif where in _ACCELERATORS or cpu_kernels.runs_here(dtype_of(config.dtype)):
        choice = "ragged"
    else:
        choice = "blocks"
    if (where, choice) not in _logged:
        _logged.add((where, choice))
        logging.getLogger(__name__).info("moe_impl='auto' runs the routed experts as %r on %s",
                                         choice, where)
    return choice


def stable_order(key: jax.Array, num_keys: int) -> jax.Array:
    """argsort(key, stable=True) [M] int32 for integer keys in [0, num_keys]: one sort of the
    unique values key·M + index, whose order is the stable one (on XLA:CPU 0.34 against
    1.17 ms for the 8,192 assignments of the bench config's train step: a two-operand stable
    sort otherwise). Falls back to argsort where (num_keys + 1)·M would overflow int32."""
    M = key.shape[0]
    if (num_keys + 1) * M >= 2 ** 31:
        return jnp.argsort(key, stable=True).astype(jnp.int32)
    index = jnp.arange(M, dtype=jnp.int32)
    return jnp.sort(key.astype(jnp.int32) * M + index) % M


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
    order = stable_order(key, num_experts)
    sizes = jnp.zeros(num_experts, jnp.int32).at[key].add(1, mode="drop")
    return order, sizes


def ragged_swiglu(rows: jax.Array, group_sizes: jax.Array, weights: tuple[Weight, ...],
                  config: ModelConfig, scale: jax.Array | None = None,
                  stacks: ExpertStacks | None = None) -> jax.Array:
    """Rows sorted by expert through their experts' SwiGLU, as grouped GEMMs.

    Args:
      rows: [M, D]; the first group_sizes[0] rows go to expert 0, the next to expert 1, ...;
        rows past sum(group_sizes) come out zero.
      group_sizes: [E] int32.
      weights: (gate [E, D, F], up [E, D, F], down [E, F, D]).
      scale: [M] multiplies each row's hidden units before the down projection (its routing
        weight), or None.
      stacks: the same kernels as a layer of [L, …] stacks, read in place by the CPU kernel
        (`grouped_gemm`; elsewhere ignored).
    Returns:
      [M, D] in the compute dtype.
    """
    dtype = dtype_of(config.dtype)
    gate, up, down = (w.kernel.astype(dtype) for w in weights)
    if cpu_kernels.runs_here(dtype):  # XLA:CPU: one FFI call for the SwiGLU, one for down
        layer = 0 if stacks is None else stacks.layer
        h = grouped_gemm.swiglu_hidden(
            rows.astype(dtype), gate, up, group_sizes, scale,
            stacks=None if stacks is None else (stacks.gate, stacks.up), layer=layer)
        return grouped_gemm.ragged_matmul(h, down, group_sizes, layer=layer,
                                          stack=None if stacks is None else stacks.down)
    # Out in the compute dtype (accumulated in fp32 by the kernels): an fp32 out would give the
    # backward pass fp32 cotangents against compute-dtype operands, a mixed-type ragged_dot
    # that TPU's Mosaic kernel refuses ("Bad rhs type"). A narrower compute dtype multiplies at
    # its own precision: an inherited "highest" (fp32 contract precision) on bf16 operands is
    # another refusal of the TPU kernel.
    precision = None if dtype == jnp.float32 else jax.lax.Precision.DEFAULT
    gemm = lambda x, w: jax.lax.ragged_dot(x.astype(dtype), w, group_sizes,
                                           precision=precision, preferred_element_type=dtype)
    hidden = jax.nn.silu(gemm(rows, gate)) * gemm(rows, up)
    if scale is not None:
        hidden = (hidden * scale[:, None].astype(hidden.dtype)).astype(dtype)
    return gemm(hidden, down)


def ragged_experts(tokens: jax.Array, experts: jax.Array, routing_weights: jax.Array,
                   weights: tuple[Weight, ...], config: ModelConfig,
                   stacks: ExpertStacks | None = None) -> jax.Array:
    """[N, D] tokens through their K experts [N, K] by sorting and grouped GEMMs, each
    assignment's hidden units scaled by its routing weight ([N, K]): the weighted sum [N, D]
    (fp32). The rows are sorted and summed back by gathers only (`sort_rows`)."""
    N, K = experts.shape
    order, sizes = sort_by_expert(experts.reshape(-1), config.n_routed_experts)
    slot = jnp.zeros(N * K, jnp.int32).at[order].set(jnp.arange(N * K, dtype=jnp.int32))
    slot = slot.reshape(N, K)
    scale = jnp.take(routing_weights.reshape(-1).astype(jnp.float32), order)
    y_sorted = ragged_swiglu(sort_rows(tokens, order, slot), sizes, weights, config, scale,
                             stacks)
    return unsort_rows(y_sorted.astype(jnp.float32), order, slot)


@jax.custom_vjp
def sort_rows(x: jax.Array, order: jax.Array, slot: jax.Array) -> jax.Array:
    """x [N, D] → [N·K, D]: row m is x[order[m] // K], the sorted assignments' tokens
    (order [N·K] a permutation of the assignments, slot [N, K] its inverse). The gradient is
    `unsort_rows`: a gather and a sum over K, where `jnp.take`'s is a scatter-add (element by
    element on XLA:CPU)."""
    return jnp.take(x, order // slot.shape[1], axis=0)


@jax.custom_vjp
def unsort_rows(y: jax.Array, order: jax.Array, slot: jax.Array) -> jax.Array:
    """y [N·K, D] in sorted order → [N, D]: each token's K rows summed (the transpose of
    `sort_rows`, whose gather is its gradient)."""
    N, K = slot.shape
    return jnp.take(y, slot.reshape(-1), axis=0).reshape(N, K, -1).sum(1)


def _no_index_grads(order, slot):
    return _float0(order), _float0(slot)


sort_rows.defvjp(lambda x, order, slot: (sort_rows(x, order, slot), (order, slot)),
                 lambda res, d: (unsort_rows(d, *res), *_no_index_grads(*res)))
unsort_rows.defvjp(lambda y, order, slot: (unsort_rows(y, order, slot), (order, slot)),
                   lambda res, d: (sort_rows(d, *res), *_no_index_grads(*res)))


def _dot(a, w):
    return jnp.dot(a, w, preferred_element_type=jnp.float32)


class ExpertStacks(NamedTuple):
    """Every layer's expert kernels of a block stack as stored ([L, E, D, F], [L, E, D, F],
    [L, E, F, D]) and the layer reading them: `block_swiglu` then reads its blocks' kernels
    from the stacks, not from a copy of the layer's slice (`stacks_pay`)."""

    gate: jax.Array
    up: jax.Array
    down: jax.Array
    layer: jax.Array | int


def stacks_pay() -> bool:
    """Whether a block stack hands `block_swiglu` its whole expert stacks (`ExpertStacks`): on
    one XLA:CPU device, which copies a layer's `[E, D, F]` slice of a stack before a loop can
    read it (the whole slice, each layer, every step). Under a multi-device mesh the stacks
    would be gathered whole where a layer's slice is gathered now; elsewhere slices are
    free or the blocks path is not taken."""
    mesh = jax.sharding.get_abstract_mesh()
    return platform() == "cpu" and (mesh.empty or mesh.size == 1)


def block_swiglu(tokens: jax.Array, rows: jax.Array, weights: tuple[jax.Array, ...],
                 block_expert: jax.Array, scale: jax.Array, config: ModelConfig,
                 used: jax.Array | None = None,
                 stacks: ExpertStacks | None = None) -> jax.Array:
    """The routed experts' weighted output [N, D] (float32) from token blocks, one block at a
    time, all three projections and the combine in one loop: block p holds
    tokens[rows[p·b:(p+1)·b]] (an index of N marks an empty slot: its scale is 0 and its output
    goes nowhere) and runs through expert block_expert[p] of weights = (gate [E, D, F],
    up [E, D, F], down [E, F, D]) as stored, its hidden units multiplied by scale [P, b] before
    the down projection, its [b, D] output added into its tokens' rows. Blocks from `used` on
    are skipped.

    Operands in the compute dtype, fp32 accumulation and elementwise math. The backward pass is
    one loop too: per block the down kernel's gradient, the hidden units' gradient, the gate and
    up kernels' gradients and the tokens' gradient (added into their rows), from the gate and up
    outputs the forward pass keeps ([P, b, F] each).

    Why one loop: as three (one per projection), each block's rows were copied out and its
    [b, F] outputs written back into [P, b, F] stacks per projection, and the hidden units
    formed over the whole stack between them; on XLA:CPU those copies cost about half as much
    as the block GEMMs themselves (small preset, 1024-token prefill). Why the combine inside:
    a [P, b, D] output stack, gathered back into [N, K, D] and summed, took zero-filled
    [P, b, D] buffers for the output and for both gradients (one MoE layer's fwd+bwd at 4,096
    small-preset tokens: ~320 → ~280-310 ms). Not for use inside shard_map (the kernels'
    gradients are not summed over the map's other axes).

    With `stacks` (the same kernels as layer `stacks.layer` of [L, …] stacks), both loops read
    the blocks' kernels out of the stacks and `weights` only receive the gradients: a layer of
    an unrolled or scanned stack then reads no copy of its slice (`ExpertStacks`)."""
    dtype = dtype_of(config.dtype)
    P, b = scale.shape
    used = jnp.asarray(P if used is None else used, jnp.int32)
    kernels = tuple(w.astype(dtype) for w in weights)
    if stacks is not None:  # read only: the gradients go to `weights`
        stacks = ExpertStacks(*(jax.lax.stop_gradient(s).astype(dtype)
                                for s in (stacks.gate, stacks.up, stacks.down)),
                              jnp.asarray(stacks.layer, jnp.int32))
    return _block_swiglu(tokens.astype(dtype), rows.reshape(P, b), *kernels, block_expert,
                         scale.astype(jnp.float32), used, stacks)


def _reader(gate, up, down, stacks):
    """e → expert e's (gate, up, down) kernels: of the layer's own [E, …] kernels, or of layer
    `stacks.layer` of the whole stacks (`block_swiglu`'s `stacks`)."""
    if stacks is None:
        return lambda e: (gate[e], up[e], down[e])
    return lambda e: tuple(s[stacks.layer, e] for s in (stacks.gate, stacks.up, stacks.down))


def _silu_parts(g):
    sg = jax.nn.sigmoid(g)
    return g * sg, sg


def _block_forward(tokens, rows, gate, up, down, block_expert, scale, used, stacks):
    """(y [N, D]: each token's scaled expert outputs summed, (g, u) [P, b, F] float32 of each
    block, 0 past `used`)."""
    dtype = tokens.dtype
    P, b = rows.shape
    F = gate.shape[2]
    kernels = _reader(gate, up, down, stacks)

    def block(y, p):
        def run(y):
            x, e = jnp.take(tokens, rows[p], axis=0, mode="clip"), block_expert[p]
            w_gate, w_up, w_down = kernels(e)
            g, u = _dot(x, w_gate), _dot(x, w_up)
            h = _silu_parts(g)[0] * u * scale[p][:, None]
            y = y.at[rows[p]].add(_dot(h.astype(dtype), w_down), mode="drop")
            return y, (g, u)

        zeros = jnp.zeros((b, F), jnp.float32)
        return jax.lax.cond(p < used, run, lambda y: (y, (zeros, zeros)), y)

    y, (g, u) = jax.lax.scan(block, jnp.zeros(tokens.shape, jnp.float32), jnp.arange(P))
    return y, g, u


@jax.custom_vjp
def _block_swiglu(tokens, rows, gate, up, down, block_expert, scale, used, stacks):
    return _block_forward(tokens, rows, gate, up, down, block_expert, scale, used, stacks)[0]


def _block_swiglu_fwd(tokens, rows, gate, up, down, block_expert, scale, used, stacks):
    y, g, u = _block_forward(tokens, rows, gate, up, down, block_expert, scale, used, stacks)
    # with stacks, gate/up/down are kept for their shapes only (XLA drops the unread copies)
    return y, (tokens, rows, gate, up, down, block_expert, scale, used, stacks, g, u)


def _block_swiglu_bwd(residuals, dy):
    tokens, rows, gate, up, down, block_expert, scale, used, stacks, g_all, u_all = residuals
    dtype = tokens.dtype
    P, b = rows.shape
    kernels = _reader(gate, up, down, stacks)

    def block(p, grads):
        dtokens, dgate, dup, ddown = grads
        x, e = jnp.take(tokens, rows[p], axis=0, mode="clip"), block_expert[p]
        d = jnp.take(dy, rows[p], axis=0, mode="fill", fill_value=0).astype(dtype)
        dx, dg, du, dd, dscale = _swiglu_backward(x, g_all[p], u_all[p], scale[p][:, None], d,
                                                  *kernels(e))
        dgate, dup, ddown = dgate.at[e].add(dg), dup.at[e].add(du), ddown.at[e].add(dd)
        dtokens = dtokens.at[rows[p]].add(dx, mode="drop")
        return (dtokens, dgate, dup, ddown), dscale

    def maybe(grads, p):
        return jax.lax.cond(p < used, block, lambda p, grads: (grads, jnp.zeros(b, jnp.float32)),
                            p, grads)

    zeros = lambda w: jnp.zeros(w.shape, jnp.float32)
    (dtokens, dgate, dup, ddown), dscale = jax.lax.scan(
        maybe, (zeros(tokens), zeros(gate), zeros(up), zeros(down)), jnp.arange(P))
    # the stacks are read under stop_gradient: no cotangent (None: a symbolic zero)
    dstacks = None if stacks is None else ExpertStacks(None, None, None, _float0(stacks.layer))
    return (dtokens.astype(dtype), _float0(rows), dgate.astype(gate.dtype),
            dup.astype(up.dtype), ddown.astype(down.dtype), _float0(block_expert), dscale,
            _float0(used), dstacks)


def _float0(a):
    """The cotangent of an integer or boolean input."""
    return np.zeros(np.shape(a), jax.dtypes.float0)


def _swiglu_backward(x, g, u, s, d, gate, up, down, keep=None):
    """One expert's SwiGLU backward on rows x [n, D] (compute dtype), from its gate and up
    outputs g, u [n, F] (fp32), the rows' scales s [n, 1] (multiplying the hidden units before
    the down projection) and output cotangent d [n, D] (compute dtype); `keep` [n, 1] (bool)
    zeroes the hidden units of other rows. Returns (dx [n, D], the gate, up and down kernels'
    gradients, ds [n]), fp32."""
    dtype = x.dtype
    act, sg = _silu_parts(g)
    au = act * u  # the unscaled hidden units
    if keep is not None:
        au = jnp.where(keep, au, 0)
    ddown = _dot((au * s).astype(dtype).T, d)
    dh = _dot(d, down.T)
    ds = (dh * au).sum(-1)
    if keep is not None:
        dh = jnp.where(keep, dh, 0)
    du = (dh * act * s).astype(dtype)
    dg = (dh * u * s * sg * (1 + g * (1 - sg))).astype(dtype)
    dx = _dot(dg, gate.T) + _dot(du, up.T)
    return dx, _dot(x.T, dg), _dot(x.T, du), ddown, ds


_block_swiglu.defvjp(_block_swiglu_fwd, _block_swiglu_bwd)


def chosen_rows(experts: jax.Array, routing_weights: jax.Array, num_experts: int):
    """(keep [E, N] bool: token n chose expert e, scale [E, N] fp32: its routing weight there,
    0 elsewhere) from experts and routing_weights [N, K]: each expert's rows over all tokens."""
    chosen = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32)  # [N, K, E]
    scale = jnp.einsum("NKE,NK->EN", chosen, routing_weights.astype(jnp.float32))
    return chosen.sum(1).T > 0, scale


def chosen_swiglu(tokens: jax.Array, experts: jax.Array, routing_weights: jax.Array,
                  weights: tuple[jax.Array, ...], config: ModelConfig) -> jax.Array:
    """The routed experts' weighted output [N, D] (float32) for a few tokens: one pass per
    expert that any of them chose (ids gathered at run time, a loop as long as their number),
    each expert's kernels of weights = (gate [E, D, F], up [E, D, F], down [E, F, D]) sliced
    out once and applied to all N tokens, its hidden units kept where the token chose it and
    multiplied by that routing weight ([N, K] `routing_weights` of `experts`).

    A decode step reads each chosen expert's kernels once and no other's: at the small preset
    with 8 tokens, about 21 of 32 experts where every expert masked (`moe.dense_swiglu`) reads
    all 32; against kernels sliced per assignment (N·K slices) a kernel two tokens share is
    read once. The backward pass is the same loop (each chosen expert's gate and up outputs
    computed again) writing each chosen expert's kernel gradients once. Not for use inside
    shard_map (the kernels' gradients are not summed over the map's other axes)."""
    E = config.n_routed_experts
    N, K = experts.shape
    dtype = dtype_of(config.dtype)
    keep, scale = chosen_rows(experts, routing_weights, E)
    used = keep.any(1)
    ids = jnp.nonzero(used, size=min(N * K, E), fill_value=0)[0].astype(jnp.int32)
    kernels = tuple(w.astype(dtype) for w in weights)
    return _chosen_swiglu(tokens.astype(dtype), *kernels, ids, used.sum().astype(jnp.int32),
                          keep, scale)


@jax.custom_vjp
def _chosen_swiglu(tokens, gate, up, down, ids, used, keep, scale):
    dtype = tokens.dtype

    def expert(i, y):
        e = ids[i]
        g, u = _dot(tokens, gate[e]), _dot(tokens, up[e])
        h = jnp.where(keep[e][:, None], _silu_parts(g)[0] * u, 0) * scale[e][:, None]
        return y + _dot(h.astype(dtype), down[e])

    return jax.lax.fori_loop(0, used, expert, jnp.zeros(tokens.shape, jnp.float32))


def _chosen_swiglu_fwd(tokens, gate, up, down, ids, used, keep, scale):
    y = _chosen_swiglu(tokens, gate, up, down, ids, used, keep, scale)
    return y, (tokens, gate, up, down, ids, used, keep, scale)


def _chosen_swiglu_bwd(residuals, dy):
    tokens, gate, up, down, ids, used, keep, scale = residuals
    d = dy.astype(tokens.dtype)

    def expert(i, grads):
        dtokens, dgate, dup, ddown, dscale = grads
        e = ids[i]
        g, u = _dot(tokens, gate[e]), _dot(tokens, up[e])
        dx, dg, du, dd, ds = _swiglu_backward(tokens, g, u, scale[e][:, None], d, gate[e],
                                              up[e], down[e], keep[e][:, None])
        return (dtokens + dx, dgate.at[e].set(dg), dup.at[e].set(du), ddown.at[e].set(dd),
                dscale.at[e].set(ds))

    zeros = lambda w: jnp.zeros(w.shape, jnp.float32)
    dtokens, dgate, dup, ddown, dscale = jax.lax.fori_loop(
        0, used, expert, (zeros(tokens), zeros(gate), zeros(up), zeros(down), zeros(scale)))
    return (dtokens.astype(tokens.dtype), dgate.astype(gate.dtype), dup.astype(up.dtype),
            ddown.astype(down.dtype), _float0(ids), _float0(used), _float0(keep), dscale)


_chosen_swiglu.defvjp(_chosen_swiglu_fwd, _chosen_swiglu_bwd)
