r"""Samples a continuation from a training run's latest checkpoint.

  python -m dsv3_jax.sample --workdir=runs/default --prompt="def "
  python -m dsv3_jax.sample --workdir=runs/default --prompt="import os" --temperature=0 \
      --max_new_tokens=100

Reads WORKDIR/config.json for the model and tokenizer, restores the newest readable checkpoint
and decodes with `dsv3_jax.generate` (prefill, then the absorbed latent-cache decode loop). The
printed text stops at the first document separator.
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


def sample(workdir: str, prompt: str, max_new_tokens: int, temperature: float = 0.8,
           top_p: float = 0.95, seed: int = 0) -> tuple[str, int]:
    """(prompt + continuation, checkpoint step) from `workdir`'s newest checkpoint."""
    import jax
    import numpy as np

    from dsv3_jax.decode import generate
    from dsv3_jax.training import checkpoint, run_config, state
    from dsv3_jax.training.step import model_variables
    from dsv3_jax.training.tokenizer import load_tokenizer

    config = checkpoint.load_config(workdir)
    if config is None or not checkpoint.saved_steps(workdir):
        raise ValueError(f"{workdir!r} holds no train.py checkpoint")
    model = run_config.model_config(config)
    tokenizer = load_tokenizer(config.data.tokenizer)
    tx = state.make_optimizer(config, model)
    restored, step = checkpoint.Checkpointer(workdir, config.keep_checkpoints,
                                             read_only=True).restore(
        state.abstract_state(model, tx), warn=lambda m: print(m, file=sys.stderr))
    if restored is None:
        raise ValueError(f"no readable checkpoint in {workdir!r}")
    ids = tokenizer.encode(prompt)
    if len(ids) == 0:  # an empty prompt starts a new document
        ids = np.array([tokenizer.separator_id], np.int32)
    max_new_tokens = min(max_new_tokens, model.max_position_embeddings - len(ids))
    variables = model_variables(restored.params, restored.moe_bias, restored.fp8)
    out = generate(model, variables,
                   np.asarray(ids, np.int32)[None], max_new_tokens, temperature=temperature,
                   top_p=top_p, rng=jax.random.key(seed))
    new = np.asarray(out[0, len(ids):])
    ends = np.flatnonzero(new == tokenizer.separator_id)
    if len(ends):
        new = new[:ends[0]]
    return prompt + tokenizer.decode(new), step


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:  # a read-only orbax restore warns and logs a lot
        logging.set_verbosity(logging.ERROR)
    try:
        text, step = sample(_WORKDIR.value, _PROMPT.value, _MAX_NEW.value, _TEMPERATURE.value,
                            _TOP_P.value, _SEED.value)
    except ValueError as e:
        cli.fail("sample", str(e))
    print(f"# {_WORKDIR.value}, step {step}", file=sys.stderr)
    print(text)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser("sample"))
