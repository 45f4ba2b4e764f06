"""DeepSeekMoE: hand-worked routing, dropless vs a per-expert loop, capacity vs dropless."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import ModelConfig, moe
from dsv3_jax.moe import MoE, plan_slots, route, sequence_balance_loss


def _logit(p):
    return np.log(np.asarray(p) / (1 - np.asarray(p)))


def test_router_group_limited_with_negative_selection_scores():
    # 8 experts in 4 groups of 2, keep 2 groups, top-2 experts; bias -0.9 on every expert.
    #   s      = [.5 .4 | .3 .2 | .6 .1 | .2 .2]        (sigmoid of the logits)
    #   s_sel  = [-.4 -.5 | -.6 -.7 | -.3 -.8 | -.7 -.7]
    #   group score (sum of its top-2) = [-.9, -1.3, -1.1, -1.4] → keep groups 0 and 2
    #   kept experts: e0 -.4, e1 -.5, e4 -.3, e5 -.8 → top-2 = e4, e0
    #   Masking dropped groups with 0.0 (not −inf) would pick e2, e3 (0.0 > -0.3): wrong.
    #   weights from UNBIASED s: .6, .5 → /1.1 → .54545, .45455 → ×2.5 → 1.36364, 1.13636
    c = ModelConfig.preset("tiny", n_routed_experts=8, n_group=4, topk_group=2,
                           num_experts_per_tok=2)
    logits = jnp.asarray(_logit([[.5, .4, .3, .2, .6, .1, .2, .2]]), jnp.float32)
    r = route(logits, jnp.full((8,), -0.9), c)
    assert sorted(np.asarray(r.experts[0]).tolist()) == [0, 4]
    got = dict(zip(np.asarray(r.experts[0]).tolist(), np.asarray(r.weights[0]).tolist()))
    np.testing.assert_allclose([got[4], got[0]], [2.5 * .6 / 1.1, 2.5 * .5 / 1.1], rtol=1e-6)


def test_router_bias_changes_selection_but_not_weights():
    # 4 experts, 1 group, top-1. s = [.9 .8 .1 .1]; bias +0.2 on e1 → s_sel e1 = 1.0 > e0's .9:
    # e1 is chosen, and its weight is its unbiased .8 normalized alone → 1.0 × scaling 2.5.
    c = ModelConfig.preset("tiny", n_routed_experts=4, n_group=1, topk_group=1,
                           num_experts_per_tok=1)
    logits = jnp.asarray(_logit([[.9, .8, .1, .1]]), jnp.float32)
    r = route(logits, jnp.asarray([0., .2, 0., 0.]), c)
    assert int(r.experts[0, 0]) == 1
    np.testing.assert_allclose(float(r.weights[0, 0]), 2.5, rtol=1e-6)
    r = route(logits, jnp.zeros(4), dataclasses.replace(c, norm_topk_prob=False))
    assert int(r.experts[0, 0]) == 0
    np.testing.assert_allclose(float(r.weights[0, 0]), 2.5 * .9, rtol=1e-6)


def _numpy_route(logits, bias, c):
    """Loop reference of REFERENCE §3, one token at a time."""
    E, G, K = c.n_routed_experts, c.n_group, c.num_experts_per_tok
    experts, weights = [], []
    for row in logits:
        s = 1 / (1 + np.exp(-row.astype(np.float64)))
        sel = s + bias
        groups = sel.reshape(G, E // G)
        gscore = np.sort(groups, axis=1)[:, -2:].sum(1)
        kept = np.argsort(-gscore, kind="stable")[:c.topk_group]
        masked = np.full(E, -np.inf)
        for g in kept:
            masked[g * (E // G):(g + 1) * (E // G)] = sel[g * (E // G):(g + 1) * (E // G)]
        idx = np.argsort(-masked, kind="stable")[:K]
        w = s[idx] / (s[idx].sum() + 1e-20) * c.routed_scaling_factor
        experts.append(idx)
        weights.append(w)
    return np.array(experts), np.array(weights)


def _reference_moe(params, x, bias, c):
    """Per-token, per-expert loop: shared + Σ_k w_k·SwiGLU_{e_k}(x), NumPy float64."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    silu = lambda z: z / (1 + np.exp(-z))
    swiglu = lambda h, g, u, d: (silu(h @ g) * (h @ u)) @ d
    tokens = np.asarray(x, np.float64).reshape(-1, c.hidden_size)
    experts, weights = _numpy_route(tokens @ p["gate"]["kernel"], np.asarray(bias), c)
    ex, sh = p["experts"], p["shared_experts"]
    out = np.zeros_like(tokens)
    for n, h in enumerate(tokens):
        out[n] = swiglu(h, sh["gate_proj"]["kernel"], sh["up_proj"]["kernel"],
                        sh["down_proj"]["kernel"])
        for e, w in zip(experts[n], weights[n]):
            out[n] += w * swiglu(h, ex["gate_proj"]["kernel"][e], ex["up_proj"]["kernel"][e],
                                 ex["down_proj"]["kernel"][e])
    counts = np.bincount(experts.reshape(-1), minlength=c.n_routed_experts)
    return out.reshape(x.shape), counts


