"""Forward+backward time of one DeepSeekMoE layer vs a dense SwiGLU of equal active FLOPs.

    python benchmarks/moe_vs_dense.py [--preset small] [--tokens 4096]

The dense baseline's hidden size is (K + n_shared) · moe_intermediate_size: the same matmul
FLOPs per token as the MoE layer's K routed experts plus its shared expert. The ratio is the
cost of routing, sorting and block padding (target ≤ 1.5x).
"""

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks.common import parse_config, positive_int, report, seconds_per_call
from dsv3_jax.layers import SwiGLU
from dsv3_jax.moe import MoE


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="small")
    parser.add_argument("--tokens", type=positive_int, default=4096)
    parser.add_argument("--capacity_factor", type=float, default=None)
    args = parser.parse_args()
    if args.tokens % 512:
        parser.error(f"--tokens {args.tokens}: must be a multiple of 512 (sequences of 512)")
    c = parse_config(parser, "--preset", args.preset, capacity_factor=args.capacity_factor)
    x = jax.random.normal(jax.random.key(0), (args.tokens // 512, 512, c.hidden_size))
    bias = jnp.zeros((c.n_routed_experts,))
    moe = MoE(c)
    dense = SwiGLU((c.num_experts_per_tok + c.n_shared_experts) * c.moe_intermediate_size, c)
    moe_params = nn.unbox(moe.init(jax.random.key(1), x, bias))
    dense_params = nn.unbox(dense.init(jax.random.key(1), x))

    def moe_loss(p, x):
        y, _, balance = moe.apply(p, x, bias)
        return jnp.mean(y ** 2) + balance

    dense_loss = lambda p, x: jnp.mean(dense.apply(p, x) ** 2)
    t_moe = seconds_per_call(jax.jit(jax.grad(moe_loss, argnums=(0, 1))), moe_params, x)
    t_dense = seconds_per_call(jax.jit(jax.grad(dense_loss, argnums=(0, 1))), dense_params, x)
    report(benchmark="moe_vs_dense_fwd_bwd", preset=args.preset, tokens=args.tokens,
           experts=c.n_routed_experts, top_k=c.num_experts_per_tok,
           mode="dropless" if c.capacity_factor is None else f"capacity {c.capacity_factor}",
           moe_ms=round(t_moe * 1e3, 2), dense_ms=round(t_dense * 1e3, 2),
           ratio=round(t_moe / t_dense, 3), backend=jax.default_backend())


if __name__ == "__main__":
    main()
