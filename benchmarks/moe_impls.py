"""Routed-expert implementations side by side on whatever accelerator is attached: the MoE
layer's forward+backward and a small-preset train step, moe_impl "blocks" vs "ragged".

    python -m benchmarks.moe_impls [--preset small] [--tokens 4096] [--batch 8 --seq_len 512]
    python -m benchmarks.moe_impls --dry_run   # tiny sizes, one repeat: checks the script

One JSON line per figure: {"benchmark": "moe_layer_fwd_bwd" | "train_step", ...,
"blocks_ms", "ragged_ms", "ragged_over_blocks", "max_rel_diff", "backend", "device"}.
max_rel_diff is max |ragged - blocks| / max |blocks| over the layer's output and gradients
(moe_layer) or the step's loss and gradient norm (train_step): the two must agree to fp32 noise
in an fp32 model. On XLA:CPU ragged_dot costs about as much as every expert densely, so CPU
ratios say nothing about TPU/GPU (`benchmarks/accelerator.sh` runs this on one).
"""

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks.common import parse_config, positive_int, report, seconds_per_call
from dsv3_jax import ModelConfig
from dsv3_jax.moe import MoE
from dsv3_jax.training import run_config, state, step

IMPLS = ("blocks", "ragged")


def _max_rel_diff(a, b) -> float:
    return max(float(jnp.abs(x - y).max() / jnp.maximum(jnp.abs(x).max(), 1e-30))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def layer_figure(preset: str, tokens: int, repeats: int) -> None:
    results, times = {}, {}
    for impl in IMPLS:
        c = ModelConfig.preset(preset, moe_impl=impl)
        batch, seq_len = max(1, tokens // 512), min(tokens, 512)
        x = jax.random.normal(jax.random.key(0), (batch, seq_len, c.hidden_size))
        bias = jnp.zeros((c.n_routed_experts,))
        moe = MoE(c)
        params = nn.unbox(moe.init(jax.random.key(1), x, bias))

        def loss(p, x, moe=moe, bias=bias):
            y, _, balance = moe.apply(p, x, bias)
            return jnp.mean(y ** 2) + balance

        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        results[impl] = fn(params, x)
        times[impl] = seconds_per_call(fn, params, x, repeats=repeats)
    _report("moe_layer_fwd_bwd", preset, times, results, tokens=batch * seq_len, batch=batch,
            seq_len=seq_len)


def train_step_figure(preset: str, batch: int, seq_len: int, repeats: int) -> None:
    results, times = {}, {}
    for impl in IMPLS:
        config = run_config.base_config(preset)
        config.model.moe_impl = impl
        model = run_config.model_config(config)
        tx = state.make_optimizer(config, model)
        train_state = jax.jit(lambda rng, model=model, tx=tx: state.create_state(
            model, tx, rng))(jax.random.key(0))
        tokens = jax.random.randint(jax.random.key(1), (batch, seq_len + 1), 0,
                                    model.vocab_size)
        fn = jax.jit(step.make_train_step(model, config, tx, state.make_schedule(config)))
        new_state, metrics = fn(train_state, tokens)
        del new_state  # one AdamW step normalizes the gradients away: compare loss and norm
        results[impl] = (metrics["total_loss"], metrics["grad_norm"])
        times[impl] = seconds_per_call(fn, train_state, tokens, repeats=repeats)
    _report("train_step", preset, times, results, tokens=batch * seq_len, batch=batch,
            seq_len=seq_len)


def _report(name, preset, times, results, **sizes):
    report(benchmark=name, preset=preset, **sizes,
           blocks_ms=round(times["blocks"] * 1e3, 3), ragged_ms=round(times["ragged"] * 1e3, 3),
           ragged_over_blocks=round(times["ragged"] / times["blocks"], 3),
           max_rel_diff=_max_rel_diff(results["blocks"], results["ragged"]),
           backend=jax.default_backend(), device=jax.devices()[0].device_kind)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="small")
    parser.add_argument("--tokens", type=positive_int, default=4096)
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--seq_len", type=positive_int, default=512)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--dry_run", action="store_true",
                        help="tiny preset, 256 tokens, batch 2 x 16, one repeat")
    args = parser.parse_args()
    if args.dry_run:
        args.preset, args.tokens, args.batch, args.seq_len, args.repeats = "tiny", 256, 2, 16, 1
    parse_config(parser, "--preset", args.preset)  # a bad name: one line, before any work
    layer_figure(args.preset, args.tokens, args.repeats)
    train_step_figure(args.preset, args.batch, args.seq_len, args.repeats)


if __name__ == "__main__":
    main()
