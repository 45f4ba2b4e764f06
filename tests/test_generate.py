"""generate(): prompts of different lengths in one batch, stop tokens, the result object, and
one-line errors for bad input.

The reference for "each prompt alone" is independent of the decode loop: greedy decoding by
full causal forwards of one prompt at a time (no cache, no padding, no per-row index). The
random weights are the init's ×3, so logits are far from ties (at the init's scale the untrained
model's next-token distribution is nearly uniform over 384 tokens).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import DeepSeekV3, Generation, ModelConfig, generate

C = ModelConfig.preset("tiny")
LENGTHS = (3, 7, 1, 5)  # mixed, the longest not first, one of length 1
PROMPTS = [np.random.default_rng(0).integers(0, C.vocab_size, n).tolist() for n in LENGTHS]
NEW = 12


def random_variables(config: ModelConfig, seed: int = 0, scale: float = 3.0) -> dict:
    """init_variables' layout and distributions ×scale (kernels N(0, scale·initializer_range),
    norm weights `scale`, zero correction biases), drawn from abstract shapes: no compile."""
    shapes = nn.unbox(jax.eval_shape(DeepSeekV3(config).init, jax.random.key(0),
                                     jnp.zeros((1, 8), jnp.int32)))
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = jax.tree_util.keystr(path)
        if name.startswith("['moe_bias']"):
            return jnp.zeros(s.shape, s.dtype)
        if name.endswith("['weight']"):  # RMSNorm
            return jnp.full(s.shape, scale, s.dtype)
        return jnp.asarray(rng.normal(0, scale * config.initializer_range, s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


@pytest.fixture(scope="module")
def variables():
    return random_variables(C)


@jax.jit
def _logits(variables, tokens):
    return DeepSeekV3(C).apply(variables, tokens, mtp=False).logits


def greedy_alone(variables, prompt, new):
    """`new` greedy tokens after one prompt by full forwards over a fixed buffer (one compile:
    position t's logits do not depend on the zeros after it)."""
    tokens = np.zeros((1, max(LENGTHS) + new), np.int32)
    tokens[0, :len(prompt)] = prompt
    for t in range(len(prompt), len(prompt) + new):
        tokens[0, t] = int(jnp.argmax(_logits(variables, jnp.asarray(tokens))[0, t - 1]))
    return tokens[0, len(prompt):len(prompt) + new]


def test_a_mixed_length_batch_equals_each_prompt_alone(variables):
    result = generate(C, variables, PROMPTS, NEW, return_result=True)
    assert isinstance(result, Generation)
    tokens = np.asarray(result.tokens)
    assert tokens.shape == (len(PROMPTS), NEW)
    np.testing.assert_array_equal(result.lengths, [NEW] * len(PROMPTS))
    np.testing.assert_array_equal(result.prompt_lengths, LENGTHS)
    for b, prompt in enumerate(PROMPTS):
        np.testing.assert_array_equal(tokens[b], greedy_alone(variables, prompt, NEW),
                                      err_msg=f"row {b} (length {len(prompt)})")
    # sequences: each prompt, its new tokens, then padding (0) up to the widest prompt + NEW
    sequences = np.asarray(result.sequences)
    assert sequences.shape == (len(PROMPTS), max(LENGTHS) + NEW)
    for b, prompt in enumerate(PROMPTS):
        np.testing.assert_array_equal(sequences[b], np.concatenate(
            [prompt, tokens[b], np.zeros(max(LENGTHS) - len(prompt), int)]))
    # the same batch as an array plus lengths
    padded = np.zeros((len(PROMPTS), max(LENGTHS)), np.int32)
    for b, prompt in enumerate(PROMPTS):
        padded[b, :len(prompt)] = prompt
    again = generate(C, variables, padded, NEW, lengths=LENGTHS, return_result=True)
    np.testing.assert_array_equal(again.tokens, tokens)
    assert result.tokens_per_forward == 1.0 and np.isnan(result.acceptance_rate)


def test_eos_ends_each_sequence_at_its_first_stop_token(variables):
    free = np.asarray(generate(C, variables, PROMPTS, NEW, return_result=True).tokens)
    # Stop ids: row 0's 4th new token, and one from late in row 2; rows stop at the first
    # occurrence of either (counted by hand from the unstopped output).
    stop = [int(free[0, 3]), int(free[2, 9])]
    result = generate(C, variables, PROMPTS, NEW, eos_token_id=stop, pad_token_id=383,
                      return_result=True)
    for b in range(len(PROMPTS)):
        hits = np.flatnonzero(np.isin(free[b], stop))
        n = hits[0] + 1 if len(hits) else NEW
        assert result.lengths[b] == n, b
        assert int(result.forwards[b]) == n  # a finished row stops costing forwards
        np.testing.assert_array_equal(result.tokens[b, :n], free[b, :n])
        np.testing.assert_array_equal(result.tokens[b, n:], 383)  # padded, unchanged
        np.testing.assert_array_equal(result.sequences[b, LENGTHS[b] + n:], 383)
        assert result.token_lists()[b] == free[b, :n].tolist()
    assert result.lengths[0] <= 4
    # one id as an int; the default pad is that id
    single = generate(C, variables, PROMPTS, NEW, eos_token_id=stop[0], return_result=True)
    n0 = int(single.lengths[0])
    np.testing.assert_array_equal(single.tokens[0, n0:], stop[0])


BAD = [
    (dict(prompt_tokens=[[1, 2], []]), "prompt 1 is empty"),
    (dict(prompt_tokens=np.zeros((2, 0), np.int32)), "length>=1"),
    (dict(prompt_tokens=[[1, 2], [C.vocab_size]]), r"prompt token ids must be in \[0, 384\)"),
    (dict(prompt_tokens=[[-1]]), "prompt token ids"),
    (dict(prompt_tokens=[[1] * 1000, [1]], max_new_tokens=25), "max_position_embeddings"),
    (dict(prompt_tokens=np.ones((2, 4), np.int32), lengths=[4]), "lengths must be 2 integers"),
    (dict(prompt_tokens=np.ones((2, 4), np.int32), lengths=[4, 5]), "lengths must be"),
    (dict(prompt_tokens=np.ones((2, 4), np.int32), lengths=[0, 4]), "lengths must be"),
    (dict(prompt_tokens=[[1], [2]], lengths=[1, 1]), "lengths is for"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(eos_token_id=C.vocab_size), "eos_token_id"),
    (dict(eos_token_id=[]), "eos_token_id"),
    (dict(temperature=0.5), "rng"),
    (dict(top_p=0.0), "top_p"),
    (dict(draft_tokens=2), "draft_tokens needs speculative"),
    (dict(speculative=True, draft_tokens=0), "draft_tokens must be"),
    (dict(config=C.replace(num_nextn_predict_layers=0), speculative=True),
     "num_nextn_predict_layers=0"),
]


@pytest.mark.parametrize("kwargs, match", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_a_one_line_value_error(variables, kwargs, match):
    args = dict(config=C, variables=variables, prompt_tokens=[[1, 2, 3]], max_new_tokens=4)
    with pytest.raises(ValueError, match=match) as e:
        generate(**{**args, **kwargs})
    assert "\n" not in str(e.value)