def _moe_setup(config, seed=0, B=2, T=24):
    x = jax.random.normal(jax.random.key(seed), (B, T, config.hidden_size))
    bias = jax.random.uniform(jax.random.key(seed + 1), (config.n_routed_experts,),
                              minval=-0.3, maxval=0.3)
    params = nn.unbox(MoE(config).init(jax.random.key(seed + 2), x, bias))["params"]
    # Larger weights than the init so that differences are visible above float noise.
    params = jax.tree.map(lambda a: a * 8, params)
    return params, x, bias


@pytest.mark.parametrize("block", [1, 4, 16, 64])  # 64: halved to 16 (`block_rows`)
def test_dropless_moe_matches_per_expert_loop(block):
    c = ModelConfig.preset("tiny", expert_block_size=block)
    params, x, bias = _moe_setup(c)
    y, counts, _ = jax.jit(lambda p, x, b: MoE(c).apply({"params": p}, x, b))(params, x, bias)
    ref, ref_counts = _reference_moe(params, x, bias, c)
    np.testing.assert_array_equal(np.asarray(counts), ref_counts)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_block_rows_shrink_to_an_experts_average_share():
    """Blocks no larger than N·K/E rows (halving, down to 16 or expert_block_size if smaller)."""
    small = ModelConfig.preset("small")  # block 256, 32 experts
    assert [moe.block_rows(n, small) for n in (16384, 8192, 8191, 4096, 2048, 64, 1)] == [
        256, 256, 128, 128, 64, 16, 16]
    assert moe.block_rows(1, small.replace(expert_block_size=8)) == 8
    assert moe.block_rows(1, small.replace(expert_block_size=24)) == 16
    assert moe.block_rows(10 ** 6, small.replace(expert_block_size=24)) == 24


def test_capacity_equals_dropless_without_overflow_and_drops_with_it():
    c = ModelConfig.preset("tiny")
    params, x, bias = _moe_setup(c, seed=3)
    run = lambda cfg: jax.jit(lambda p, x, b: MoE(cfg).apply({"params": p}, x, b))(
        params, x, bias)
    y_dropless, counts, _ = run(c)
    # capacity_factor E/K gives every expert room for all N tokens: nothing can overflow.
    cf = c.n_routed_experts / c.num_experts_per_tok
    y_cap, counts_cap, _ = run(dataclasses.replace(c, capacity_factor=cf))
    np.testing.assert_allclose(np.asarray(y_cap), np.asarray(y_dropless), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(counts_cap), np.asarray(counts))
    # A small capacity drops overflowing assignments: the output changes, counts do not.
    y_small, counts_small, _ = run(dataclasses.replace(c, capacity_factor=0.25))
    np.testing.assert_array_equal(np.asarray(counts_small), np.asarray(counts))
    assert float(jnp.abs(y_small - y_dropless).max()) > 1e-3


