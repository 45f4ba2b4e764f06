"""The decode layout (`dsv3_jax.unstacked`): per-layer weights and caches give what the scanned
`DeepSeekV3` gives — logits, hidden states, expert counts, balance loss and the written cache —
for a prefill (full MLA path, one cache index) and a decode step (absorbed path, one index per
row), with dense and MoE stacks, without either, and under the delayed FP8 recipe; and generate
takes the same tokens whether its decode loop splits the stacks or not."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_generate import NEW, PROMPTS, random_variables

from dsv3_jax import (
    DeepSeekV3,
    ModelConfig,
    decode,
    generate,
    init_cache,
    init_variables,
    unstacked,
)
from dsv3_jax.layers import ABSORBED

TINY = ModelConfig.preset("tiny")
CONFIGS = {
    "dense+moe": TINY,
    "moe only, fp8 delayed": TINY.replace(first_k_dense_replace=0, fp8="delayed"),
    "dense only": TINY.replace(first_k_dense_replace=TINY.num_hidden_layers,
                               num_nextn_predict_layers=0),
    "no q compression": TINY.replace(q_lora_rank=None),
}


def close(got, want, what):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    # the same operations on the same buffers: equal up to XLA's fusion choices (measured: 0)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max(initial=1),
                               err_msg=what)


@pytest.mark.parametrize("name, B", [(name, 3) for name in CONFIGS] + [("dense+moe", 1)])
def test_unstacked_forward_equals_the_scanned_model(name, B):
    """B = 1: the per-layer caches drop their batch axis (`LatentCache.squeeze`). Without an
    FP8 recipe the step reads the layers' decode kernels (`layers.ABSORBED`: the absorbed
    products' heads-first copies, the projections of one input as one kernel, with and without
    q compression), the scanned model the stored kernels."""
    c = CONFIGS[name]
    T, S = 6, 12
    variables = flax.core.unfreeze(nn.unbox(init_variables(c, jax.random.key(0))))
    bias = variables["moe_bias"]["e_score_correction_bias"]  # distinct per layer: selection moves
    variables["moe_bias"]["e_score_correction_bias"] = jax.random.normal(jax.random.key(2),
                                                                         bias.shape)
    layers = unstacked.unstack_variables(c, variables)
    assert len(layers.dense) == c.num_dense_layers and len(layers.moe) == c.num_moe_layers
    assert all((ABSORBED in layer) == (c.fp8 == "none") for layer in layers.dense + layers.moe)
    net = DeepSeekV3(c)
    tokens = jax.random.randint(jax.random.key(1), (B, T + 1), 0, c.vocab_size)
    index = jnp.array([T, T - 2, T - 5][:B], jnp.int32)  # one place per row for the step

    @jax.jit
    def scanned(variables):
        pre = net.apply(variables, tokens[:, :T], cache=init_cache(c, B, S), cache_index=0,
                        mtp=False)
        step = net.apply(variables, tokens[:, T:], cache=pre.cache, cache_index=index,
                         absorb=True, mtp=False)
        return pre, step

    @jax.jit
    def per_layer(layers):
        pre = unstacked.forward(c, layers, tokens[:, :T],
                                cache=unstacked.unstack_cache(init_cache(c, B, S)),
                                cache_index=jnp.int32(0), absorb=False)
        step = unstacked.forward(c, layers, tokens[:, T:], cache=pre.cache, cache_index=index)
        return pre, step

    want, got = scanned(variables), per_layer(layers)
    per_layer_caches = [got[1].cache[k] for k in ("dense", "moe") if k in got[1].cache]
    assert all(leaf.ndim == (2 if B == 1 else 3) for leaf in jax.tree.leaves(per_layer_caches))
    for phase, w, g in zip(("prefill", "step"), want, got):
        for field in ("logits", "hidden", "expert_counts", "balance_loss"):
            close(getattr(g, field), getattr(w, field)[:len(getattr(g, field))]
                  if field == "expert_counts" else getattr(w, field), f"{phase} {field}")
        assert g.expert_counts.shape == (c.num_moe_layers, c.n_routed_experts)
        restacked = unstacked.restack_cache(g.cache)
        assert set(restacked) == set(w.cache)
        for key in w.cache:
            for field in ("c_kv", "k_pe"):
                close(getattr(restacked[key], field), getattr(w.cache[key], field),
                      f"{phase} cache {key}.{field}")
    with pytest.raises(TypeError, match="unstack_cache"):  # a stacked cache: a clear error
        unstacked.forward(c, layers, tokens[:, T:], cache=init_cache(c, B, S), cache_index=index)
    with pytest.raises(TypeError, match="unstack_variables"):
        unstacked.forward(c, variables, tokens[:, T:], cache=got[1].cache, cache_index=index)
    if c.num_moe_layers:  # the routing is exercised: the step's tokens chose experts
        assert int(got[1].expert_counts.sum()) == c.num_moe_layers * B * c.num_experts_per_tok


@pytest.mark.parametrize("speculative, rows", [(False, None), (True, None), (False, 1),
                                                (True, 1)])
def test_generate_takes_the_same_tokens_with_and_without_the_split(monkeypatch, speculative,
                                                                   rows):
    """Decode loops split the stacks on XLA:CPU only (`unstacked.for_decoding`); the stacked
    path accelerators take gives the same greedy tokens and the same forwards and acceptance.
    One prompt: the split caches drop their batch axis."""
    variables = random_variables(TINY)
    prompts = PROMPTS[:rows]
    results = []
    for split in (True, False):
        monkeypatch.setattr(unstacked, "split_pays", lambda split=split: split)
        decode._generate.clear_cache()  # the choice is made at trace time
        results.append(generate(TINY, variables, prompts, NEW, speculative=speculative,
                                return_result=True))
    split, stacked = results
    for field in ("sequences", "lengths", "forwards", "drafted", "accepted"):
        np.testing.assert_array_equal(getattr(split, field), getattr(stacked, field),
                                      err_msg=field)
    assert (np.asarray(split.lengths) == NEW).all()
