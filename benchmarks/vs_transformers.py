"""Ours against transformers' DeepseekV3ForCausalLM on the same CPU, config and weights, in one run.

    python -m benchmarks.vs_transformers [--config bench] [--figures train prefill decode generate]

The weights are initialized once by us, written as an HF checkpoint (`save_hf_checkpoint`) and
loaded by both sides (transformers: `from_pretrained`, fp32, its default attention; ours:
`load_hf_checkpoint` + one `device_put`). Each figure prints one JSON line: tokens/s for each
side, ours over theirs, and model FLOP/s as a fraction of the matmul peak measured first
(an f32 2048³ matmul, the faster of jax and torch), and `kernels_blas`: the BLAS our CPU
kernels call (`cpu_kernels.blas()`: mkl or openblas, `DSV3_JAX_BLAS`).

  train     forward + backward of the next-token cross-entropy, batch × seq_len
  prefill   one forward over a prompt of `context` tokens, writing the cache
  decode    one-token steps after that prompt, at each `--decode_batch` (mean of `steps` steps,
            each one jitted call from Python; ours carries the cache index on device)
  generate  prompt + `new_tokens` greedy tokens end to end

`--config` is "bench" (issue 10's config, `benchmarks.common.BENCH`), a preset name, or JSON.
Model FLOPs count 2 per activated weight plus causal attention (`accounting.flops_per_token`);
the absorbed decode path does more attention FLOPs than that counts, so decode's fraction is a
model-FLOPs figure, not hardware utilization. Decode is bound by memory instead: its lines add
the bytes a step must read (`accounting.decode_step_bytes`: the weights once, the selected
experts, the latent cache), the read bandwidth measured first (a 512 MiB sum), the fraction of
it each side reaches, and `ratio_bound`, the ratio a step reading at that bandwidth would get.
"""

from __future__ import annotations

import argparse
import functools
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import median_seconds, parse_config, positive_int, report
from dsv3_jax import (
    DeepSeekV3,
    cpu_kernels,
    generate,
    load_hf_checkpoint,
    save_hf_checkpoint,
    unstacked,
)
from dsv3_jax.accounting import decode_step_bytes, flops_per_token
from dsv3_jax.config import NON_HF_FIELDS
from dsv3_jax.decode_step import DecodeStep
from dsv3_jax.model import init_cache, init_variables
from dsv3_jax.sampling import greedy
from dsv3_jax.training.step import cross_entropy

FIGURES = ("train", "prefill", "decode", "generate")


def _fastest(jax_call, torch_call) -> float:
    """Median seconds of the faster of a jax call (blocked on) and a torch call."""
    return min(median_seconds(lambda: jax.block_until_ready(jax_call()), 5),
               median_seconds(torch_call, 5))


def memory_bandwidth(torch) -> float:
    """Bytes/s of reading a 512 MiB f32 array (a sum): the faster of jax (jitted) and torch."""
    n = 2 ** 27
    a, ta, total = jnp.ones((n,), jnp.float32) + 0, torch.ones(n), jax.jit(jnp.sum)
    return 4 * n / _fastest(lambda: total(a), ta.sum)


def matmul_peak(torch) -> float:
    """FLOP/s of an f32 2048³ matmul: the faster of jax (jitted) and torch."""
    n = 2048
    a, ta, mm = jax.random.normal(jax.random.key(0), (n, n)), torch.randn(n, n), jax.jit(jnp.dot)
    return 2 * n ** 3 / _fastest(lambda: mm(a, a), lambda: ta @ ta)


