"""generate(): batched prefill + absorbed-cache decoding, stop tokens, speculative decoding.

Prompts of different lengths share one batch right-padded: row b holds its L_b prompt tokens at
positions 0..L_b−1 and continues from position L_b, its own cache index (`cache_index` is [B]),
so each row computes what it would alone (the prefill's causal mask keeps the padding out of the
prompt; the padded slots of the cache are overwritten before any query can see them). A row
that emits an end-of-sequence id, or reaches max_new_tokens, stops changing; the loop stops
when every row has.

The prefill runs the full MLA path over the prompts and writes the latent cache; each plain
step feeds one token per row through the absorbed path (the cache holds only c_kv and k_pe),
on XLA:CPU over per-layer weights and caches split from the stacks once
(`dsv3_jax.unstacked.for_decoding`).
`speculative=True` instead drafts with the MTP modules and verifies K+1 positions per main-model
forward (`dsv3_jax.speculative`). Either loop is a `lax.while_loop` inside one jitted function,
keyed by (config, prompt shape, max_new_tokens, greedy or not, drafts per round).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax import unstacked
from dsv3_jax.config import ModelConfig
from dsv3_jax.model import DeepSeekV3, init_cache
from dsv3_jax.sampling import sample_token
from dsv3_jax.speculative import speculative_loop

__all__ = ["Generation", "generate", "sample_token"]


@flax.struct.dataclass
class Generation:
    """What `generate(..., return_result=True)` returns. B rows; T the prompt array's width."""

    sequences: jax.Array  # [B, T + max_new] int32: prompt, continuation, then pad_token_id
    tokens: jax.Array  # [B, max_new] int32: the continuation, then pad_token_id
    lengths: jax.Array  # [B] int32 new tokens per row (an end-of-sequence id included)
    prompt_lengths: jax.Array  # [B] int32
    forwards: jax.Array  # [B] int32 main-model forwards while the row was generating (prefill: 1)
    drafted: jax.Array  # [B] int32 tokens drafted by the MTP modules (0 without speculation)
    accepted: jax.Array  # [B] int32 drafted tokens the main model accepted
    # [B, K] int32: per draft position k (0-based) the rounds whose draft k was accepted, i.e.
    # that accepted more than k drafts (sums to `accepted`); [B, 0] without speculation
    accepted_by_position: jax.Array

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted tokens over the batch (nan without speculation)."""
        drafted = int(self.drafted.sum())
        return int(self.accepted.sum()) / drafted if drafted else math.nan

    @property
    def acceptance_by_position(self) -> list[float]:
        """Over the batch, per draft position k: P(draft k accepted | drafts before it were),
        the rounds that accepted draft k over those that reached it (nan where none did)."""
        counts = np.asarray(self.accepted_by_position).sum(0)
        K = len(counts)
        if K == 0:
            return []
        reached = np.concatenate([[int(self.drafted.sum()) // K], counts[:-1]])
        return [float(a / r) if r else math.nan for a, r in zip(counts, reached)]

    @property
    def tokens_per_forward(self) -> float:
        """New tokens per main-model forward over the batch (1.0 for plain decoding)."""
        return int(self.lengths.sum()) / int(self.forwards.sum())

    def token_lists(self) -> list[list[int]]:
        """Each row's new tokens, without padding."""
        tokens = np.asarray(self.tokens)
        return [tokens[b, :n].tolist() for b, n in enumerate(np.asarray(self.lengths))]


