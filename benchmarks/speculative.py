"""Decoding at batch 1: tokens/s of plain decoding vs MTP self-speculative decoding.

    python -m benchmarks.speculative --workdir=runs/default [--max_new_tokens 256] \
        [--draft_tokens 1 2] [--prompt "import os"] [--temperature 0.8]
    python -m benchmarks.speculative --preset tiny      # random weights, no training run

One JSON line per draft depth (drafts past the MTP modules chain the last one): tokens/s of
both, their ratio, the measured acceptance rate (overall, and per draft position k given the
drafts before it were accepted; null where no round reached k), tokens per main-model forward,
and, greedy (the default), whether the two outputs are the same tokens (they must be; null when
sampling, where only the distribution is the same). What bounds the speedup, from the same timings:
`round_cost` is the time per main-model forward of speculation (its drafts included) over that
of plain decoding, so the speedup is tokens_per_forward / round_cost, and
`speedup_at_full_acceptance` = (draft_tokens + 1) / round_cost is the most any acceptance rate
could give; `limited_by` says which of the two keeps the speedup under 1.5x ("round cost" when
even full acceptance would, else "acceptance"), null when it is reached.
Both runs decode max_new_tokens with no stop token. With --workdir the weights and tokenizer
are the run's newest checkpoint; without, the preset's random initialization, whose untrained
MTP module drafts are almost never accepted: the figure is then what speculation costs, not
what it gains (the `weights` field says which).
"""

import argparse

import jax
import numpy as np

from benchmarks.common import parse_config, positive_int, report, seconds_per_call
from dsv3_jax import generate, init_variables
from dsv3_jax.sample import load  # the sampling entry point's checkpoint restore


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default=None, help="a train.py workdir")
    parser.add_argument("--preset", default="tiny", help="model without --workdir")
    parser.add_argument("--prompt", default="import os\n\n\ndef main():\n")
    parser.add_argument("--max_new_tokens", type=positive_int, default=256)
    parser.add_argument("--draft_tokens", type=positive_int, nargs="+", default=[1, 2])
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--repeats", type=positive_int, default=3)
    args = parser.parse_args()
    if args.workdir:
        config, variables, tokenizer, step = load(args.workdir)
        prompt = np.asarray(tokenizer.encode(args.prompt), np.int32)[None]
        weights, model = f"{args.workdir} step {step}", "workdir"
    else:
        config = parse_config(parser, "--preset", args.preset)
        variables = init_variables(config, jax.random.key(0))
        prompt = np.frombuffer(args.prompt.encode(), np.uint8).astype(np.int32)[None] % \
            config.vocab_size
        weights, model = "random init (no --workdir): drafts of an untrained MTP module", \
            args.preset
    new = min(args.max_new_tokens, config.max_position_embeddings - prompt.shape[1])

    def run(**kwargs):
        return generate(config, variables, prompt, new, temperature=args.temperature,
                        top_p=args.top_p, rng=jax.random.key(0), return_result=True, **kwargs)

    plain = run()
    t_plain = seconds_per_call(lambda: run().tokens, repeats=args.repeats)
    for drafts in args.draft_tokens:
        spec = run(speculative=True, draft_tokens=drafts)
        t_spec = seconds_per_call(lambda d=drafts: run(speculative=True, draft_tokens=d).tokens,
                                  repeats=args.repeats)
        identical = bool(np.array_equal(spec.tokens, plain.tokens))
        # time per main-model forward (each side's prefill counts as one), speculative / plain
        round_cost = (t_spec / int(spec.forwards.sum())) / (t_plain / int(plain.forwards.sum()))
        ceiling = (drafts + 1) / round_cost
        limited_by = None if t_plain / t_spec >= 1.5 else (
            "round cost" if ceiling < 1.5 else "acceptance")
        report(benchmark="speculative_decode", model=model, weights=weights, batch=1,
               temperature=args.temperature, prompt_tokens=int(prompt.shape[1]),
               max_new_tokens=new,
               mtp_modules=config.num_nextn_predict_layers, draft_tokens=drafts,
               plain_tokens_per_s=round(new / t_plain, 1),
               speculative_tokens_per_s=round(new / t_spec, 1),
               speedup=round(t_plain / t_spec, 3),
               acceptance_rate=round(spec.acceptance_rate, 4),
               acceptance_by_position=[None if r != r else round(r, 4)
                                       for r in spec.acceptance_by_position],
               tokens_per_forward=round(spec.tokens_per_forward, 3),
               round_cost=round(round_cost, 3),
               speedup_at_full_acceptance=round(ceiling, 3), limited_by=limited_by,
               identical=identical if args.temperature == 0 else None,
               backend=jax.default_backend())


if __name__ == "__main__":
    main()