def test_slot_plan_places_every_assignment_once():
    experts = jnp.asarray([[0, 3], [3, 1], [3, 0], [2, 3]])
    plan = plan_slots(experts, 4, block=2)
    slots = np.asarray(plan.slot).reshape(-1)
    assert len(set(slots.tolist())) == slots.size  # no collisions
    token = np.asarray(plan.token)
    for n, k in np.ndindex(experts.shape):
        assert token[plan.slot[n, k]] == n
        assert plan.block_expert[plan.slot[n, k] // 2] == experts[n, k]
    np.testing.assert_array_equal(plan.counts, [2, 1, 1, 4])
    # capacity 2 drops the 3rd and 4th assignment to expert 3 (in token order).
    cap = plan_slots(experts, 4, capacity=2)
    assert int((np.asarray(cap.slot) == 8).sum()) == 2
    assert np.asarray(cap.slot)[3, 1] == 8 and np.asarray(cap.slot)[2, 0] == 8


def test_stable_order_is_numpys_stable_argsort():
    """expert_compute.stable_order (one sort of key·M + index) against NumPy's stable argsort:
    many ties, the left-out key num_keys, one row, and the argsort fallback where the packed
    keys would overflow int32."""
    from dsv3_jax.expert_compute import stable_order
    rng = np.random.default_rng(0)
    for M, E in [(1, 4), (37, 3), (8192, 16), (70_000, 40_000)]:  # the last falls back
        key = rng.integers(0, E + 1, size=M).astype(np.int32)
        got = np.asarray(jax.jit(stable_order, static_argnums=1)(jnp.asarray(key), E))
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, np.argsort(key, kind="stable"), err_msg=f"{M, E}")


def test_sequence_balance_loss_matches_formula():
    c = ModelConfig.preset("tiny", n_routed_experts=4, n_group=1, topk_group=1,
                           num_experts_per_tok=2)
    rng = np.random.default_rng(0)
    scores = rng.uniform(0.05, 1, size=(2 * 5, 4))
    experts = np.stack([rng.choice(4, 2, replace=False) for _ in range(10)])
    expected = 0.0
    for b in range(2):
        s, e = scores[b * 5:(b + 1) * 5], experts[b * 5:(b + 1) * 5]
        f = np.array([(e == i).any(1).sum() for i in range(4)]) * 4 / (2 * 5)
        p = (s / s.sum(1, keepdims=True)).mean(0)
        expected += (f * p).sum() / 2
    got = sequence_balance_loss(jnp.asarray(scores), jnp.asarray(experts), c, 2)
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)


@pytest.mark.parametrize("preset, B, T, path", [
    ("tiny", 1, 1, "sliced"), ("tiny", 1, 2, "chosen"), ("tiny", 2, 4, "dense"),
    ("small", 1, 4, "chosen"), ("small", 2, 5, "chosen"), ("small", 4, 8, "dense")])
def test_a_few_tokens_take_their_path_and_match_the_loop_and_blocks(preset, B, T, path,
                                                                    monkeypatch):
    """Decode-sized inputs take the few-token paths (`few_token_path`): "sliced" (one token's
    kernels indexed out), "chosen" (one pass per chosen expert,
    `expert_compute.chosen_swiglu`) and "dense" (every expert, masked). Outputs
    equal the per-expert loop, and outputs and gradients wrt params and input equal the
    dropless blocks path forced on the same tokens, each to max |Δ| ≤ 1e-5 · max (measured
    ≤ 1e-6). The params include experts no token chose: their gradients must be exactly 0.
    These paths run where the CPU grouped-GEMM kernel does not (bf16, a mesh, TPU/GPU): it is
    switched off here (`moe_impl` auto then picks blocks)."""
    from dsv3_jax import cpu_kernels
    monkeypatch.setattr(cpu_kernels, "runs_here", lambda *dtypes: False)
    c = ModelConfig.preset(preset)
    assert moe.few_token_path(B * T, c) == path
    assert moe.few_token_path(48, ModelConfig.preset("tiny")) is None  # other tests: blocks
    params, x, bias = _moe_setup(c, B=B, T=T)
    probe = jax.random.normal(jax.random.key(9), x.shape)

    def run():  # traced afresh: the monkeypatched choice applies
        fwd = lambda p, x: MoE(c).apply({"params": p}, x, bias)
        y, counts, _ = jax.jit(fwd)(params, x)
        grads = jax.jit(jax.grad(lambda p, x: (fwd(p, x)[0] * probe).sum(), (0, 1)))(params, x)
        return y, counts, grads

    y, counts, grads = run()
    ref, ref_counts = _reference_moe(params, x, bias, c)
    np.testing.assert_array_equal(np.asarray(counts), ref_counts)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    if path == "chosen":
        unchosen = ref_counts == 0
        assert unchosen.any()
        for kernel in ("gate_proj", "up_proj", "down_proj"):
            g = np.asarray(grads[0]["experts"][kernel]["kernel"])
            assert np.abs(g[unchosen]).max() == 0.0 and np.abs(g[~unchosen]).max() > 0
    monkeypatch.setattr(moe, "few_token_path", lambda tokens, config: None)
    y_blocks, _, grads_blocks = run()
    for a, b in zip(jax.tree.leaves((y, grads)), jax.tree.leaves((y_blocks, grads_blocks)),
                    strict=True):
        b = np.asarray(b)
        np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=1e-5 * np.abs(b).max())


