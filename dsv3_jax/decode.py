"""generate(): one prefill, then one absorbed-cache decode step per token, all in one jit.

The prefill runs the full MLA path over the prompt and writes the latent cache; each later step
feeds one token through the absorbed path (the cache holds only c_kv and k_pe). The decode loop
is a `lax.fori_loop` inside the jitted function, so nothing is re-traced per token; the jit cache
is keyed by (config, prompt shape, max_new_tokens, greedy or not).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig
from dsv3_jax.model import DeepSeekV3, init_cache


def sample_token(logits: jax.Array, rng: jax.Array | None, temperature, top_p) -> jax.Array:
    """Next token [B] from logits [B, V]: argmax when rng is None, else nucleus sampling.

    Nucleus: keep the smallest set of most-likely tokens whose probability reaches top_p
    (always at least the most likely one), renormalize, sample at `temperature`.
    """
    if rng is None:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    sorted_logits = jnp.where(mass_before < top_p, sorted_logits, -jnp.inf)
    choice = jax.random.categorical(rng, sorted_logits, axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "greedy"))
def _generate(config, variables, prompt, max_new_tokens, greedy, temperature, top_p, rng):
    model = DeepSeekV3(config)
    B, T0 = prompt.shape
    total = T0 + max_new_tokens
    keys = None if greedy else jax.random.split(rng, max_new_tokens)

    out = model.apply(variables, prompt, cache=init_cache(config, B, total), cache_index=0,
                      absorb=False, mtp=False)
    first = sample_token(out.logits[:, -1], None if greedy else keys[0], temperature, top_p)
    tokens = jnp.zeros((B, total), jnp.int32).at[:, :T0].set(prompt).at[:, T0].set(first)

    def step(i, carry):
        tokens, cache = carry
        index = T0 + i  # position of the token being fed
        last = jax.lax.dynamic_slice_in_dim(tokens, index, 1, axis=1)
        out = model.apply(variables, last, cache=cache, cache_index=index, absorb=True,
                          mtp=False)
        nxt = sample_token(out.logits[:, -1], None if greedy else keys[i + 1], temperature,
                           top_p)
        return jax.lax.dynamic_update_slice_in_dim(tokens, nxt[:, None], index + 1, axis=1), \
            out.cache

    tokens, _ = jax.lax.fori_loop(0, max_new_tokens - 1, step, (tokens, out.cache))
    return tokens


def generate(config: ModelConfig, variables, prompt_tokens, max_new_tokens: int, *,
             temperature: float = 0.0, top_p: float = 1.0, rng: jax.Array | None = None):
    """Autoregressive generation with the latent (absorbed MLA) cache.

    Args:
      config: the model's ModelConfig.
      variables: {'params', 'moe_bias'} (boxed or plain).
      prompt_tokens: [B, T0] int token ids (all prompts the same length).
      max_new_tokens: tokens to generate per prompt (>= 1).
      temperature: 0 for greedy decoding; > 0 samples (requires `rng`).
      top_p: nucleus mass in (0, 1].
      rng: a PRNG key, required when temperature > 0.
    Returns:
      [B, T0 + max_new_tokens] int32: the prompts followed by the generated tokens.
    """
    prompt = jnp.asarray(prompt_tokens)
    if prompt.ndim != 2 or prompt.shape[1] < 1 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(f"prompt_tokens must be an integer array [batch, length>=1]; got "
                         f"shape {prompt.shape} dtype {prompt.dtype}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1; got {max_new_tokens!r}")
    total = prompt.shape[1] + max_new_tokens
    if total > config.max_position_embeddings:
        raise ValueError(f"prompt length + max_new_tokens = {total} exceeds the model's "
                         f"max_position_embeddings={config.max_position_embeddings}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0; got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1]; got {top_p}")
    greedy = temperature == 0
    if not greedy and rng is None:
        raise ValueError("temperature > 0 samples and needs rng=jax.random.key(...)")
    if int(prompt.min()) < 0 or int(prompt.max()) >= config.vocab_size:
        raise ValueError(f"prompt token ids must be in [0, {config.vocab_size}); got range "
                         f"[{int(prompt.min())}, {int(prompt.max())}]")
    variables = nn.unbox(variables)
    return _generate(config, variables, prompt.astype(jnp.int32), max_new_tokens, greedy,
                     jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p),
                     None if greedy else rng)
