"""DeepSeekV3 end to end: outputs, scanned stacks, MTP semantics, generate vs full forwards."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import DeepSeekV3, ModelConfig, generate, init_variables


@pytest.fixture(scope="module")
def tiny():
    c = ModelConfig.preset("tiny")
    return c, nn.unbox(init_variables(c, jax.random.key(0)))


def test_outputs_and_parameter_stacks(tiny):
    c, v = tiny
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, c.vocab_size)
    out = jax.jit(DeepSeekV3(c).apply)(v, tokens)
    assert out.logits.shape == (2, 16, c.vocab_size) and out.logits.dtype == jnp.float32
    assert len(out.mtp_logits) == c.num_nextn_predict_layers
    L_moe = c.num_moe_layers + c.num_nextn_predict_layers
    assert out.expert_counts.shape == (L_moe, c.n_routed_experts)
    # every token goes to exactly K experts in every MoE layer
    np.testing.assert_array_equal(out.expert_counts.sum(1), 2 * 16 * c.num_experts_per_tok)
    assert np.isfinite(float(out.balance_loss)) and float(out.balance_loss) > 0
    p = v["params"]
    assert p["moe_layers"]["mlp"]["experts"]["gate_proj"]["kernel"].shape == (
        c.num_moe_layers, c.n_routed_experts, c.hidden_size, c.moe_intermediate_size)
    assert p["dense_layers"]["mlp"]["gate_proj"]["kernel"].shape[0] == c.num_dense_layers
    assert v["moe_bias"]["e_score_correction_bias"].shape == (L_moe, c.n_routed_experts)


def test_logical_axis_names_on_every_parameter():
    c = ModelConfig.preset("tiny")
    boxed = jax.eval_shape(lambda: init_variables(c, jax.random.key(0)))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    for leaf in leaves:
        assert len(leaf.names) == leaf.value.ndim


def test_correction_bias_changes_routing_not_gradients(tiny):
    c, v = tiny
    tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, c.vocab_size)
    apply = jax.jit(DeepSeekV3(c).apply)
    skew = jnp.zeros_like(v["moe_bias"]["e_score_correction_bias"]).at[:, 0].set(10.0)
    out = apply({**v, "moe_bias": {"e_score_correction_bias": skew}}, tokens)
    # a large bias on expert 0 puts every token on it in every layer
    np.testing.assert_array_equal(out.expert_counts[:, 0], 2 * 16)


def test_mtp_uses_next_tokens_causally(tiny):
    c, v = tiny
    apply = jax.jit(DeepSeekV3(c).apply)
    tokens = jax.random.randint(jax.random.key(3), (1, 12), 0, c.vocab_size)
    changed = tokens.at[0, 8].set((tokens[0, 8] + 1) % c.vocab_size)
    a, b = apply(v, tokens), apply(v, changed)
    # main logits at i see tokens ≤ i: positions < 8 unchanged, 8 changed
    np.testing.assert_allclose(a.logits[0, :8], b.logits[0, :8], atol=1e-6)
    assert float(jnp.abs(a.logits[0, 8] - b.logits[0, 8]).max()) > 1e-4
    # MTP depth 0 at position i also sees t_{i+1}: position 7 now differs, 6 does not
    m_a, m_b = a.mtp_logits[0][0], b.mtp_logits[0][0]
    np.testing.assert_allclose(m_a[:7], m_b[:7], atol=1e-6)
    assert float(jnp.abs(m_a[7] - m_b[7]).max()) > 1e-4


def rms_norm_np(x, weight, eps):
    x = np.asarray(x, np.float64)
    return np.asarray(weight, np.float64) * x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)


def test_two_mtp_depths_match_a_loop_over_the_submodules():
    """mtp_logits[k] against REFERENCE §4 written out step by step (k 0-based): depth k at
    position i joins [RMSNorm_e(Emb(t_{i+k+1})) ; RMSNorm_h(h^k_i)] (h^0: the main model's
    final normed hidden state), projects with eh_proj, runs the depth's own MoE block with
    its correction-bias row (main MoE layers first), and h^{k+1} = shared_head_norm(block
    output) goes through the shared head. Norms, projections and head in NumPy float64; the
    block is the model's own Block module applied to these inputs."""
    from dsv3_jax.model import Block

    c = ModelConfig.preset("tiny", num_hidden_layers=2, num_nextn_predict_layers=2)
    shapes = nn.unbox(jax.eval_shape(lambda: init_variables(c, jax.random.key(0)))["params"])
    rng = np.random.default_rng(0)
    # Random norm scales (not init's ones) so a swapped or skipped norm shows.
    params = jax.tree_util.tree_map_with_path(lambda path, leaf: jnp.asarray(
        (1 + 0.3 * rng.standard_normal(leaf.shape)) if path[-1].key == "weight"
        else 0.05 * rng.standard_normal(leaf.shape), leaf.dtype), shapes)
    rows = c.num_moe_layers + 2  # one main MoE layer, then MTP depths 0 and 1
    bias = jnp.asarray(0.05 * rng.standard_normal((rows, c.n_routed_experts)), jnp.float32)
    variables = {"params": params, "moe_bias": {"e_score_correction_bias": bias}}
    B, T = 2, 12
    tokens = np.asarray(jax.random.randint(jax.random.key(3), (B, T), 0, c.vocab_size))
    out = jax.jit(DeepSeekV3(c).apply)(variables, tokens)
    assert len(out.mtp_logits) == 2

    p = jax.tree.map(np.asarray, params)
    head = p["lm_head"]["kernel"].astype(np.float64)
    np.testing.assert_allclose(np.asarray(out.hidden, np.float64) @ head, out.logits,
                               rtol=1e-5, atol=1e-5)  # h^0 is what the main head reads
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    block = jax.jit(lambda bp, x, b: Block(c, moe=True).apply({"params": bp}, x, positions,
                                                              None, b, None)[0])
    h = np.asarray(out.hidden, np.float64)
    for k in range(2):
        mp = p[f"mtp_{k}"]
        # t_{i+k+1} at position i; past the input, any id (causal: only later positions see it)
        ids = np.array([[tokens[b, i + k + 1] if i + k + 1 < T else 0 for i in range(T)]
                        for b in range(B)])
        emb = p["embed_tokens"][ids]
        joined = np.concatenate([rms_norm_np(emb, mp["enorm"]["weight"], c.rms_norm_eps),
                                 rms_norm_np(h, mp["hnorm"]["weight"], c.rms_norm_eps)], -1)
        x = joined @ mp["eh_proj"]["kernel"].astype(np.float64)
        y = np.asarray(block(mp["block"], jnp.asarray(x, jnp.float32), bias[c.num_moe_layers + k]))
        h = rms_norm_np(y, mp["shared_head_norm"]["weight"], c.rms_norm_eps)
        want = h @ head
        valid = T - k - 1  # positions whose input token t_{i+k+1} is inside the prompt
        got = np.asarray(out.mtp_logits[k])[:, :valid]
        # fp32 model vs float64 around an fp32 block: measured max |Δ| 4e-7 of the largest
        # logit at both depths; bound 1e-4 (feeding depth 1 t_{i+1} instead is off by ~1).
        scale = np.abs(want[:, :valid]).max()
        np.testing.assert_allclose(got, want[:, :valid], rtol=0, atol=1e-4 * scale,
                                   err_msg=f"depth {k}")