class Theirs:
    """transformers' model on the checkpoint, with the four measured calls."""

    def __init__(self, path, torch, transformers):
        self.torch = torch
        self.model = transformers.DeepseekV3ForCausalLM.from_pretrained(path,
                                                                         dtype=torch.float32)
        self.attention = self.model.config._attn_implementation

    def train(self, tokens):
        self.model.zero_grad(set_to_none=True)
        ids = self.torch.from_numpy(tokens)
        self.model(input_ids=ids, labels=ids).loss.backward()

    def prefill(self, tokens):
        with self.torch.no_grad():
            out = self.model(input_ids=self.torch.from_numpy(tokens), use_cache=True)
        return out.past_key_values, out.logits[:, -1:].argmax(-1)

    def decode(self, cache, token, steps):
        with self.torch.no_grad():
            for _ in range(steps):
                out = self.model(input_ids=token, past_key_values=cache, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
        return token

    def generate(self, tokens, new):
        with self.torch.no_grad():
            return self.model.generate(self.torch.from_numpy(tokens), max_new_tokens=new,
                                       min_new_tokens=new, do_sample=False)


class Ours:
    """Our model on the same checkpoint, variables on device once; jitted calls."""

    def __init__(self, path, config):
        loaded, variables = load_hf_checkpoint(path)
        # config.json holds only HF fields: the numerics and implementation choices
        # (expert_block_size, layer_loop, ...) are the benchmarked config's
        self.config = loaded.replace(**{f: getattr(config, f) for f in NON_HF_FIELDS
                                        if f != "param_dtype"})
        self.variables = jax.device_put(variables)
        c, net = self.config, DeepSeekV3(self.config)

        def loss(params, tokens):
            logits = net.apply({**self.variables, "params": params}, tokens, mtp=False).logits
            return cross_entropy(logits[:, :-1], tokens[:, 1:]).mean()

        self._grad = jax.jit(jax.value_and_grad(loss))

        @functools.partial(jax.jit, static_argnames="length")
        def prefill(variables, tokens, length):
            out = net.apply(variables, tokens, cache=init_cache(c, tokens.shape[0], length),
                            cache_index=0, mtp=False)
            return (unstacked.unstack_cache(out.cache),
                    greedy(out.logits[:, -1:]))

        # decode steps as a serving loop runs them, one jitted call per token
        # (`dsv3_jax.decode_step`): per-layer weights and caches split once, passed flat
        self.step = DecodeStep(c, self.variables, head=lambda logits: greedy(logits[:, -1:]))

        self._prefill = prefill

    def train(self, tokens):
        jax.block_until_ready(self._grad(self.variables["params"], tokens))

    def prefill(self, tokens, length):
        return jax.block_until_ready(self._prefill(self.variables, tokens, length))

    def decode(self, cache, token, index, steps):
        index = jnp.int32(index)  # carried on device, as a serving loop would
        cache = self.step.cache(cache)
        for _ in range(steps):
            token, cache, index = self.step(token, cache, index)
        return jax.block_until_ready(token)

    def generate(self, tokens, new):
        return jax.block_until_ready(generate(self.config, self.variables, tokens, new))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="bench")
    parser.add_argument("--figures", nargs="+", default=list(FIGURES), choices=FIGURES)
    parser.add_argument("--batch", type=positive_int, default=8, help="train batch")
    parser.add_argument("--seq_len", type=positive_int, default=256, help="train sequence length")
    parser.add_argument("--context", type=positive_int, default=1024,
                        help="prefill / decode prompt")
    parser.add_argument("--decode_batch", type=positive_int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=positive_int, default=16,
                        help="decode steps per measurement")
    parser.add_argument("--new_tokens", type=positive_int, default=64, help="generate")
    parser.add_argument("--repeats", type=positive_int, default=3)
    args = parser.parse_args()

    if args.seq_len < 2 and "train" in args.figures:
        parser.error(f"--seq_len {args.seq_len}: the train figure predicts each next token of a "
                     "sequence; it needs at least 2")
    # transformers runs no MTP
    config = parse_config(parser, "--config", args.config, num_nextn_predict_layers=0)
    try:
        import torch
        import transformers
    except ImportError as e:
        parser.error(f"the transformers side needs torch and transformers ({e.name} is not "
                     "installed): pip install -e \".[reference]\"")

    if args.context + max(args.steps, args.new_tokens) + 1 > config.max_position_embeddings:
        parser.error(f"--context {args.context} + steps/new tokens exceed the config's "
                     f"max_position_embeddings={config.max_position_embeddings}")
    peak = matmul_peak(torch)
    bandwidth = memory_bandwidth(torch) if "decode" in args.figures else None
    with tempfile.TemporaryDirectory() as path:
        save_hf_checkpoint(path, config, init_variables(config, jax.random.key(0)))
        ours, theirs = Ours(path, config), Theirs(path, torch, transformers)
    rng = np.random.default_rng(0)
    tokens = lambda b, t: rng.integers(0, config.vocab_size, (b, t), dtype=np.int64)
    forward = lambda seq: flops_per_token(config, seq, include_mtp=False) / 3

    def emit(figure, n_tokens, t_ours, t_theirs, flops_per_tok, batch, shape, **extra):
        report(benchmark="vs_transformers", figure=figure, config=args.config, batch=batch,
               shape=shape, ours_tok_s=round(n_tokens / t_ours, 1),
               transformers_tok_s=round(n_tokens / t_theirs, 1),
               ratio=round(t_theirs / t_ours, 3),
               ours_peak_fraction=round(n_tokens * flops_per_tok / t_ours / peak, 4),
               transformers_peak_fraction=round(n_tokens * flops_per_tok / t_theirs / peak, 4),
               matmul_peak_gflops=round(peak / 1e9, 1), transformers_attention=theirs.attention,
               threads=torch.get_num_threads(), kernels_blas=cpu_kernels.blas(), **extra)

    R = args.repeats
    if "train" in args.figures:
        x = tokens(args.batch, args.seq_len)
        xj = jnp.asarray(x, jnp.int32)
        emit("train", x.size, median_seconds(lambda: ours.train(xj), R),
             median_seconds(lambda: theirs.train(x), R),
             flops_per_token(config, args.seq_len, include_mtp=False),
             args.batch, f"{args.batch}x{args.seq_len}")
    length = args.context + max(args.steps, args.new_tokens) + 1
    if "prefill" in args.figures:
        x = tokens(1, args.context)
        xj = jnp.asarray(x, jnp.int32)
        emit("prefill", x.size, median_seconds(lambda: ours.prefill(xj, length), R),
             median_seconds(lambda: theirs.prefill(x), R), forward(args.context), 1,
             f"1x{args.context}")
    if "decode" in args.figures:
        for b in args.decode_batch:
            x = tokens(b, args.context)
            xj = jnp.asarray(x, jnp.int32)
            # each measurement decodes `steps` tokens from a fresh prefill (not timed)
            t_ours = median_seconds(
                lambda cache, t: ours.decode(cache, t, args.context, args.steps), R,
                lambda: ours.prefill(xj, length))
            t_theirs = median_seconds(lambda cache, t: theirs.decode(cache, t, args.steps), R,
                                    lambda: theirs.prefill(x))
            # the memory roofline: the bytes a step must read, at the bandwidth measured first
            step_bytes = decode_step_bytes(config, b, args.context)
            read = lambda t: step_bytes * args.steps / t / bandwidth
            emit("decode", b * args.steps, t_ours, t_theirs, forward(2 * args.context - 1), b,
                 f"{b}x{args.context}+{args.steps} steps", step_mb=round(step_bytes / 1e6, 2),
                 memory_gb_s=round(bandwidth / 1e9, 1),
                 ours_bandwidth_fraction=float(f"{read(t_ours):.4g}"),
                 transformers_bandwidth_fraction=float(f"{read(t_theirs):.4g}"),
                 ratio_bound=float(f"{1 / read(t_theirs):.4g}"))
    if "generate" in args.figures:
        x = tokens(1, args.context)
        xj = jnp.asarray(x, jnp.int32)
        emit("generate", args.new_tokens, median_seconds(lambda: ours.generate(xj, args.new_tokens),
                                                       R),
             median_seconds(lambda: theirs.generate(x, args.new_tokens), R),
             forward(2 * args.context - 1), 1, f"1x{args.context}+{args.new_tokens}")


if __name__ == "__main__":
    main()
