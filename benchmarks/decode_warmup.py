"""Decode steps one by one after a prefill, and from caches that were not just prefilled: how
far the first steps of `vs_transformers`' decode figure are from the steady step.

    python -m benchmarks.decode_warmup [--config bench] [--batch 1] [--context 1024]
                                       [--steps 16] [--repeats 5] [--passes 10]

The step is `vs_transformers`' own (`Ours`: the same checkpoint round trip, the per-layer
decode layout, one jitted call per step from Python, the cache donated). Each repeat starts
the steps one way and times each step alone; the line per start gives each step's median
over the repeats after the first, their mean (what the decode figure averages), and the first
step over the last:

  after_prefill   a fresh prefill of `context` tokens, as the figure does;
  after_passes    a fresh prefill, then `passes` jitted passes reading every decode weight and
                  the cache (untimed): whether the slow start is the data's residency;
  warm_copy       a copy of one saved prefill's cache and token, no prefill in between.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import parse_config, positive_int, report
from benchmarks.vs_transformers import Ours
from dsv3_jax import save_hf_checkpoint
from dsv3_jax.model import init_variables

STARTS = ("after_prefill", "after_passes", "warm_copy")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="bench")
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--context", type=positive_int, default=1024)
    parser.add_argument("--steps", type=positive_int, default=16)
    parser.add_argument("--repeats", type=positive_int, default=5,
                        help="starts per mode; the first is a warm-up")
    parser.add_argument("--passes", type=positive_int, default=10,
                        help="reads of the weights and cache for after_passes")
    args = parser.parse_args()
    config = parse_config(parser, "--config", args.config, num_nextn_predict_layers=0)
    length = args.context + args.steps + 1
    if length > config.max_position_embeddings:
        parser.error(f"--context {args.context} + --steps {args.steps} exceed the config's "
                     f"max_position_embeddings={config.max_position_embeddings}")
    with tempfile.TemporaryDirectory() as path:
        save_hf_checkpoint(path, config, init_variables(config, jax.random.key(0)))
        ours = Ours(path, config)
    prompt = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.context))
    prompt = jnp.asarray(prompt, jnp.int32)
    saved = ours.prefill(prompt, length)
    copy = jax.jit(lambda tree: jax.tree.map(lambda a: a + 0, tree))
    read = jax.jit(lambda tree: sum(jnp.sum(a) for a in jax.tree.leaves(tree)
                                    if jnp.issubdtype(a.dtype, jnp.floating)))

    def start(mode):
        if mode == "warm_copy":
            return jax.block_until_ready(copy(saved))
        cache, token = ours.prefill(prompt, length)
        for _ in range(args.passes if mode == "after_passes" else 0):
            jax.block_until_ready(read((ours.step.weights, cache)))
        return cache, token

    for mode in STARTS:
        per_step = [[] for _ in range(args.steps)]
        for _ in range(args.repeats):
            cache, token = start(mode)
            index = jnp.int32(args.context)
            cache = ours.step.cache(cache)
            for i in range(args.steps):
                begin = time.perf_counter()
                token, cache, index = ours.step(token, cache, index)
                jax.block_until_ready(token)
                per_step[i].append(time.perf_counter() - begin)
        ms = [statistics.median(t[1:] or t) * 1e3 for t in per_step]
        report(benchmark="decode_warmup", config=args.config, batch=args.batch,
               context=args.context, start=mode, steps=args.steps,
               mean_ms=round(statistics.mean(ms), 3), per_step_ms=[round(m, 3) for m in ms],
               first_over_last=float(f"{ms[0] / ms[-1]:.3g}"), backend=jax.default_backend())


if __name__ == "__main__":
    main()
