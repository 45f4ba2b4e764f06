"""Building blocks: RMSNorm, the one projection helper every matmul goes through, SwiGLU.

Every parameter is created with logical axis names (`nn.with_logical_partitioning`) so that
`sharding/` can place it on a mesh without any change here. Logical names used in the model:
vocab, embed, heads, q_lora, kv_lora, qk_nope, qk_rope, v_head, mlp, expert, layers.

`Einsum` is the precision plug-in point: it owns a weight and contracts it with an activation
through `matmul`, so a precision recipe (FP8 delayed or blockwise scaling) replaces one function
and no model code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig

Array = jax.Array


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def matmul(eqn: str, x: Array, w: Array, dtype: jnp.dtype, out_dtype=None) -> Array:
    """The model's one matmul: both operands in the compute dtype, fp32 accumulation,
    result in `out_dtype` (default: the compute dtype)."""
    out = jnp.einsum(eqn, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
    return out.astype(dtype if out_dtype is None else out_dtype)


class Einsum(nn.Module):
    """A weight of `shape` (logical `axes`) contracted with an activation by `eqn`.

    The weight is stored in `param_dtype`; the product runs in `dtype`. The equation is given
    per call so one weight can serve several contractions (MLA's absorbed decode folds `kv_b`
    into the query with a different equation than the full path uses).
    """

    shape: Sequence[int]
    axes: Sequence[str | None]
    config: ModelConfig
    init_std: float | None = None
    out_dtype: str | None = None  # e.g. float32 logits from a bf16 model

    def setup(self):
        std = self.config.initializer_range if self.init_std is None else self.init_std
        init = nn.with_logical_partitioning(nn.initializers.normal(std), tuple(self.axes))
        self.kernel = self.param("kernel", init, tuple(self.shape),
                                 dtype_of(self.config.param_dtype))

    def __call__(self, eqn: str, x: Array) -> Array:
        return matmul(eqn, x, self.kernel, dtype_of(self.config.dtype), self.out_dtype)


class RMSNorm(nn.Module):
    """y = x / rms(x) · w, computed in fp32 and returned in the compute dtype."""

    dim: int
    config: ModelConfig
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,))
        weight = self.param("weight", init, (self.dim,), dtype_of(self.config.param_dtype))
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True)
                                  + self.config.rms_norm_eps)
        return (weight.astype(jnp.float32) * x32).astype(dtype_of(self.config.dtype))


class SwiGLU(nn.Module):
    """Dense feed-forward: down(silu(x W_gate) · x W_up). D → F → D."""

    hidden: int
    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        D, F = self.config.hidden_size, self.hidden
        gate = Einsum((D, F), ("embed", "mlp"), self.config, name="gate_proj")("BTD,DF->BTF", x)
        up = Einsum((D, F), ("embed", "mlp"), self.config, name="up_proj")("BTD,DF->BTF", x)
        h = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        return Einsum((F, D), ("mlp", "embed"), self.config, name="down_proj")("BTF,FD->BTD", h)


def remat_policy(name: str) -> Callable | None:
    """Maps ModelConfig.remat_policy to a `jax.checkpoint` policy (None: no remat)."""
    return {
        "none": None,
        "full": jax.checkpoint_policies.nothing_saveable,
        "dots_saveable": jax.checkpoint_policies.dots_saveable,
        "dots_with_no_batch_dims_saveable":
            jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }[name]