def _plain_loop(c: ModelConfig, variables, prompt, lengths, max_new_tokens: int, stop_ids,
                greedy: bool, temperature, top_p, rng):
    """One token per row per absorbed-cache forward; returns what `speculative_loop` does."""
    B, T = prompt.shape
    S = T + max_new_tokens
    rows = jnp.arange(B)
    model = DeepSeekV3(c)
    is_stop = lambda t: (t[..., None] == stop_ids).any(-1)
    keys = None if greedy else jax.random.split(rng, max_new_tokens)
    out = model.apply(variables, prompt, cache=init_cache(c, B, S), cache_index=0, absorb=False,
                      mtp=False)
    first = sample_token(out.logits[rows, lengths - 1], None if greedy else keys[0], temperature,
                         top_p)
    tokens = jnp.zeros((B, S), jnp.int32).at[:, :T].set(prompt).at[rows, lengths].set(first)
    weights, cache, forward = unstacked.for_decoding(c, variables, out.cache)  # once
    state = (jnp.int32(1), tokens, cache, lengths, is_stop(first) | (max_new_tokens == 1),
             jnp.ones((B,), jnp.int32))

    def step(state):
        i, tokens, cache, last, done, forwards = state
        fed = tokens[rows, last][:, None]
        out = forward(weights, fed, last[:, None], cache, last)
        nxt = sample_token(out.logits[:, 0], None if greedy else keys[i], temperature, top_p)
        active = ~done
        tokens = tokens.at[rows, jnp.where(active, last + 1, S)].set(nxt, mode="drop")
        last = last + active
        done = done | is_stop(nxt) | (last - lengths + 1 >= max_new_tokens)
        return i + 1, tokens, out.cache, last, done, forwards + active

    state = jax.lax.while_loop(lambda s: (s[0] < max_new_tokens) & ~s[4].all(), step, state)
    _, tokens, _, last, _, forwards = state
    zeros = jnp.zeros((B,), jnp.int32)
    return tokens, last, forwards, zeros, zeros


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "greedy", "drafts"))
def _generate(config, variables, prompt, lengths, stop_ids, pad_id, temperature, top_p, rng, *,
              max_new_tokens, greedy, drafts):
    args = (config, variables, prompt, lengths, max_new_tokens, stop_ids)
    if drafts:
        tokens, last, forwards, drafted, accepted, by_position, _ = speculative_loop(
            *args, drafts, greedy, temperature, top_p, rng)
    else:
        tokens, last, forwards, drafted, accepted = _plain_loop(*args, greedy, temperature,
                                                                top_p, rng)
        by_position = jnp.zeros((prompt.shape[0], 0), jnp.int32)
    B, T = prompt.shape
    j = jnp.arange(max_new_tokens)
    new = jnp.take_along_axis(tokens, lengths[:, None] + j, axis=1, mode="clip")
    count = jnp.minimum(last - lengths + 1, max_new_tokens)  # a round may overshoot
    stop = (new[..., None] == stop_ids).any(-1) & (j < count[:, None])
    count = jnp.where(stop.any(-1), jnp.argmax(stop, axis=-1) + 1, count)
    k = jnp.arange(T + max_new_tokens)
    return Generation(
        sequences=jnp.where(k < (lengths + count)[:, None], tokens[:, :T + max_new_tokens],
                            pad_id),
        tokens=jnp.where(j < count[:, None], new, pad_id),
        lengths=count, prompt_lengths=lengths, forwards=forwards, drafted=drafted,
        accepted=accepted, accepted_by_position=by_position)


def _pack(prompts, lengths) -> tuple[np.ndarray, np.ndarray]:
    """(right-padded prompts [B, T] int32, lengths [B] int32) from either accepted form."""
    if isinstance(prompts, (list, tuple)) and prompts and all(
            isinstance(p, (list, tuple, np.ndarray, jax.Array)) for p in prompts):
        if lengths is not None:
            raise ValueError("lengths is for a [batch, length] prompt array, not a list of "
                             "prompts")
        rows = [np.asarray(p).reshape(-1) for p in prompts]
        for b, row in enumerate(rows):
            if len(row) == 0:
                raise ValueError(f"prompt {b} is empty: every prompt needs at least one token")
            if not np.issubdtype(row.dtype, np.integer):
                raise ValueError(f"prompt {b} must hold integer token ids; got {row.dtype}")
        lengths = np.array([len(r) for r in rows])
        packed = np.zeros((len(rows), lengths.max()), np.int64)
        for b, row in enumerate(rows):
            packed[b, :len(row)] = row
        return packed, lengths
    packed = np.asarray(prompts)
    if packed.ndim != 2 or packed.shape[0] < 1 or packed.shape[1] < 1 or not np.issubdtype(
            packed.dtype, np.integer):
        raise ValueError(f"prompt_tokens must be an integer array [batch>=1, length>=1] or a "
                         f"list of token lists; got shape {packed.shape} dtype {packed.dtype}")
    if lengths is None:
        return packed, np.full((packed.shape[0],), packed.shape[1])
    lengths = np.asarray(lengths)
    if (lengths.shape != (packed.shape[0],) or not np.issubdtype(lengths.dtype, np.integer)
            or lengths.min() < 1 or lengths.max() > packed.shape[1]):
        raise ValueError(f"lengths must be {packed.shape[0]} integers in [1, "
                         f"{packed.shape[1]}] (one per prompt row); got {lengths.tolist()}")
    return packed, lengths


