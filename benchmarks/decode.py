"""Decode time per token at a 2K context: absorbed latent cache vs the non-absorbed paths.

    python -m benchmarks.decode [--preset deepseek-v3-671b] [--context 2048] [--batch 1]

One MLA layer at the preset's attention sizes (the 671B preset's: 128 heads, C=512). Three ways
to attend one new token over `context` cached positions:
  * absorbed: cache c_kv + k_pe (576 values/token); W_kvb folded into query and output.
  * full (latent cache): same cache, but k and v re-expanded per head from c_kv every step.
  * full (per-head cache): the naive cache of k [N, H+R] and v [N, A] (40,960 values/token).
"""

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks.common import parse_config, positive_int, report, seconds_per_call
from dsv3_jax import kv_cache_bytes
from dsv3_jax.mla import MLA, LatentCache
from dsv3_jax.rope import softmax_scale


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="deepseek-v3-671b")
    parser.add_argument("--context", type=positive_int, default=2048)
    parser.add_argument("--batch", type=positive_int, default=1)
    args = parser.parse_args()
    c = parse_config(parser, "--preset", args.preset, dtype="float32", param_dtype="float32")
    B, S = args.batch, args.context
    mla = MLA(c)
    x1 = jax.random.normal(jax.random.key(0), (B, 1, c.hidden_size))
    pos1 = jnp.full((B, 1), S - 1)
    params = nn.unbox(jax.jit(mla.init)(jax.random.key(1), x1, pos1))
    k = jax.random.split(jax.random.key(2), 4)
    cache = LatentCache(jax.random.normal(k[0], (B, S, c.kv_lora_rank)),
                        jax.random.normal(k[1], (B, S, c.qk_rope_head_dim)))
    N, H, R, A = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
    k_cache = jax.random.normal(k[2], (B, S, N, H + R))
    v_cache = jax.random.normal(k[3], (B, S, N, A))

    absorbed = jax.jit(lambda p, x, cache: mla.apply(p, x, pos1, cache, S - 1, absorb=True)[0])
    p = params["params"]

    def query(p, x):  # q per head [B, 1, N, H+R] through the module's own projections
        q_nope, q_pe = mla.apply({"params": p}, x, pos1, method=MLA._query)  # BNTH, BTNR
        return jnp.concatenate([jnp.swapaxes(q_nope, 1, 2), q_pe], -1)

    def attend(q, k, v, p):
        probs = jax.nn.softmax(jnp.einsum("BTNK,BSNK->BNTS", q, k) * softmax_scale(c), -1)
        out = jnp.einsum("BNTS,BSNA->BTNA", probs, v)
        return jnp.einsum("BTNA,NAD->BTD", out, p["o_proj"]["kernel"])

    @jax.jit
    def full_latent(p, x, cache):
        k_nope = jnp.einsum("BSC,CNH->BSNH", cache.c_kv, p["kv_b_proj_k"]["kernel"])
        v = jnp.einsum("BSC,CNA->BSNA", cache.c_kv, p["kv_b_proj_v"]["kernel"])
        k_pe = jnp.broadcast_to(cache.k_pe[:, :, None], (B, S, N, R))
        return attend(query(p, x), jnp.concatenate([k_nope, k_pe], -1), v, p)

    full_per_head = jax.jit(lambda p, x, k, v: attend(query(p, x), k, v, p))

    t_abs = seconds_per_call(absorbed, params, x1, cache)
    t_lat = seconds_per_call(full_latent, p, x1, cache)
    t_mha = seconds_per_call(full_per_head, p, x1, k_cache, v_cache)
    cache_b = kv_cache_bytes(c, jnp.bfloat16)
    report(benchmark="mla_decode_per_token", preset=args.preset, context=S, batch=B,
           absorbed_ms=round(t_abs * 1e3, 3), full_latent_ms=round(t_lat * 1e3, 3),
           full_per_head_cache_ms=round(t_mha * 1e3, 3),
           full_latent_over_absorbed=round(t_lat / t_abs, 2),
           per_head_over_absorbed=round(t_mha / t_abs, 2),
           cache_bytes_per_token_bf16={"latent": int(cache_b),
                                       "per_head": cache_b.mha_equivalent},
           backend=jax.default_backend())


if __name__ == "__main__":
    main()
