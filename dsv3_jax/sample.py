r"""Samples a continuation from a training run's latest checkpoint.

  python -m dsv3_jax.sample --workdir=runs/default --prompt="def "
  python -m dsv3_jax.sample --workdir=runs/default --prompt="import os" --temperature=0 \
      --max_new_tokens=100
  python -m dsv3_jax.sample --workdir=runs/default --temperature=0 --speculative

Reads WORKDIR/config.json for the model and tokenizer, restores the newest readable checkpoint
and decodes with `dsv3_jax.generate` (prefill, then the absorbed latent-cache decode loop),
stopping at the first document separator. `--speculative` drafts with the model's MTP modules
and verifies the drafts in one forward (the same greedy text; sampled text from the same
distribution) and prints the acceptance rate and tokens per main-model forward to stderr.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from dsv3_jax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "A train.py workdir.", required=True)
_PROMPT = flags.DEFINE_string("prompt", "def ", "Text to continue.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "Tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "0: greedy; > 0: sample.")
_TOP_P = flags.DEFINE_float("top_p", 0.95, "Nucleus sampling mass.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_SPECULATIVE = flags.DEFINE_bool("speculative", False,
                                 "Self-speculative decoding with the MTP modules.")
_DRAFT_TOKENS = flags.DEFINE_integer(
    "draft_tokens", None, "Drafts per round with --speculative (default: one per MTP module; "
    "more chain the last module).")


def load(workdir: str):
    """(ModelConfig, variables, tokenizer, checkpoint step) of `workdir`'s newest checkpoint."""
    from dsv3_jax.training import checkpoint, run_config, state
    from dsv3_jax.training.step import model_variables
    from dsv3_jax.training.tokenizer import load_tokenizer

    config = checkpoint.load_config(workdir)
    if config is None or not checkpoint.saved_steps(workdir):
        raise ValueError(f"{workdir!r} holds no train.py checkpoint")
    model = run_config.model_config(config)
    tokenizer = load_tokenizer(config.data.tokenizer, workdir)  # "bpe:N": WORKDIR/tokenizer.json
    tx = state.make_optimizer(config, model)
    restored, step = checkpoint.Checkpointer(workdir, config.keep_checkpoints,
                                             read_only=True).restore(
        state.abstract_state(model, tx), warn=lambda m: print(m, file=sys.stderr))
    if restored is None:
        raise ValueError(f"no readable checkpoint in {workdir!r}")
    return model, model_variables(restored.params, restored.moe_bias, restored.fp8), tokenizer, \
        step


def sample(workdir: str, prompt: str, max_new_tokens: int, temperature: float = 0.8,
           top_p: float = 0.95, seed: int = 0, speculative: bool = False,
           draft_tokens: int | None = None):
    """(prompt + continuation, checkpoint step, the `dsv3_jax.Generation`) from `workdir`."""
    import jax
    import numpy as np

    from dsv3_jax.decode import generate

    model, variables, tokenizer, step = load(workdir)
    ids = tokenizer.encode(prompt)
    if len(ids) == 0:  # an empty prompt starts a new document
        ids = np.array([tokenizer.separator_id], np.int32)
    max_new_tokens = min(max_new_tokens, model.max_position_embeddings - len(ids))
    result = generate(model, variables, np.asarray(ids, np.int32)[None], max_new_tokens,
                      eos_token_id=tokenizer.separator_id, temperature=temperature, top_p=top_p,
                      rng=jax.random.key(seed), speculative=speculative,
                      draft_tokens=draft_tokens, return_result=True)
    new = np.asarray(result.tokens[0, :int(result.lengths[0])])
    if len(new) and new[-1] == tokenizer.separator_id:
        new = new[:-1]
    return prompt + tokenizer.decode(new), step, result


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:  # a read-only orbax restore warns and logs a lot
        logging.set_verbosity(logging.ERROR)
    try:
        text, step, result = sample(_WORKDIR.value, _PROMPT.value, _MAX_NEW.value,
                                    _TEMPERATURE.value, _TOP_P.value, _SEED.value,
                                    _SPECULATIVE.value, _DRAFT_TOKENS.value)
    except ValueError as e:
        cli.fail("sample", str(e))
    print(f"# {_WORKDIR.value}, step {step}", file=sys.stderr)
    if _SPECULATIVE.value:
        print(f"# speculative: acceptance rate {result.acceptance_rate:.3f}, "
              f"{result.tokens_per_forward:.2f} tokens per main-model forward "
              f"({int(result.accepted.sum())} of {int(result.drafted.sum())} drafts accepted; "
              f"by draft position, given the earlier ones were: "
              f"{', '.join(f'{r:.3f}' for r in result.acceptance_by_position)})",
              file=sys.stderr)
    print(text)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser("sample"))
