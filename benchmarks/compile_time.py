"""Compile time of the tiny model's forward+backward at several depths (scanned MoE stack).

    python -m benchmarks.compile_time [--layers 4 16]

With the MoE blocks in one `nn.scan`, the compiled program holds one block body whatever the
depth, so compile time should stay nearly flat as layers grow. `layer_loop="auto"` (the
default) unrolls a forward pass's stack of at most 8 layers, so depths up to 9 (8 MoE layers)
compile each layer: measured 4.7 s at 4 layers, 7.5 s at 9 (unrolled), 5.2 s at 10 and at 16.
"""

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks.common import positive_int, report
from dsv3_jax import DeepSeekV3, ModelConfig, init_variables


def compile_seconds(config: ModelConfig) -> float:
    variables = jax.eval_shape(lambda: nn.unbox(init_variables(config, jax.random.key(0))))
    tokens = jax.ShapeDtypeStruct((2, 64), jnp.int32)

    def loss(params, moe_bias, tokens):
        out = DeepSeekV3(config).apply({"params": params, "moe_bias": moe_bias}, tokens)
        return out.logits.mean() + sum(m.mean() for m in out.mtp_logits) + out.balance_loss

    start = time.perf_counter()
    jax.jit(jax.grad(loss)).lower(variables["params"], variables["moe_bias"], tokens).compile()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=positive_int, nargs="+", default=[4, 16])
    args = parser.parse_args()
    results = {n: compile_seconds(ModelConfig.preset("tiny", num_hidden_layers=n))
               for n in args.layers}
    lo, hi = min(args.layers), max(args.layers)
    report(benchmark="compile_time_vs_depth", preset="tiny",
           seconds={str(n): round(t, 2) for n, t in results.items()},
           ratio=round(results[hi] / results[lo], 2), depth_ratio=hi / lo)


if __name__ == "__main__":
    main()