@pytest.mark.parametrize("q_lora, layer_loop", [(True, "auto"), (False, "auto"),
                                                (True, "unrolled")])
def test_greedy_generate_equals_repeated_full_forward(q_lora, layer_loop):
    """"auto": scanned decode steps against unrolled full forwards; "unrolled": both unrolled."""
    c = ModelConfig.preset("tiny", layer_loop=layer_loop)
    if not q_lora:
        c = dataclasses.replace(c, q_lora_rank=None)
    v = nn.unbox(init_variables(c, jax.random.key(4)))
    v = {**v, "params": jax.tree.map(lambda a: a * 3, v["params"])}  # less uniform logits
    prompt = jax.random.randint(jax.random.key(5), (2, 5), 0, c.vocab_size)
    out = generate(c, v, prompt, 8)
    # Full causal forwards over a fixed-length buffer (one compile): the logits at position t
    # do not depend on the zeros after it.
    forward = jax.jit(lambda t: DeepSeekV3(c).apply(v, t, mtp=False).logits)
    tokens = jnp.zeros((2, 13), jnp.int32).at[:, :5].set(prompt)
    for t in range(5, 13):
        tokens = tokens.at[:, t].set(jnp.argmax(forward(tokens)[:, t - 1], -1))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(tokens))


def test_generate_sampling_is_seeded_and_a_vanishing_nucleus_is_greedy(tiny):
    c, v = tiny
    prompt = jnp.zeros((2, 3), jnp.int32)
    a = generate(c, v, prompt, 6, temperature=1.0, rng=jax.random.key(0))
    b = generate(c, v, prompt, 6, temperature=1.0, rng=jax.random.key(0))
    np.testing.assert_array_equal(a, b)
    # Another seed draws other tokens (the untrained model's next-token distribution is
    # nearly uniform over 384 tokens: 12 equal draws in a row would have probability ~1e-31).
    other = generate(c, v, prompt, 6, temperature=1.0, rng=jax.random.key(2))
    assert (np.asarray(other)[:, 3:] != np.asarray(a)[:, 3:]).sum() >= 6
    # a vanishing nucleus keeps only the most likely token: sampling becomes greedy
    greedy = generate(c, v, prompt, 6)
    assert (np.asarray(greedy) != np.asarray(a)).any()
    tiny_p = generate(c, v, prompt, 6, temperature=1.0, top_p=1e-6, rng=jax.random.key(1))
    np.testing.assert_array_equal(greedy, tiny_p)


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=2000), "max_position_embeddings"),
    (dict(max_new_tokens=2, temperature=0.5), "rng"),
    (dict(max_new_tokens=2, top_p=0.0), "top_p"),
])
def test_generate_rejects_bad_arguments(tiny, kwargs, match):
    c, v = tiny
    with pytest.raises(ValueError, match=match):
        generate(c, v, jnp.zeros((1, 3), jnp.int32), **kwargs)
    with pytest.raises(ValueError, match="prompt token ids"):
        generate(c, v, jnp.full((1, 3), c.vocab_size), 2)


