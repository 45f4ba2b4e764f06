"""Building blocks: RMSNorm, the two matmul entry points, SwiGLU.

Every parameter is created with logical axis names (`logically_partitioned`) so that
`sharding/` can place it on a mesh without any change here. Logical names used in the model:
vocab, embed, heads, q_lora, kv_lora, qk_nope, qk_rope, v_head, mlp, expert, layers.

Two matmul entry points keep precision recipes where they belong:
  * `project` — a weight projection, under the config's FP8 recipe (`dsv3_jax/fp8.py`);
  * `product` — activation by activation (attention scores, probs·V) and the float32 router:
    always in high precision, so no recipe can quantize them.
`Einsum` owns a weight and projects through `project`; modules outside V3's FP8 scope (the
LM head, the MTP eh_proj) pass `fp8=False`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax import fp8 as fp8_lib
from dsv3_jax import skinny_matmul
from dsv3_jax.config import ModelConfig
from dsv3_jax.rms_norm import rms_norm

Array = jax.Array


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def product(eqn: str, a: Array, b: Array, dtype: jnp.dtype, out_dtype=None) -> Array:
    """Activation × activation (or the router): both operands in `dtype`, fp32 accumulation,
    result in `out_dtype` (default `dtype`). Never quantized."""
    out = jnp.einsum(eqn, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)
    return out.astype(dtype if out_dtype is None else out_dtype)


class Weight(NamedTuple):
    """A projection's kernel and, under the delayed FP8 recipe, its GEMM's scaling state."""

    kernel: Array
    fp8_state: dict | None = None


def project(eqn: str, x: Array, w: Weight, config: ModelConfig, out_dtype=None,
            fp8: bool = True) -> Array:
    """A weight projection `einsum(eqn, x, w.kernel)`: operands in the compute dtype, fp32
    accumulation, under `config.fp8` unless `fp8=False`; result in `out_dtype` (default: the
    compute dtype)."""
    dtype = dtype_of(config.dtype)
    recipe = config.fp8 if fp8 else "none"
    out = fp8_lib.project(eqn, x.astype(dtype), w.kernel.astype(dtype), recipe, w.fp8_state,
                          config.fp8_margin)
    return out.astype(dtype if out_dtype is None else out_dtype)


# The variable collection of a layer's decode kernels: copies of its weights in the layout a
# decode step reads best, made once for a decode loop (`dsv3_jax.unstacked`) and used when
# present (`mla.absorbed_kernels`; a dense SwiGLU's "gate_up", [D, 2F]).
ABSORBED = "absorbed"


def normed_project(x: Array, norm: RMSNorm | None, kernel: Array, config: ModelConfig,
                   out_dtype=None) -> Array:
    """x [B, T, K] through `norm` (when given), projected by kernel [K, N] → [B, T, N] in
    `out_dtype` (default: the compute dtype), without an FP8 recipe: for a few float32 rows on
    one CPU device one `skinny_matmul` call that normalizes its rows itself (the norm's four
    XLA thunks saved), else `norm` then the product."""
    B, T, K = x.shape
    rows = x.reshape(B * T, K)
    out_dtype = dtype_of(config.dtype) if out_dtype is None else out_dtype
    if norm is not None and skinny_matmul.pays(rows, kernel):
        out = skinny_matmul.matmul(rows, kernel, norm.weight, config.rms_norm_eps)
        return out.reshape(B, T, -1).astype(out_dtype)
    x = x if norm is None else norm(x)
    return project("BTK,KN->BTN", x, Weight(kernel), config, out_dtype, fp8=False)


def logically_partitioned(init: Callable, axes: Sequence[str | None]) -> Callable:
    """`init` with its parameter boxed under logical axis names: metadata for `sharding/`,
    which places the parameter by them (`out_shardings` of a jitted init, the train state's
    shardings), and never a constraint of its own.

    flax would otherwise constrain a boxed parameter wherever it is unboxed under logical rules
    — at its use inside an init traced under a mesh, and in `nn.unbox` of the init's output —
    with the rules in force: the forward pass's activation rules (weights as used: gathered),
    resolved by flax's own logic. That pins every fresh parameter to a gathered layout, so an
    init with `out_shardings` would build a full copy on each device (for the scanned stacks
    inside the loop) before splitting it. With no rules of its own (`rules=()`), unboxing is
    the identity and the init is placed by its out_shardings alone, shard by shard.
    """
    return nn.with_logical_partitioning(init, tuple(axes), rules=())


class Einsum(nn.Module):
    """A weight of `shape` (logical `axes`) contracted with an activation by `eqn`.

    The weight is stored in `param_dtype`; the product runs in `dtype` under the FP8 recipe
    (`fp8=False`: outside V3's FP8 scope). The equation is given per call so one weight can
    serve several contractions (MLA's absorbed decode folds `kv_b` into the query with a
    different equation than the full path uses). Under the delayed recipe the GEMM's scaling
    state is the variable `fp8/kernel` (`fp8.init_state`).
    """

    shape: Sequence[int]
    axes: Sequence[str | None]
    config: ModelConfig
    init_std: float | None = None
    out_dtype: str | None = None  # e.g. float32 logits from a bf16 model
    fp8: bool = True

    def setup(self):
        c = self.config
        std = c.initializer_range if self.init_std is None else self.init_std
        init = logically_partitioned(nn.initializers.normal(std), self.axes)
        self.kernel = self.param("kernel", init, tuple(self.shape), dtype_of(c.param_dtype))
        self.state = None
        if self.fp8 and c.fp8 == "delayed":
            self.state = self.variable("fp8", "kernel", fp8_lib.init_state,
                                       c.fp8_amax_history_length)

    def weight(self) -> Weight:
        return Weight(self.kernel, None if self.state is None else self.state.value)

    def __call__(self, eqn: str, x: Array) -> Array:
        return project(eqn, x, self.weight(), self.config, self.out_dtype, self.fp8)


class RMSNorm(nn.Module):
    """y = x / rms(x) · w, computed in fp32 and returned in the compute dtype
    (`rms_norm.rms_norm`); `weight` is readable without a call, for the kernels that
    normalize their input themselves."""

    dim: int
    config: ModelConfig
    axis_name: str = "embed"

    def setup(self):
        init = logically_partitioned(nn.initializers.ones, (self.axis_name,))
        self.weight = self.param("weight", init, (self.dim,), dtype_of(self.config.param_dtype))

    def __call__(self, x: Array) -> Array:
        return rms_norm(x, self.weight, self.config.rms_norm_eps, dtype_of(self.config.dtype))


class SwiGLU(nn.Module):
    """Dense feed-forward: down(silu(x W_gate) · x W_up). D → F → D."""

    hidden: int
    config: ModelConfig

    def setup(self):
        D, F, c = self.config.hidden_size, self.hidden, self.config
        self.gate_proj = Einsum((D, F), ("embed", "mlp"), c)
        self.up_proj = Einsum((D, F), ("embed", "mlp"), c)
        self.down_proj = Einsum((F, D), ("mlp", "embed"), c)

    def weights(self) -> tuple[Weight, Weight, Weight]:
        """(gate [D, F], up [D, F], down [F, D]) with their FP8 states."""
        return self.gate_proj.weight(), self.up_proj.weight(), self.down_proj.weight()

    def __call__(self, x: Array, norm: RMSNorm | None = None) -> Array:
        """x [B, T, D], through `norm` first when given (a dense block's post-attention norm:
        the decode layout's fused [gate | up] kernel, `ABSORBED` "gate_up", applies it in its
        call)."""
        if self.config.fp8 == "none" and self.has_variable(ABSORBED, "gate_up"):
            gate, up = jnp.split(normed_project(x, norm, self.get_variable(ABSORBED, "gate_up"),
                                               self.config), 2, axis=-1)
        else:
            x = x if norm is None else norm(x)
            gate = self.gate_proj("BTD,DF->BTF", x)
            up = self.up_proj("BTD,DF->BTF", x)
        h = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        return self.down_proj("BTF,FD->BTD", h)


def remat_policy(name: str) -> Callable | None:
    """Maps ModelConfig.remat_policy to a `jax.checkpoint` policy (None: no remat)."""
    return {
        "none": None,
        "full": jax.checkpoint_policies.nothing_saveable,
        "dots_saveable": jax.checkpoint_policies.dots_saveable,
        "dots_with_no_batch_dims_saveable":
            jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }[name]
