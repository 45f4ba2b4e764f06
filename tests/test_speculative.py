"""Self-speculative decoding with the MTP modules: greedy output equals plain greedy decoding
token for token under every acceptance pattern; the caches it leaves equal a full forward's;
sampled output keeps the target model's distribution.

Acceptance patterns are forced through the weights, not by patching the loop:
  * rejects: each MTP module's eh_proj = 0, so its block sees zeros and drafts token 0 (all
    logits 0: argmax takes the first); the head's column 0 = 0 keeps token 0 from ever being
    the main model's argmax (checked), so every draft is rejected.
  * accepts: a "bigram" model. Every o_proj and down_proj is 0, so each hidden state is the
    normed embedding of its own token and the greedy next token a function f of the current
    token; MTP's eh_proj = [I; 0] sends the token embedding through its (then identity) block,
    so module k, and a chained draft, drafts f(its input token): the main model's next token.
  * partial: the bigram model with the main model's attention output ×0.03: the history moves
    the main model's argmax for some tokens (the cache matters again), the draft stays f(token).
  * random: the init's distributions ×3 (drafts of an untrained MTP module: rarely accepted).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_generate import LENGTHS, NEW, PROMPTS, random_variables

from dsv3_jax import DeepSeekV3, ModelConfig, generate, init_cache
from dsv3_jax.sampling import accept_sampled, nucleus_probs
from dsv3_jax.speculative import speculative_loop

C = ModelConfig.preset("tiny")


def _edit(variables, fn):
    return {**variables, "params": jax.tree_util.tree_map_with_path(
        lambda path, a: fn(jax.tree_util.keystr(path), a), variables["params"])}


def bigram(variables, attention=0.0):
    def leaf(name, a):
        if "down_proj" in name:
            return jnp.zeros_like(a)
        if "o_proj" in name:
            return a * (0.0 if "mtp_" in name else attention)
        if "eh_proj" in name:
            return jnp.eye(*a.shape, dtype=a.dtype)  # [2D, D]: the embedding half only
        return a
    return _edit(variables, leaf)


def rejects(variables):
    def leaf(name, a):
        if "eh_proj" in name:
            return jnp.zeros_like(a)
        if "lm_head" in name:
            return a.at[:, 0].set(0)
        return a
    return _edit(variables, leaf)


WEIGHTS = {"random": lambda v: v, "rejects": rejects, "accepts": bigram,
           "partial": lambda v: bigram(v, attention=0.03)}


@pytest.fixture(scope="module")
def tiny():
    return random_variables(C)


def check_by_position(spec, drafts, rounds):
    """accepted_by_position [B, K]: rounds that accepted draft k, so it counts down along k
    from at most the rounds and sums to the accepted drafts; the conditional rates follow."""
    by = np.asarray(spec.accepted_by_position)
    assert by.shape == (len(rounds), drafts)
    np.testing.assert_array_equal(by.sum(1), spec.accepted)
    assert (by[:, 0] <= rounds).all() and (np.diff(by, axis=1) <= 0).all(), by
    counts = by.sum(0)
    reached = np.concatenate([[rounds.sum()], counts[:-1]])
    np.testing.assert_allclose(spec.acceptance_by_position,
                               np.where(reached > 0, counts / np.maximum(reached, 1), np.nan))


def check_greedy(config, variables, prompts, drafts, stop):
    """Speculative == plain, with and without stop ids; returns the speculative result."""
    plain = generate(config, variables, prompts, NEW, return_result=True)
    spec = generate(config, variables, prompts, NEW, speculative=True, draft_tokens=drafts,
                    return_result=True)
    np.testing.assert_array_equal(spec.tokens, plain.tokens)
    np.testing.assert_array_equal(spec.lengths, NEW)
    # Each round drafts K and emits its accepted drafts + 1 (the prefill emits one token).
    rounds = np.asarray(spec.forwards) - 1
    np.testing.assert_array_equal(spec.drafted, drafts * rounds)
    np.testing.assert_array_equal(spec.lengths, np.minimum(NEW, 1 + rounds + spec.accepted))
    check_by_position(spec, drafts, rounds)
    stop = [int(plain.tokens[b, t]) for b, t in stop]
    plain_stop = generate(config, variables, prompts, NEW, eos_token_id=stop,
                          return_result=True)
    spec_stop = generate(config, variables, prompts, NEW, eos_token_id=stop, speculative=True,
                         draft_tokens=drafts, return_result=True)
    assert int(plain_stop.lengths.min()) < NEW  # the stop ids did stop something
    np.testing.assert_array_equal(spec_stop.lengths, plain_stop.lengths)
    np.testing.assert_array_equal(spec_stop.sequences, plain_stop.sequences)
    return plain, spec


@pytest.mark.parametrize("weights", ["random", "rejects", "accepts", "partial"])
def test_greedy_equals_plain_greedy(tiny, weights):
    drafts = 1  # chained drafts: test_caches_left_behind_equal_a_full_forward
    plain, spec = check_greedy(C, WEIGHTS[weights](tiny), PROMPTS, drafts,
                               stop=[(0, 5), (3, 8)])
    rate = spec.acceptance_rate
    if weights == "rejects":
        assert 0 not in np.asarray(plain.tokens)  # so a draft of 0 is always wrong
        assert rate == 0 and spec.tokens_per_forward == 1
        assert spec.acceptance_by_position == [0.0]
    elif weights == "accepts":
        assert rate == 1 and spec.acceptance_by_position == [1.0]
        # 11 tokens after the prefill's, K+1 per round: ceil(11 / (K+1)) rounds
        np.testing.assert_array_equal(spec.forwards, 1 + math.ceil((NEW - 1) / (drafts + 1)))
    elif weights == "partial":
        assert 0.2 < rate < 0.95, rate


def assert_greedy(config, forward, variables, sequences, lengths, new):
    """Each new token is the argmax of a full causal forward over the sequence at the position
    before it: by causality, exactly the plain greedy continuation (checked without a cache)."""
    best = np.asarray(jnp.argmax(forward(variables, jnp.asarray(sequences)), -1))
    sequences = np.asarray(sequences)
    for b, (L, n) in enumerate(zip(lengths, new)):
        np.testing.assert_array_equal(sequences[b, L:L + n], best[b, L - 1:L + n - 1],
                                      err_msg=f"row {b}")


def test_batch_of_one_on_a_small_like_preset():
    # 1 dense + 1 MoE layer; blocks of 16 assignments: at batch 1 the dropless experts' cost
    # is E·block rows (8,192 with the preset's 256), whatever the token count
    small = ModelConfig.preset("small", num_hidden_layers=2, expert_block_size=16)
    forward = jax.jit(lambda v, t: DeepSeekV3(small).apply(v, t, mtp=False).logits)
    base = random_variables(small)
    for weights in ("random", "partial"):
        v = WEIGHTS[weights](base)
        spec = generate(small, v, PROMPTS[1:2], NEW, speculative=True, return_result=True)
        assert int(spec.lengths[0]) == NEW
        assert_greedy(small, forward, v, spec.sequences, [LENGTHS[1]], [NEW])
        if weights == "partial":
            assert 0 < spec.acceptance_rate < 1


def test_caches_left_behind_equal_a_full_forward():
    """Two MTP modules and a third, chained draft. After the loop: the generated tokens are
    each the argmax of a full forward over the sequence (greedy, by causality); the main cache
    equals the full forward's below each row's newest token, and MTP module k's cache wherever
    the inputs it saw were already decided (positions p ≤ last − K − 2 − k): rollbacks and
    chained drafts left no entry computed from a draft behind."""
    c, drafts = C.replace(num_nextn_predict_layers=2), 3
    loop = jax.jit(speculative_loop, static_argnums=(0, 4, 6, 7))
    reference = jax.jit(lambda v, t: DeepSeekV3(c).apply(
        v, t, cache=init_cache(c, *t.shape), cache_index=0, absorb=False, mtp=True))
    prompt = np.zeros((len(PROMPTS), max(LENGTHS)), np.int32)
    for b, p in enumerate(PROMPTS):
        prompt[b, :len(p)] = p
    base = random_variables(c)
    for name in ("random", "partial", "accepts"):
        v = WEIGHTS[name](base)
        tokens, last, forwards, drafted, accepted, by_position, cache = loop(
            c, v, jnp.asarray(prompt), jnp.asarray(LENGTHS), NEW, jnp.array([-1]), drafts, True,
            1.0, 1.0, None)
        last = np.asarray(last)
        M = max(LENGTHS) + NEW + drafts  # > every row's last (a round may overshoot NEW)
        ref = reference(v, tokens[:, :M])
        assert_greedy(c, lambda v, t: ref.logits, v, tokens[:, :M], LENGTHS,
                      last - np.asarray(LENGTHS) + 1)
        for stack in ("dense", "moe", "mtp"):
            for field in ("c_kv", "k_pe"):
                got = np.asarray(getattr(cache[stack], field))[..., :M, :]  # [layers, B, S, ·]
                want = np.asarray(getattr(ref.cache[stack], field))
                for b in range(len(PROMPTS)):
                    for k in range(got.shape[0]):
                        valid = last[b] if stack != "mtp" else max(last[b] - drafts - 1 - k, 0)
                        np.testing.assert_allclose(
                            got[k, b, :valid], want[k, b, :valid], rtol=0,
                            atol=1e-4 * np.abs(want).max(),
                            err_msg=f"{name} {stack}[{k}].{field} row {b}")
        if name == "partial":
            assert 0 < int(accepted.sum()) < int(drafted.sum())
        if name == "accepts":  # 4 tokens per round: ceil(11 / 4) rounds of 3 drafts each
            np.testing.assert_array_equal(accepted, drafted)
            np.testing.assert_array_equal(drafted, drafts * math.ceil((NEW - 1) / 4))
        rounds = np.asarray(forwards) - 1
        by = np.asarray(by_position)
        np.testing.assert_array_equal(by.sum(1), accepted)
        assert (by[:, 0] <= rounds).all() and (np.diff(by, axis=1) <= 0).all(), by
        if name == "accepts":
            np.testing.assert_array_equal(by, np.repeat(rounds[:, None], drafts, axis=1))


def test_acceptance_by_position_counts_the_accepted_prefix(tiny, monkeypatch, request):
    """With drafts the main model would all accept (bigram weights) but the verification capped
    at 1 accepted draft per round (accepting fewer matching drafts is still greedy), every round
    accepts exactly draft 0: accepted_by_position = [rounds, 0, 0], rates [1, 0, nan]."""
    import dsv3_jax.speculative as speculative
    greedy = speculative.accept_greedy
    # generate's jitted loop is cached by its static arguments: trace it afresh with the patch,
    # and drop that trace afterwards so no later test reuses it
    jax.clear_caches()
    request.addfinalizer(jax.clear_caches)
    def at_most_one(drafts, logits):
        accepted, tokens = greedy(drafts, logits)
        return jnp.minimum(accepted, 1), tokens

    monkeypatch.setattr(speculative, "accept_greedy", at_most_one)
    v, drafts = bigram(tiny), 3
    plain = generate(C, v, PROMPTS, NEW, return_result=True)
    spec = generate(C, v, PROMPTS, NEW, speculative=True, draft_tokens=drafts,
                    return_result=True)
    np.testing.assert_array_equal(spec.tokens, plain.tokens)
    rounds = np.asarray(spec.forwards) - 1
    np.testing.assert_array_equal(rounds, math.ceil((NEW - 1) / 2))  # 2 tokens per round
    want = np.zeros((len(PROMPTS), drafts), np.int32)
    want[:, 0] = rounds
    np.testing.assert_array_equal(spec.accepted_by_position, want)
    rates = spec.acceptance_by_position
    assert rates[:2] == [1.0, 0.0] and math.isnan(rates[2]), rates
    check_by_position(spec, drafts, rounds)


def test_accept_sampled_keeps_the_target_distribution_by_hand():
    """Two drafts over 4 tokens with fixed p, q: the first emitted token follows p_0, the
    second (when the first draft was accepted) p_1, and the first draft is accepted with
    probability Σ_x min(p_0(x), q_0(x)) = 1 − TV(p_0, q_0)."""
    p = jnp.array([[0.1, 0.6, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]])
    q = jnp.array([[0.4, 0.2, 0.2, 0.2], [0.0, 0.0, 0.5, 0.5]])
    # Σ min(p_0, q_0) = .1 + .2 + .2 + .1 = .6
    N = 200_000  # frequency σ ≤ sqrt(.25 / N) = 1.1e-3; tolerance 0.006 > 5σ
    k = jax.random.split(jax.random.key(0), 3)
    drafts = jnp.stack([jax.random.categorical(k[j], jnp.log(q[j]), shape=(N,))
                        for j in range(2)], axis=1).astype(jnp.int32)
    accepted, tokens = jax.jit(accept_sampled)(drafts, jnp.broadcast_to(q, (N, 2, 4)),
                                               jnp.broadcast_to(p, (N, 3, 4)), k[2])
    accepted, tokens = np.asarray(accepted), np.asarray(tokens)
    assert abs((accepted >= 1).mean() - 0.6) < 0.006
    np.testing.assert_allclose(np.bincount(tokens[:, 0], minlength=4) / N, p[0], atol=0.006)
    second = tokens[accepted >= 1, 1]
    np.testing.assert_allclose(np.bincount(second, minlength=4) / len(second), p[1], atol=0.006)
    # a draft q gives zero mass to is never emitted as an accepted draft
    both = tokens[accepted == 2, 1]
    assert set(both.tolist()) <= {2, 3}


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_sampled_speculation_keeps_the_model_distribution(temperature, top_p):
    """The first two new tokens (the prefill's, then the first speculative round's) of N
    copies of one prompt, against the model's own joint P(t_L = a, t_{L+1} = b) computed by a
    forward of prompt + [a] for every a. N = 10,000 rows: a cell's frequency has σ ≤ 5e-3;
    tolerance 0.025 (5σ). Were the draft accepted unconditionally (output ~ the draft's q),
    some cell would be off by max |P_q − P_p|, checked below to exceed 0.06 (measured: 0.087 at
    temperature 1, 0.26 at 0.7 with top_p 0.8)."""
    c = C.replace(vocab_size=16, num_hidden_layers=2)
    v = random_variables(c)
    prompt = [3, 1, 4]
    N, L, V = 10_000, len(prompt), c.vocab_size
    out = generate(c, v, np.tile(prompt, (N, 1)), 2, temperature=temperature, top_p=top_p,
                   rng=jax.random.key(1), speculative=True, return_result=True)
    tokens = np.asarray(out.tokens)
    got = np.zeros((V, V))
    np.add.at(got, (tokens[:, 0], tokens[:, 1]), 1 / N)
    ref = jax.jit(DeepSeekV3(c).apply)(v, jnp.asarray([prompt + [a] for a in range(V)]))
    p_first = nucleus_probs(ref.logits[0, L - 1], temperature, top_p)  # [V]
    p_next = nucleus_probs(ref.logits[:, L], temperature, top_p)  # [V, V] given t_L = a
    q_next = nucleus_probs(ref.mtp_logits[0][:, L - 1], temperature, top_p)  # the draft's
    want = np.asarray(p_first[:, None] * p_next)
    np.testing.assert_allclose(got, want, rtol=0, atol=0.025)
    assert np.abs(np.asarray(p_first[:, None] * q_next) - want).max() > 0.06
    assert 0.05 < out.acceptance_rate < 0.95