def test_mtp_inputs_shorter_than_the_mtp_depth():
    """Two MTP modules over a 1-token input: every depth sees a [B, T] window (token 0 past the
    input), so init and apply work at any length."""
    from dsv3_jax.model import mtp_inputs
    config = ModelConfig.preset("tiny", num_nextn_predict_layers=2)
    table = jnp.arange(config.vocab_size * config.hidden_size, dtype=jnp.float32).reshape(
        config.vocab_size, config.hidden_size)
    tokens = jnp.array([[5]])
    shifted = mtp_inputs(table, tokens, config)
    assert [e.shape for e in shifted] == [(1, 1, config.hidden_size)] * 2
    np.testing.assert_array_equal(shifted[0][0, 0], table[0])  # past the input: token 0
    out = DeepSeekV3(config).apply(DeepSeekV3(config).init(jax.random.key(0), tokens), tokens)
    assert len(out.mtp_logits) == 2 and out.mtp_logits[1].shape == (1, 1, config.vocab_size)


@pytest.mark.parametrize("layer_loop", ["unrolled", "scan"])
def test_expert_stacks_read_in_place_equal_each_layers_slice(monkeypatch, layer_loop):
    """On one CPU device the MoE stack's dropless blocks read their kernels from the whole
    [L, E, …] stacks at their layer (`expert_compute.ExpertStacks`): the logits and every
    parameter's gradient equal the same model reading each layer's own slice
    (`model.stacks_pay` patched off), unrolled (training) and scanned (prefill). Three MoE
    layers whose weights differ (× 5, so logits are O(1)); 64 tokens take the blocks path. The
    same products in the same order on both sides: 1e-6 of the largest value (measured 0)."""
    from dsv3_jax import model as model_lib
    from dsv3_jax.moe import few_token_path

    c = ModelConfig.preset("tiny", layer_loop=layer_loop, num_nextn_predict_layers=0)
    tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, c.vocab_size)
    assert c.num_moe_layers == 3 and few_token_path(tokens.size, c) is None
    v = nn.unbox(init_variables(c, jax.random.key(0)))
    v = {**v, "params": jax.tree.map(lambda a: a * 5, v["params"])}
    probe = jax.random.normal(jax.random.key(2), (*tokens.shape, c.vocab_size))

    def loss(p):
        logits = DeepSeekV3(c).apply({**v, "params": p}, tokens).logits
        return (logits * probe).sum(), logits

    run = lambda: jax.jit(jax.grad(loss, has_aux=True))(v["params"])  # (grads, logits)
    assert model_lib.stacks_pay()
    grads, logits = run()
    monkeypatch.setattr(model_lib, "stacks_pay", lambda: False)
    grads0, logits0 = run()
    np.testing.assert_allclose(logits, logits0, rtol=0, atol=1e-6 * float(jnp.abs(logits0).max()))
    for (path, g), g0 in zip(jax.tree_util.tree_leaves_with_path(grads),
                             jax.tree.leaves(grads0), strict=True):
        np.testing.assert_allclose(g, g0, rtol=0, atol=1e-6 * float(jnp.abs(g0).max()) + 1e-12,
                                   err_msg=jax.tree_util.keystr(path))