def test_the_chosen_path_stays_out_of_shard_map(monkeypatch):
    """Inside shard_map the few-token choice skips "chosen" (its custom backward does not sum
    the kernels' gradients over the map's other axes) for the next path that fits (the CPU
    grouped-GEMM kernel, which outside shard_map takes few tokens itself, switched off)."""
    from dsv3_jax import cpu_kernels
    monkeypatch.setattr(cpu_kernels, "runs_here", lambda *dtypes: False)
    c = ModelConfig.preset("small")
    seen = []

    def traced(x):
        seen.append(moe.few_token_path(4, c))
        return x

    mesh = jax.make_mesh((1,), ("data",))
    jax.shard_map(traced, mesh=mesh, in_specs=jax.P(), out_specs=jax.P())(jnp.zeros(2))
    assert moe.few_token_path(4, c) == "chosen" and seen == ["dense"]


@pytest.mark.parametrize("preset, tokens, skewed", [
    ("tiny", 48, False), ("tiny", 48, True), ("small", 320, True), ("tiny", 2, False),
    ("small", 8, False)])
def test_ragged_equals_blocks_outputs_and_gradients(preset, tokens, skewed, monkeypatch):
    """moe_impl="ragged" (sorted rows through grouped GEMMs: the CPU kernel here, which also
    takes decode-sized inputs, 2 and 8 tokens) against "blocks" (padded blocks, one at a time):
    outputs and gradients wrt params and input agree to fp32 noise (max |Δ| ≤ 1e-5 ·
    max |blocks|). Skewed: a +10 bias on experts 0-3 (all in group 0) makes every token
    choose exactly experts 0-3, so expert 0 receives every token and the other E - 4 experts
    none (empty groups in the grouped GEMMs, no blocks but padding in the other)."""
    c = ModelConfig.preset(preset)
    params, x, bias = _moe_setup(c, B=2, T=tokens // 2)
    if skewed:
        bias = jnp.zeros(c.n_routed_experts).at[:4].set(10.0)
    probe = jax.random.normal(jax.random.key(9), x.shape)

    few_token_path = moe.few_token_path
    monkeypatch.setattr(moe, "few_token_path", lambda n, config: None)  # blocks: no few paths

    def run(impl):
        config = c.replace(moe_impl=impl)
        if impl == "ragged":
            assert few_token_path(tokens, config) is None
        fwd = lambda p, x: MoE(config).apply({"params": p}, x, bias)
        y, counts, _ = jax.jit(fwd)(params, x)
        grads = jax.jit(jax.grad(lambda p, x: (fwd(p, x)[0] * probe).sum(), (0, 1)))(params, x)
        return y, counts, grads

    y_b, counts_b, grads_b = run("blocks")
    y_r, counts_r, grads_r = run("ragged")
    np.testing.assert_array_equal(np.asarray(counts_r), np.asarray(counts_b))
    if skewed:
        assert int(counts_b[0]) == tokens and int((counts_b == 0).sum()) == c.n_routed_experts - 4
    np.testing.assert_allclose(np.asarray(y_r), np.asarray(y_b), rtol=0,
                               atol=1e-5 * float(np.abs(np.asarray(y_b)).max()))
    for a, b in zip(jax.tree.leaves(grads_r), jax.tree.leaves(grads_b), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0,
                                   atol=1e-5 * float(np.abs(np.asarray(b)).max()))


def test_moe_impl_choice_and_errors(caplog, monkeypatch):
    """auto: capacity when capacity_factor is set; on this CPU ragged (the grouped-GEMM kernel)
    for float32 on one device, else blocks: bf16 products, an FP8 recipe, a multi-device mesh,
    inside shard_map, or no kernel built (logged once per choice); explicit choices stand;
    contradictions and unknown names are refused by name."""
    from dsv3_jax import cpu_kernels, expert_compute
    resolve = expert_compute.resolve_moe_impl
    expert_compute._logged.clear()
    with caplog.at_level("INFO", logger="dsv3_jax.expert_compute"):
        assert resolve(ModelConfig.preset("tiny")) == "ragged"
        assert resolve(ModelConfig.preset("tiny")) == "ragged"
        assert resolve(ModelConfig.preset("tiny", dtype="bfloat16")) == "blocks"
    assert [r.getMessage() for r in caplog.records] == [
        "moe_impl='auto' runs the routed experts as 'ragged' on cpu",
        "moe_impl='auto' runs the routed experts as 'blocks' on cpu"]
    assert resolve(ModelConfig.preset("tiny", fp8="delayed")) == "blocks"
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    with jax.set_mesh(mesh):
        assert resolve(ModelConfig.preset("tiny")) == "blocks"
    one = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,),
                        devices=jax.devices()[:1])
    with jax.set_mesh(one):
        assert resolve(ModelConfig.preset("tiny")) == "ragged"
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    assert resolve(ModelConfig.preset("tiny")) == "blocks"
    assert expert_compute.resolve_moe_impl(
        ModelConfig.preset("tiny", capacity_factor=1.25)) == "capacity"
    assert expert_compute.resolve_moe_impl(ModelConfig.preset("tiny", moe_impl="ragged")) \
        == "ragged"
    with pytest.raises(ValueError, match=r"moe_impl='dense' is invalid: allowed: \('auto', "
                                         r"'blocks', 'ragged', 'capacity'\)"):
        ModelConfig.preset("tiny", moe_impl="dense")
    with pytest.raises(ValueError, match="'capacity' needs capacity_factor"):
        ModelConfig.preset("tiny", moe_impl="capacity")
    with pytest.raises(ValueError, match="capacity_factor=1.25 is invalid: is for moe_impl"):
        ModelConfig.preset("tiny", moe_impl="ragged", capacity_factor=1.25)
    with pytest.raises(ValueError, match="without an FP8 recipe"):
        ModelConfig.preset("tiny", moe_impl="ragged", fp8="blockwise")
    for bad in (0.5, float("inf"), True, "2"):
        with pytest.raises(ValueError, match="ep_buffer_factor.*must be a number >= 1"):
            ModelConfig.preset("tiny", ep_buffer_factor=bad)


