"""Self-speculative decoding: the MTP modules draft, the main model verifies (REFERENCE §4).

State per sequence b: the tokens so far, `last[b]` = the position of the newest token t_n (not
yet fed to the main model), the main model's latent cache valid below n, the main model's final
normed hidden states h⁰ for positions < n, and each MTP module's own latent cache.

One round, for every sequence at once (K = drafts per round, D = MTP modules drafting, i.e.
min(num_nextn_predict_layers, K), W = K + D):
  1. Draft. MTP module k at position i combines hᵏ_i with Emb(t_{i+k+1}) and predicts
     t_{i+k+2}, so at i = n−1 module 0 drafts d_1 = t_{n+1} from t_n, module 1 drafts d_2 from
     d_1, and so on; drafts past D chain the last module (its cache entry for that step is not
     kept: it would hold a draft-based input at a slot the module itself uses). Each module runs
     over a window of the W positions ending at n−1, rewriting the entries that the previous
     round computed from drafts (depth k's entries at n−k..n−1) and the positions the previous
     round accepted, so every MTP cache entry below the window is one a full forward over the
     true tokens would have written.
  2. Verify: one absorbed-cache forward of the main model (`dsv3_jax.unstacked.for_decoding`)
     over the K+1 positions n..n+K fed
     t_n, d_1..d_K (written into the main cache at n..n+K); its hidden states h⁰ there feed
     the next round's MTP window.
  3. Accept (`dsv3_jax.sampling`): a drafts plus one token of the main model's own, so the
     sequence advances by a+1 ≤ K+1 tokens per main-model forward.
Rollback is implicit: `last` advances only past accepted tokens; cache slots past it hold
entries from rejected drafts, which every later forward overwrites before any query can see
them (attention masks keys at positions above the query's, and a window is written before it
is attended). Greedy output therefore equals plain greedy decoding token for token (up to
floating-point ties: the verify forward scores K+1 positions at once).

The prefill runs the full MLA path with the MTP modules over the prompt (right-padded: row b
holds its prompt in positions 0..L_b−1), writing every cache; its MTP entries near the end of
the prompt saw padding instead of later tokens and are rewritten by the first round's window.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv3_jax import unstacked
from dsv3_jax.config import ModelConfig
from dsv3_jax.layers import Einsum
from dsv3_jax.model import DeepSeekV3, MTPModule, embed_lookup, init_cache
from dsv3_jax.sampling import (
    accept_greedy,
    accept_sampled,
    nucleus_probs,
    sample_from,
    sample_token,
)


def cache_length(prompt_width: int, max_new_tokens: int, drafts: int) -> int:
    """Slots per sequence: the prompt, the new tokens, and room for a verify window and the
    drafts past the last token of a sequence that has already finished."""
    return prompt_width + max_new_tokens + 2 * drafts + 1


def _mtp_step(c: ModelConfig, variables, k, h, ids, positions, index, cache):
    """MTP module k outside DeepSeekV3 (its variables `mtp_k`): h [B, T, D] and the ids
    t_{i+k+1} [B, T] at positions [B, T] → (h^{k+1} [B, T, D], its cache written at index)."""
    name = f"mtp_{k}"
    own = {col: tree[name] for col, tree in variables.items() if name in tree}
    bias = variables["moe_bias"]["e_score_correction_bias"][c.num_moe_layers + k]
    emb = embed_lookup(variables["params"]["embed_tokens"], ids, c)
    h, cache, _, _ = MTPModule(c, absorb=True).apply(own, h, emb, positions, index, bias, cache)
    return h, cache


def _head(c: ModelConfig, variables, h):
    """The shared output head: [B, T, D] → float32 logits [B, T, V]."""
    head = Einsum((c.hidden_size, c.vocab_size), ("embed", "vocab"), c, out_dtype="float32",
                  fp8=False)
    return head.apply({"params": variables["params"]["lm_head"]}, "BTD,DV->BTV", h)


def speculative_loop(c: ModelConfig, variables, prompt, lengths, max_new_tokens: int, stop_ids,
                     drafts: int, greedy: bool, temperature, top_p, rng):
    """The decode loop of `generate(..., speculative=True)` (see the module docstring).

    Args:
      prompt: [B, T] right-padded prompts; lengths: [B] their lengths.
      stop_ids: [E] end-of-sequence ids (−1 entries: padding, no token).
      drafts: K, drafted tokens per round (≥ 1; past num_nextn_predict_layers chains the last).
      greedy: argmax verification; else speculative sampling at temperature/top_p with rng.
    Returns:
      (tokens [B, S], last [B], forwards [B], drafted [B], accepted [B], by_position [B, K],
      cache): the token buffer with the prompt and the continuation from position L_b, the
      position of each row's newest token, per row the main-model forwards, drafts and
      accepted drafts while active, per row and draft position k the rounds that accepted
      draft k (a > k; summed over k: accepted), and the final caches (main cache valid below
      `last`).
    """
    K = drafts
    D = min(c.num_nextn_predict_layers, K)  # modules used; fewer drafts leave the rest idle
    W = K + D
    B, T = prompt.shape
    S = cache_length(T, max_new_tokens, K)
    rows = jnp.arange(B)
    model = DeepSeekV3(c)
    is_stop = lambda t: (t[..., None] == stop_ids).any(-1)
    gather = lambda buf, idx: jnp.take_along_axis(buf, idx, axis=1, mode="clip")
    first_key, loop_key = (None, None) if greedy else jax.random.split(rng)

    out = model.apply(variables, prompt, cache=init_cache(c, B, S), cache_index=0, absorb=False,
                      mtp=True)
    first = sample_token(out.logits[rows, lengths - 1], first_key, temperature, top_p)
    tokens = jnp.zeros((B, S), jnp.int32).at[:, :T].set(prompt).at[rows, lengths].set(first)
    hidden = jnp.zeros((B, S, c.hidden_size), out.hidden.dtype).at[:, :T].set(out.hidden)
    count = jnp.zeros((B,), jnp.int32)
    weights, cache, forward = unstacked.for_decoding(c, variables, out.cache)  # once
    state = (jnp.int32(0), tokens, hidden, cache, lengths,
             is_stop(first) | (max_new_tokens == 1), count + 1, count,
             jnp.zeros((B, K), jnp.int32))

    def draft(tokens, hidden, mtp_cache, last, key):
        """K drafts written into tokens at last+1..last+K; their distributions [B, K, V]."""
        start = jnp.maximum(last - W, 0)  # the window [start, start+W) ends at last−1
        window = start[:, None] + jnp.arange(W)  # [B, W]
        at = (last - 1 - start)[:, None, None]  # the draft position within the window
        h = gather(hidden, window[..., None])
        layers, q = [], []
        for k in range(K):
            if k < D:
                layer = jax.tree.map(lambda a, k=k: a[k], mtp_cache)
                h, layer = _mtp_step(c, variables, k, h, gather(tokens, window + k + 1), window,
                                     start, layer)
                layers.append(layer)
                h_at = jnp.take_along_axis(h, at, axis=1)  # [B, 1, D]
            else:
                h_at, _ = _mtp_step(c, variables, D - 1, h_at, gather(tokens, last[:, None] + k),
                                    last[:, None] - 1, last - 1, layers[-1])
            logits = _head(c, variables, h_at)[:, 0]
            if greedy:
                d = sample_token(logits, None, temperature, top_p)
            else:
                q.append(nucleus_probs(logits, temperature, top_p))
                d = sample_from(q[-1], jax.random.fold_in(key, k))
            tokens = tokens.at[rows, last + k + 1].set(d, mode="drop")
        mtp_cache = jax.tree.map(lambda old, *new: old.at[:D].set(jnp.stack(new)), mtp_cache,
                                 *layers)
        return tokens, mtp_cache, q

    def round_(state):
        i, tokens, hidden, cache, last, done, forwards, drafted, by_position = state
        key = None if greedy else jax.random.fold_in(loop_key, i)
        draft_key, accept_key = (None, None) if greedy else jax.random.split(key)
        tokens, mtp_cache, q = draft(tokens, hidden, cache["mtp"], last, draft_key)
        verify = last[:, None] + jnp.arange(K + 1)  # [B, K+1] positions n..n+K
        fed = gather(tokens, verify)  # t_n, d_1..d_K
        out = forward(weights, fed, verify, cache, last)
        if greedy:
            a, new = accept_greedy(fed[:, 1:], out.logits)
        else:
            p = nucleus_probs(out.logits, temperature, top_p)
            a, new = accept_sampled(fed[:, 1:], jnp.stack(q, axis=1), p, accept_key)
        active = ~done
        keep = lambda idx: jnp.where(active[:, None], idx, S)  # out of range: dropped
        tokens = tokens.at[rows[:, None], keep(verify + 1)].set(new, mode="drop")
        hidden = hidden.at[rows[:, None], keep(verify)].set(out.hidden, mode="drop")
        stopped = (is_stop(new) & (jnp.arange(K + 1) <= a[:, None])).any(-1)
        last = jnp.where(active, last + a + 1, last)
        done = done | stopped | (last - lengths + 1 >= max_new_tokens)
        cache = {**out.cache, "mtp": mtp_cache}
        took = (jnp.arange(K) < a[:, None]) & active[:, None]  # [B, K]: draft k accepted
        return (i + 1, tokens, hidden, cache, last, done, forwards + active,
                drafted + K * active, by_position + took)

    state = jax.lax.while_loop(lambda s: (s[0] < max_new_tokens) & ~s[5].all(), round_, state)
    _, tokens, _, cache, last, _, forwards, drafted, by_position = state
    return (tokens, last, forwards, drafted, by_position.sum(-1), by_position,
            unstacked.restack_cache(cache))
