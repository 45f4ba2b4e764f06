"""The few-token MoE kernel (`dsv3_jax/few_token_moe.py`): one call for a decode step's MoE
layer, against a float64 loop of REFERENCE §3 and against the XLA path `moe.MoE` otherwise
takes (outputs, counts, balance loss and gradients)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import ModelConfig, cpu_kernels, few_token_moe, moe
from dsv3_jax.moe import MoE

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler")


def _loop(x, router, bias, gate, up, down, shared, c, norm=None):
    """float64, one token and one expert at a time: (y, experts, scores); the tokens through
    an RMSNorm of weight `norm` first when given."""
    f64 = lambda a: np.asarray(a, np.float64)
    x, router, bias, gate, up, down = map(f64, (x, router, bias, gate, up, down))
    if norm is not None:
        x = x / np.sqrt((x ** 2).mean(1, keepdims=True) + c.rms_norm_eps) * f64(norm)
    E, G, K = c.n_routed_experts, c.n_group, c.num_experts_per_tok
    silu = lambda z: z / (1 + np.exp(-z))
    swiglu = lambda h, g, u, d: (silu(h @ g) * (h @ u)) @ d
    ys, chosen, all_scores = [], [], []
    for h in x:
        s = 1 / (1 + np.exp(-(h @ router)))
        sel = s + bias
        if G > 1:
            groups = sel.reshape(G, E // G)
            top = min(2, E // G)
            score = -np.sort(-groups, axis=1)[:, :top].sum(1)
            kept = np.argsort(-score, kind="stable")[:c.topk_group]
            sel = np.where(np.repeat(np.isin(np.arange(G), kept), E // G), sel, -np.inf)
        idx = np.argsort(-sel, kind="stable")[:K]
        w = s[idx] / (s[idx].sum() + 1e-20) if c.norm_topk_prob else s[idx]
        w = w * c.routed_scaling_factor
        y = sum(wk * swiglu(h, gate[e], up[e], down[e]) for e, wk in zip(idx, w))
        if shared is not None:
            y = y + swiglu(h, *map(f64, shared))
        ys.append(y)
        chosen.append(idx)
        all_scores.append(s)
    return np.array(ys), np.array(chosen), np.array(all_scores)


def _operands(c, N, seed=0, layers=None):
    D, E, F = c.hidden_size, c.n_routed_experts, c.moe_intermediate_size
    S = c.n_shared_experts * F
    k = jax.random.split(jax.random.key(seed), 9)
    lead = () if layers is None else (layers,)
    n = lambda i, shape, s=0.3: jax.random.normal(k[i], shape) * s
    return (n(0, (N, D), 1.0), n(1, (D, E)), n(2, (E,), 0.2), n(3, lead + (E, D, F)),
            n(4, lead + (E, D, F)), n(5, lead + (E, F, D)),
            n(6, (D, S)), n(7, (D, S)), n(8, (S, D)))


CONFIGS = {  # odd sizes: D, F, S not multiples of the 8 vector lanes; E/G of 1 and 2
    "grouped": dict(hidden_size=36, moe_intermediate_size=20, n_routed_experts=16,
                    num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1),
    "one_group_unnormalized": dict(hidden_size=40, moe_intermediate_size=24,
                                   n_routed_experts=12, num_experts_per_tok=3, n_group=1,
                                   topk_group=1, n_shared_experts=0, norm_topk_prob=False),
    # kernels of 200 KB: three chunks each for an expert of at most 8 rows (`kChunkBytes`)
    "chunked": dict(hidden_size=256, moe_intermediate_size=200, n_routed_experts=8,
                    num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1),
    "one_expert_groups": dict(hidden_size=64, moe_intermediate_size=72, n_routed_experts=8,
                              num_experts_per_tok=2, n_group=8, topk_group=3,
                              n_shared_experts=2, routed_scaling_factor=1.0),
}


@pytest.mark.parametrize("name, tokens, layers, normed", [
    ("grouped", 1, None, False), ("grouped", 64, 3, True),
    ("one_group_unnormalized", 5, None, True), ("one_expert_groups", 9, 2, False),
    ("chunked", 3, None, True), ("chunked", 40, 2, False)])
def test_kernel_matches_a_float64_loop(name, tokens, layers, normed):
    """Experts exactly, scores and outputs to max |Δ| ≤ 1e-5 · max |y| (float32 sums of the
    chunked products; measured ~1e-7), with the kernels read from a layer of [L, …] stacks
    (the last layer) where `layers` is set, and the tokens through an RMSNorm in the call
    where `normed` (tokens of scales 1e-2 to 1e2)."""
    c = ModelConfig.preset("tiny", **CONFIGS[name])
    x, router, bias, gate, up, down, *shared = _operands(c, tokens, layers=layers)
    norm = None
    if normed:
        x = x * jnp.logspace(-2, 2, tokens)[:, None]
        norm = jax.random.uniform(jax.random.key(7), (c.hidden_size,), minval=.5, maxval=1.5)
    at = 0 if layers is None else layers - 1
    if c.n_shared_experts == 0:
        D = c.hidden_size
        shared = [jnp.zeros((D, 0)), jnp.zeros((D, 0)), jnp.zeros((0, D))]
    y, experts, scores = jax.jit(lambda *a: few_token_moe.layer(*a, config=c, norm=norm))(
        x, router, bias, gate, up, down, at, *shared)
    pick = (lambda w: w) if layers is None else (lambda w: w[at])
    ref_y, ref_experts, ref_scores = _loop(x, router, bias, pick(gate), pick(up), pick(down),
                                           shared if c.n_shared_experts else None, c, norm)
    np.testing.assert_array_equal(np.asarray(experts), ref_experts)
    np.testing.assert_allclose(np.asarray(scores), ref_scores, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(y), ref_y, rtol=0, atol=1e-5 * np.abs(ref_y).max())


def test_ties_take_the_lower_index_as_top_k_does():
    """A zero token scores every expert 0.5: with no bias every group ties and every expert
    ties; with the same bias on groups 1-3 those three tie for two places. The kernel picks
    what `moe.route` (jax.lax.top_k: the lower index first) picks."""
    c = ModelConfig.preset("tiny", **CONFIGS["grouped"])
    x, router, _, gate, up, down, *shared = _operands(c, 3)
    x = x.at[0].set(0.0)
    for bias in (jnp.zeros(c.n_routed_experts),
                 jnp.zeros(c.n_routed_experts).at[4:].set(0.25)):
        _, experts, _ = few_token_moe.layer(x, router, bias, gate, up, down, 0, *shared,
                                            config=c)
        logits = jnp.einsum("ND,DE->NE", x, router, precision="highest")
        np.testing.assert_array_equal(np.asarray(experts),
                                      np.asarray(moe.route(logits, bias, c).experts))
    assert list(np.asarray(experts[0])) == [4, 5, 6, 7]  # groups 1-3 tie: 1, 2 kept; 4-11 tie


@pytest.mark.parametrize("tokens", [1, 6])
def test_the_moe_layer_takes_the_kernel_and_keeps_the_xla_paths_numbers_and_gradients(
        tokens, monkeypatch):
    """`MoE` on a few float32 tokens runs one kernel call (in its jaxpr); its output, counts
    and balance loss equal the XLA path's (the kernel switched off: `pays` False) and so do
    the gradients wrt params and input (the kernel's are the XLA path's by construction), to
    max |Δ| ≤ 1e-5 · max."""
    c = ModelConfig.preset("small")
    x = jax.random.normal(jax.random.key(0), (2, tokens, c.hidden_size))
    bias = jax.random.uniform(jax.random.key(1), (c.n_routed_experts,), minval=-.3, maxval=.3)
    params = nn.unbox(MoE(c).init(jax.random.key(2), x, bias))["params"]
    params = jax.tree.map(lambda a: a * 8, params)
    probe = jax.random.normal(jax.random.key(3), x.shape)

    def run():
        fwd = lambda p, x: MoE(c).apply({"params": p}, x, bias)
        loss = lambda p, x: (fwd(p, x)[0] * probe).sum() + fwd(p, x)[2]
        return (jax.jit(fwd)(params, x), jax.jit(jax.grad(loss, (0, 1)))(params, x),
                str(jax.make_jaxpr(fwd)(params, x)))

    (y, counts, balance), grads, jaxpr = run()
    assert jaxpr.count("dsv3_few_token_moe") == 1
    monkeypatch.setattr(few_token_moe, "pays", lambda *a: False)
    (y_x, counts_x, balance_x), grads_x, jaxpr_x = run()
    assert "dsv3_few_token_moe" not in jaxpr_x
    np.testing.assert_array_equal(np.asarray(counts), np.asarray(counts_x))
    np.testing.assert_allclose(float(balance), float(balance_x), rtol=1e-6)
    for a, b in zip(jax.tree.leaves((y, grads)), jax.tree.leaves((y_x, grads_x)), strict=True):
        b = np.asarray(b)
        np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=1e-5 * np.abs(b).max())


def test_when_the_kernel_runs_and_bad_operands():
    """`pays`: 1..MAX_TOKENS float32 tokens, dropless, no FP8 recipe, grouped GEMMs chosen;
    operands of the wrong shapes are refused by name."""
    c = ModelConfig.preset("tiny", **CONFIGS["grouped"])
    f32, bf16 = jnp.zeros((1,), jnp.float32), jnp.zeros((1,), jnp.bfloat16)
    assert few_token_moe.pays(1, c, f32) and few_token_moe.pays(few_token_moe.MAX_TOKENS, c, f32)
    assert not few_token_moe.pays(few_token_moe.MAX_TOKENS + 1, c, f32)
    assert not few_token_moe.pays(0, c, f32) and not few_token_moe.pays(1, c, f32, bf16)
    for other in (dict(fp8="delayed"), dict(capacity_factor=1.0), dict(moe_impl="blocks")):
        assert not few_token_moe.pays(1, dataclasses.replace(c, **other), f32)
    x, router, bias, gate, up, down, *shared = _operands(c, 2)
    with pytest.raises(ValueError, match="few_token_moe.layer: .*expected"):
        few_token_moe.layer(x, router.T, bias, gate, up, down, 0, *shared, config=c)
    with pytest.raises(ValueError, match="few_token_moe.layer: .*expected"):
        few_token_moe.layer(x, router, bias, gate, up, up, 0, *shared, config=c)