@pytest.mark.parametrize("dtype, used, stacked", [("float32", None, False),
                                                  ("bfloat16", None, False),
                                                  ("float32", 5, False), ("float32", 5, True)])
def test_block_swiglu_equals_gathered_kernels_with_gradients(dtype, used, stacked):
    """expert_compute.block_swiglu (the three projections and the combine one block at a time,
    custom backward) against the batched einsums over gathered kernels, summed into the tokens'
    rows, and jax's own gradients of them: the [N, D] output, and the gradients of the tokens,
    the three kernels and the slot scales. Slots of row N are empty (scale 0: nothing may reach
    a token from them, nor a scale gradient); expert 2 is used by no block (its kernel
    gradients exactly 0). With `used` = 5 of the 7 blocks, blocks 5 and 6 (expert 4 only) add
    nothing and pass back nothing. `stacked`: the kernels are layer 1 of three-layer stacks
    (the other layers different) handed in as `ExpertStacks`, which the loops read instead
    of the layer's own kernels; the gradients still reach the layer's kernels. fp32: both sides
    multiply
    the same operands (measured ≤ 1.1e-7 of the largest value), so 1e-6; bf16: the hidden
    units and cotangents are rounded at different points (the reference's projections return
    bf16; measured ≤ 1.04e-2, about one bf16 ulp), so 3e-2."""
    from dsv3_jax.expert_compute import ExpertStacks, block_swiglu

    c = ModelConfig.preset("tiny", dtype=dtype)
    P, b, D, F, E, N = 7, 4, 16, 8, 5, 20
    ks = jax.random.split(jax.random.key(0), 7)
    tokens = jax.random.normal(ks[0], (N, D))
    kernels = (jax.random.normal(ks[1], (E, D, F)) / 4, jax.random.normal(ks[2], (E, D, F)) / 4,
               jax.random.normal(ks[3], (E, F, D)) / 3)
    block_expert = jnp.asarray([0, 0, 1, 3, 3, 3, 4], jnp.int32)  # expert 2 unused
    rows = jax.random.randint(ks[4], (P * b,), 0, N).at[jnp.asarray([3, 9, 10, 27])].set(N)
    scale = jnp.where(rows < N, jax.random.uniform(ks[5], (P * b,)) + .5, 0).reshape(P, b)
    probe = jax.random.normal(ks[6], (N, D))
    low = jnp.dtype(dtype)
    live = (jnp.arange(P) < (P if used is None else used))[:, None, None]

    def reference(tokens, gate, up, down, scale):
        x = jnp.take(tokens, rows, axis=0, mode="clip").reshape(P, b, D).astype(low)
        ein = lambda eq, a, w: jnp.einsum(eq, a, w.astype(low)[block_expert],
                                          preferred_element_type=jnp.float32).astype(low)
        h = jax.nn.silu(ein("PbD,PDF->PbF", x, gate)) * ein("PbD,PDF->PbF", x, up)
        y = jnp.einsum("PbF,PFD->PbD", (h * scale[..., None]).astype(low),
                       down.astype(low)[block_expert], preferred_element_type=jnp.float32)
        y = jnp.where(live, y, 0).reshape(P * b, D)
        return jnp.zeros((N, D), jnp.float32).at[rows].add(y, mode="drop")

    others = [jax.random.normal(jax.random.fold_in(ks[6], i), (3, *k.shape))
              for i, k in enumerate(kernels)]

    def mine(tokens, gate, up, down, scale):
        stacks = None if not stacked else ExpertStacks(
            *(o.at[1].set(k) for o, k in zip(others, (gate, up, down))), layer=jnp.int32(1))
        return block_swiglu(tokens, rows, (gate, up, down), block_expert, scale, c,
                            None if used is None else jnp.int32(used), stacks)

    loss = lambda f: jax.jit(jax.value_and_grad(lambda *a: (f(*a) * probe).sum(),
                                                tuple(range(5))))
    args = (tokens, *kernels, scale)
    (v, grads), (v0, grads0) = loss(mine)(*args), loss(reference)(*args)
    tol = 1e-6 if dtype == "float32" else 3e-2
    y, y0 = jax.jit(mine)(*args), reference(*args)
    np.testing.assert_allclose(y, y0, rtol=tol, atol=tol * float(jnp.abs(y0).max()))
    np.testing.assert_allclose(v, v0, rtol=tol)
    for g, g0 in zip(grads, grads0, strict=True):
        assert g.dtype == g0.dtype
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g0, np.float32),
                                   rtol=tol, atol=tol * float(jnp.abs(g0).max()))
    assert all(float(jnp.abs(g[2]).max()) == 0.0 for g in grads[1:4])
    assert float(jnp.abs(grads[4].reshape(-1)[rows == N]).max()) == 0.0
    if used is not None:
        only_skipped = sorted(set(rows[used * b:].tolist()) - set(rows[:used * b].tolist()) - {N})
        assert only_skipped and float(jnp.abs(y[jnp.asarray(only_skipped)]).max()) == 0.0
        assert all(float(jnp.abs(g[4]).max()) == 0.0 for g in grads[1:4])
        assert float(jnp.abs(grads[4][used:]).max()) == 0.0
