"""RMS normalization: y = x / sqrt(mean(x²) + eps) · w over the last axis, in float32.

The formula of `layers.RMSNorm` (which owns the weight) and of the XLA paths that the CPU
kernels normalizing their input in place of it (`skinny_matmul.matmul(norm=…)`,
`few_token_moe.layer(norm=…)`) take their gradients from.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, dtype=None) -> jax.Array:
    """x [..., K] normalized over K and scaled by weight [K], computed in float32; returned in
    `dtype` (default x's)."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * x32).astype(x.dtype if dtype is None else dtype)
