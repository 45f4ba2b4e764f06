"""One full-model decode step after a prompt: the routed experts' path the model picks (a
few-token path of `moe.few_token_path`: "sliced", "chosen" or "dense"; or, on one CPU device in
float32, "ragged": the grouped-GEMM CPU kernel) vs filling E padded expert blocks, in one run.

    python -m benchmarks.moe_decode [--preset bench] [--context 1024] [--batch 1]

`--preset bench` is issue 10's benchmark config (vocab 512, hidden 256, 6 layers, 16 experts
top-4, block 64); any ModelConfig preset works. The cache is filled by one prefill of `context`
tokens; the timed call feeds one token per row through the absorbed-cache path. `picked` is
what the model picks for a decode step, `blocks` forces the dropless block buffer of
(ceil(N·K/b) + E)·b rows (moe_impl "blocks", no few-token path).
"""

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks.common import parse_config, positive_int, report, seconds_per_call
from dsv3_jax import DeepSeekV3, moe
from dsv3_jax.expert_compute import resolve_moe_impl
from dsv3_jax.model import init_cache


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="bench")
    parser.add_argument("--context", type=positive_int, default=1024)
    parser.add_argument("--batch", type=positive_int, default=1)
    args = parser.parse_args()
    c = parse_config(parser, "--preset", args.preset)
    net = DeepSeekV3(c)
    variables = jax.device_put(nn.unbox(net.init(jax.random.key(0),
                                                 jnp.zeros((1, 8), jnp.int32))))
    prompt = jax.random.randint(jax.random.key(1), (args.batch, args.context), 0, c.vocab_size)
    cache = jax.jit(lambda v, p: net.apply(v, p, cache=init_cache(c, args.batch, args.context + 1),
                                           cache_index=0, mtp=False).cache)(variables, prompt)
    token = prompt[:, -1:]
    chosen = moe.few_token_path(args.batch, c) or resolve_moe_impl(c)
    times = {}
    for path, pick, config in (("picked", moe.few_token_path, c),
                               ("blocks", lambda n, config: None, c.replace(moe_impl="blocks"))):
        original, moe.few_token_path = moe.few_token_path, pick
        try:  # a fresh function per path, so each is traced with its own choice
            step = jax.jit(lambda v, t, cache, config=config: DeepSeekV3(config).apply(
                v, t, cache=cache, cache_index=args.context, absorb=True, mtp=False).logits)
            times[path] = seconds_per_call(step, variables, token, cache) * 1e3
        finally:
            moe.few_token_path = original
    report(benchmark="moe_decode_step", preset=args.preset, context=args.context,
           batch=args.batch, model_picks=chosen,
           picked_ms=round(times["picked"], 3), blocks_ms=round(times["blocks"], 3),
           blocks_over_picked=round(times["blocks"] / times["picked"], 2),
           backend=jax.default_backend())


if __name__ == "__main__":
    main()