def _token_ids(value, name: str, vocab: int) -> tuple[int, ...]:
    ids = (value,) if isinstance(value, (int, np.integer)) else tuple(value)
    if not ids or not all(isinstance(t, (int, np.integer)) and 0 <= t < vocab for t in ids):
        raise ValueError(f"{name} must be an int or a non-empty list of ints in [0, {vocab}); "
                         f"got {value!r}")
    return tuple(int(t) for t in ids)


def generate(config: ModelConfig, variables, prompt_tokens, max_new_tokens: int, *,
             lengths=None, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None, temperature: float = 0.0, top_p: float = 1.0,
             rng: jax.Array | None = None, speculative: bool = False,
             draft_tokens: int | None = None, return_result: bool = False):
    """Autoregressive generation with the latent (absorbed MLA) cache.

    Args:
      config: the model's ModelConfig.
      variables: {'params', 'moe_bias'} (boxed or plain).
      prompt_tokens: [B, T] int token ids (with `lengths` for prompts shorter than T: row b's
        prompt is its first lengths[b] ids), or a list of B non-empty token-id lists.
      max_new_tokens: at most this many new tokens per prompt (>= 1).
      lengths: [B] prompt lengths for an array prompt; default T for every row.
      eos_token_id: an id or ids that end a sequence (the id is kept, then padding).
      pad_token_id: fills each row after its end; default the first eos_token_id, else 0.
      temperature: 0 for greedy decoding; > 0 samples (requires `rng`).
      top_p: nucleus mass in (0, 1].
      rng: a PRNG key, required when temperature > 0.
      speculative: draft with the model's MTP modules and verify several tokens per main-model
        forward; greedy output is the same tokens, sampled output the same distribution.
      draft_tokens: drafts per round with `speculative` (default num_nextn_predict_layers;
        more chains the last MTP module).
      return_result: return a `Generation` (per-row tokens and lengths, forwards and the
        acceptance rate) instead of the sequences array.
    Returns:
      [B, T + max_new_tokens] int32: each prompt, its new tokens, then pad_token_id — with
      prompts of one length and no eos_token_id exactly the prompts followed by max_new_tokens
      new tokens; or the `Generation` holding it, with return_result=True.
    """
    prompt, lengths = _pack(prompt_tokens, lengths)
    V = config.vocab_size
    valid = np.arange(prompt.shape[1]) < lengths[:, None]
    low, high = int(prompt[valid].min()), int(prompt[valid].max())
    if low < 0 or high >= V:
        raise ValueError(f"prompt token ids must be in [0, {V}); got range [{low}, {high}]")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1; got {max_new_tokens!r}")
    total = int(lengths.max()) + max_new_tokens
    if total > config.max_position_embeddings:
        raise ValueError(f"prompt length {int(lengths.max())} + max_new_tokens {max_new_tokens}"
                         f" = {total} exceeds the model's max_position_embeddings="
                         f"{config.max_position_embeddings}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0; got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1]; got {top_p}")
    greedy = temperature == 0
    if not greedy and rng is None:
        raise ValueError("temperature > 0 samples and needs rng=jax.random.key(...)")
    stop = () if eos_token_id is None else _token_ids(eos_token_id, "eos_token_id", V)
    if pad_token_id is None:
        pad_token_id = stop[0] if stop else 0
    elif not isinstance(pad_token_id, (int, np.integer)):
        raise ValueError(f"pad_token_id must be an int; got {pad_token_id!r}")
    drafts = 0
    if speculative:
        if config.num_nextn_predict_layers == 0:
            raise ValueError("speculative decoding drafts with the MTP modules, and this model "
                             "has none (num_nextn_predict_layers=0)")
        drafts = config.num_nextn_predict_layers if draft_tokens is None else draft_tokens
        if not isinstance(drafts, (int, np.integer)) or drafts < 1:
            raise ValueError(f"draft_tokens must be an integer >= 1; got {draft_tokens!r}")
    elif draft_tokens is not None:
        raise ValueError("draft_tokens needs speculative=True")
    # padded with -1 (no token) to a multiple of 8 ids: one jit for any count up to 8
    stop_ids = np.full((-(-max(len(stop), 1) // 8) * 8,), -1, np.int32)
    stop_ids[:len(stop)] = stop
    result = _generate(config, nn.unbox(variables), jnp.asarray(prompt, jnp.int32),
                       jnp.asarray(lengths, jnp.int32), jnp.asarray(stop_ids),
                       jnp.int32(pad_token_id), jnp.float32(max(temperature, 1e-6)),
                       jnp.float32(top_p), None if greedy else rng,
                       max_new_tokens=int(max_new_tokens), greedy=greedy, drafts=int(drafts))
    return result if return_result else result.sequences
