"""Choosing tokens from logits: argmax, nucleus sampling, and speculative acceptance.

Dimension key: B batch · K drafted tokens per round · V vocab.

`greedy` is `jnp.argmax` over the vocabulary computed as a max and then the first index that
holds it: two plain reductions, which XLA:CPU vectorizes, where argmax's (value, index) pair
reduction runs element by element (8 × 512 logits: 33 → 9 µs a call; 1 × 129,280, the V3
vocabulary: 389 → 155 µs).

Nucleus (top-p) sampling keeps the smallest set of most-likely tokens whose probability reaches
top_p (always at least the most likely one), renormalizes, and samples at `temperature`.
`nucleus_probs` is that distribution; `sample_token` draws from it.

Speculative verification (REFERENCE §4) of K drafted tokens d_1..d_K against the target model's
distributions p_0..p_K at the K+1 verified positions:
  greedy:  accept d_{j+1} while it equals argmax p_j; then append argmax p_a (a = accepted).
  sampled (Leviathan et al. 2023, Chen et al. 2023): d_{j+1} was drawn from the draft's q_j;
           accept it with probability min(1, p_j(d)/q_j(d)); at the first rejection j = a draw
           from normalize(max(0, p_a − q_a)); if all K are accepted draw a bonus token from p_K.
           Every emitted token is then distributed exactly as under p alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def nucleus_probs(logits: jax.Array, temperature, top_p) -> jax.Array:
    """The nucleus distribution [..., V] (vocabulary order, float32) of logits [..., V]."""
    logits = logits.astype(jnp.float32) / temperature
    order = jnp.argsort(-logits, axis=-1)
    probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.where(mass_before < top_p, probs, 0.0)
    kept = kept / kept.sum(axis=-1, keepdims=True)
    return jnp.take_along_axis(kept, jnp.argsort(order, axis=-1), axis=-1)


def greedy(logits: jax.Array) -> jax.Array:
    """argmax over the last axis as int32 [...] of logits [..., V], with `jnp.argmax`'s ties
    and NaNs: the first maximal index, or the first NaN's (module docstring)."""
    V = logits.shape[-1]
    if V == 0:
        raise ValueError(f"greedy: logits {logits.shape} have an empty last (vocabulary) axis")
    hit = logits == logits.max(-1, keepdims=True)
    if jnp.issubdtype(logits.dtype, jnp.inexact):
        hit |= jnp.isnan(logits)  # the max is NaN then, equal to nothing
    return jnp.where(hit, jnp.arange(V, dtype=jnp.int32), V).min(-1)


def sample_token(logits: jax.Array, rng: jax.Array | None, temperature, top_p) -> jax.Array:
    """Next token [B] from logits [B, V]: argmax when rng is None, else nucleus sampling."""
    if rng is None:
        return greedy(logits)
    return sample_from(nucleus_probs(logits, temperature, top_p), rng)


def sample_from(probs: jax.Array, rng: jax.Array) -> jax.Array:
    """One draw [...] from each distribution probs [..., V] (zeros are never drawn)."""
    return jax.random.categorical(rng, jnp.log(probs), axis=-1).astype(jnp.int32)


def accept_greedy(drafts: jax.Array, logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Greedy verification.

    Args:
      drafts: [B, K] drafted tokens d_1..d_K.
      logits: [B, K+1, V] the target's logits at the positions that saw t_n, d_1, ..., d_K.
    Returns:
      (accepted [B] in 0..K, tokens [B, K+1]): the first accepted + 1 tokens are the output.
    """
    best = greedy(logits)  # [B, K+1]
    accepted = jnp.cumprod(drafts == best[:, :-1], axis=1).sum(axis=1)
    return accepted.astype(jnp.int32), best  # accepted drafts equal best, so best is the output


def accept_sampled(drafts: jax.Array, q: jax.Array, p: jax.Array,
                   rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Speculative-sampling verification (the rule in the module docstring).

    Args:
      drafts: [B, K] tokens, d_{j+1} drawn from q[:, j].
      q: [B, K, V] the draft distributions.
      p: [B, K+1, V] the target distributions at the K+1 verified positions.
      rng: a PRNG key.
    Returns:
      (accepted [B] in 0..K, tokens [B, K+1]): the first accepted + 1 tokens are the output.
    """
    B, K = drafts.shape
    accept_key, resample_key = jax.random.split(rng)
    p_draft = jnp.take_along_axis(p[:, :K], drafts[..., None], axis=-1)[..., 0]  # [B, K]
    q_draft = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    u = jax.random.uniform(accept_key, (B, K))
    accepted = jnp.cumprod(u * q_draft < p_draft, axis=1).sum(axis=1).astype(jnp.int32)
    # The token after the accepted drafts: the residual at the first rejection, or a bonus
    # draw from p_K (q is taken as 0 there) when every draft was accepted.
    p_next = jnp.take_along_axis(p, accepted[:, None, None], axis=1)[:, 0]  # [B, V]
    q_padded = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)
    q_next = jnp.take_along_axis(q_padded, accepted[:, None, None], axis=1)[:, 0]
    residual = jnp.maximum(p_next - q_next, 0.0)
    mass = residual.sum(axis=-1, keepdims=True)
    # mass = 0 only where p = q (a rejection there has probability 0); p keeps the draw valid
    residual = jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), p_next)
    last = sample_from(residual, resample_key)
    tokens = jnp.concatenate([drafts, last[:, None]], axis=1)
    tokens = jnp.where(jnp.arange(K + 1) == accepted[:, None], last[:, None], tokens)
    return accepted, tokens
