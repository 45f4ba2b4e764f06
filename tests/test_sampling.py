"""decode.sample_token against hand-worked distributions: argmax without a key, seeds, the
temperature's effect on the empirical distribution, and the nucleus (top-p) support.

Empirical frequencies come from N = 100,000 independent rows drawn in one call: a frequency's
standard deviation is ≤ sqrt(0.25 / N) = 1.6e-3, so a tolerance of 0.01 (> 6σ) leaves a flaky
failure at ~1e-9 per frequency, while every mutation checked below moves some frequency by > 0.1.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.decode import sample_token
from dsv3_jax.sampling import greedy

N = 100_000
TOL = 0.01


def frequencies(logits, key, temperature, top_p):
    rows = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (N, len(logits)))
    draws = jax.jit(sample_token)(rows, jax.random.key(key), temperature, top_p)
    assert draws.shape == (N,) and draws.dtype == jnp.int32
    return np.bincount(np.asarray(draws), minlength=len(logits)) / N


def test_without_a_key_it_is_argmax():
    logits = jnp.array([[0.1, 2.0, -1.0, 1.9], [3.0, 0.0, 0.0, 3.5]])
    np.testing.assert_array_equal(sample_token(logits, None, 1.0, 1.0), [1, 3])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int32])
def test_greedy_is_numpy_argmax_with_its_ties_and_nans(dtype):
    rng = np.random.default_rng(0)
    # few distinct values, so most rows hold ties; ±inf rows; NaNs, which argmax takes as max
    x = rng.integers(-3, 4, (6, 5, 37)).astype(np.float32)
    if dtype != jnp.int32:
        x[0, 0] = -np.inf
        x[0, 1, 5] = np.inf
        x[1, :3, [4, 20]] = np.nan
        x[2, 0, 36] = np.nan
    xs = jnp.asarray(x, dtype)
    want = np.argmax(np.asarray(xs, np.float32) if dtype == jnp.bfloat16 else np.asarray(xs), -1)
    got = jax.jit(greedy)(xs)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, want)
    big = jnp.asarray(rng.normal(size=(3, 129_280)) * 100, dtype)  # the V3 vocabulary
    np.testing.assert_array_equal(greedy(big), np.argmax(np.asarray(big, np.float32), -1))
    with pytest.raises(ValueError, match="empty last"):
        greedy(jnp.zeros((2, 0)))


def test_different_seeds_draw_different_tokens():
    logits = jnp.zeros((64, 16))  # uniform over 16 tokens
    a = sample_token(logits, jax.random.key(0), 1.0, 1.0)
    b = sample_token(logits, jax.random.key(1), 1.0, 1.0)
    again = sample_token(logits, jax.random.key(0), 1.0, 1.0)
    np.testing.assert_array_equal(a, again)  # a seed fixes the draw
    # Independent uniform draws agree with probability 1/16 each: ~4 of 64, not 64.
    assert (np.asarray(a) == np.asarray(b)).sum() < 20
    assert len(set(np.asarray(a).tolist())) > 8  # not one token (argmax would give 64 zeros)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_gives_softmax_of_logits_over_temperature(temperature):
    logits = [2.0, 1.0, 0.0, -1.0, -3.0]
    # By hand: p_j = exp(l_j / T) / Σ exp(l / T). T = 0.5: p ≈ (.865, .117, .016, .002, .000);
    # T = 2: p ≈ (.439, .266, .161, .098, .036).
    weights = [math.exp(x / temperature) for x in logits]
    want = np.array(weights) / sum(weights)
    if temperature == 0.5:
        np.testing.assert_allclose(want[:2], [0.865, 0.117], atol=1e-3)
    if temperature == 2.0:
        np.testing.assert_allclose(want[:2], [0.439, 0.266], atol=1e-3)
    got = frequencies(logits, key=int(temperature * 10), temperature=temperature, top_p=1.0)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


# Probabilities 0.05, 0.5, 0.15, 0.3 on token ids 0-3 (not in sorted order, so the mapping
# from sorted positions back to ids is exercised). Sorted: id 1 (.5), id 3 (.3), id 2 (.15),
# id 0 (.05); cumulative mass before each: 0, .5, .8, .95. The nucleus for top_p is the
# smallest prefix whose mass reaches top_p.
PROBS = [0.05, 0.5, 0.15, 0.3]


@pytest.mark.parametrize("top_p, want", [
    (0.4, [0, 1, 0, 0]),  # id 1 alone has .5 ≥ .4
    (0.7, [0, 0.5 / 0.8, 0, 0.3 / 0.8]),  # ids 1, 3: .8 ≥ .7; renormalized .625, .375
    (0.9, [0, 0.5 / 0.95, 0.15 / 0.95, 0.3 / 0.95]),  # ids 1, 3, 2: .95 ≥ .9
    (1.0, PROBS),  # everything
])
def test_top_p_keeps_the_smallest_nucleus_and_renormalizes(top_p, want):
    got = frequencies(np.log(PROBS), key=3, temperature=1.0, top_p=top_p)
    outside = np.asarray(want) == 0
    np.testing.assert_array_equal(got[outside], 0)  # never a token outside the nucleus
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
