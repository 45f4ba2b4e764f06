"""Expert parallelism (all-to-all dispatch/combine) against a dense every-expert reference, and
device-limited routing worked by hand."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import ModelConfig
from dsv3_jax.layers import Weight
from dsv3_jax.moe import route
from sharding import mesh as mesh_lib
from sharding import ragged_expert_parallel
from sharding.expert_parallel import routed_experts

TINY = ModelConfig.preset("tiny")  # E=16, K=4, n_group=4, topk_group=2, D=64, F=32


def dense_reference(tokens, routing, kernels):
    """Σ_k w_k·expert_k(x) by running every expert on every token: no slots, no dispatch."""
    w_gate, w_up, w_down = kernels
    N, E = tokens.shape[0], w_gate.shape[0]
    h = jax.nn.silu(jnp.einsum("ND,EDF->NEF", tokens, w_gate)) * jnp.einsum(
        "ND,EDF->NEF", tokens, w_up)
    y_all = jnp.einsum("NEF,EFD->NED", h, w_down)
    w_full = jnp.zeros((N, E)).at[jnp.arange(N)[:, None], routing.experts].add(routing.weights)
    return jnp.einsum("NED,NE->ND", y_all, w_full)


def inputs(config, n_tokens, seed=0, bias=None):
    """Random tokens, expert weights and router logits for `config`."""
    keys = jax.random.split(jax.random.key(seed), 5)
    E, D, F = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
    tokens = jax.random.normal(keys[0], (n_tokens, D))
    kernels = (jax.random.normal(keys[1], (E, D, F)) * 0.2,
               jax.random.normal(keys[2], (E, D, F)) * 0.2,
               jax.random.normal(keys[3], (E, F, D)) * 0.2)
    logits = jax.random.normal(keys[4], (n_tokens, E))
    bias = jnp.zeros(E) if bias is None else bias
    return tokens, kernels, logits, bias


def run_parallel(config, mesh_config, tokens, kernels, logits, bias):
    """Routing and routed_experts jitted under the mesh; returns (routing, output)."""
    mesh = mesh_lib.make_mesh(mesh_config)
    shards = mesh.shape["expert"]

    @jax.jit
    def fn(tokens, kernels, logits, bias):
        routing = route(logits, bias, config, expert_shards=shards)
        weights = tuple(Weight(k) for k in kernels)
        return routing, routed_experts(tokens, routing, weights, config)

    with jax.set_mesh(mesh):
        return fn(tokens, kernels, logits, bias)


@pytest.mark.parametrize("mesh_config,n_tokens", [
    (dict(data=2, expert=4), 64),
    (dict(fsdp=2, expert=2, tensor=2), 64),
    (dict(expert=8), 64),
    (dict(data=2, expert=4), 15),  # 15 tokens over 8 batch shards: padded, pads never sent
])
def test_dropless_expert_parallel_equals_dense_reference(mesh_config, n_tokens):
    tokens, kernels, logits, bias = inputs(TINY, n_tokens)
    routing, y = run_parallel(TINY, mesh_config, tokens, kernels, logits, bias)
    want = dense_reference(tokens, routing, kernels)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_capacity_equals_dropless_without_overflow():
    """cf = 8 with X = 4 shards: C = n tokens per destination and 8·n slots per expert, more
    than any expert can receive (X·n), so nothing drops."""
    tokens, kernels, logits, bias = inputs(TINY, 64, seed=3)
    _, dropless = run_parallel(TINY, dict(data=2, expert=4), tokens, kernels, logits, bias)
    capped = TINY.replace(capacity_factor=8.0)
    _, y = run_parallel(capped, dict(data=2, expert=4), tokens, kernels, logits, bias)
    np.testing.assert_allclose(y, dropless, rtol=1e-6, atol=1e-6 * np.abs(dropless).max())


def test_capacity_drops_exactly_the_overflow():
    """All tokens pick experts 0-3 (a +10 bias), all on shard 0 of X = 4. Worked by hand with
    cf = 0.5, n = 8 tokens per device, K = 4, E = 16:
      send capacity C = min(n, ceil(0.5·8·4/4)) = 4: each device sends its first 4 tokens;
      per-expert capacity = ceil(0.5·4·8·4/16) = 4 slots, filled in arrival order: source
      expert-rank 0's 4 tokens. So in each data row only expert-rank 0's first 4 tokens get
      their routed output; every other token gets exactly zero."""
    config = TINY.replace(capacity_factor=0.5, n_group=1, topk_group=1)
    bias = jnp.zeros(16).at[:4].set(10.0)
    tokens, kernels, logits, bias = inputs(config, 64, seed=4, bias=bias)
    routing, y = run_parallel(config, dict(data=2, expert=4), tokens, kernels, logits, bias)
    assert set(np.unique(routing.experts)) == {0, 1, 2, 3}
    want = dense_reference(tokens, routing, kernels)
    n = 8  # tokens per device; device (d, x) holds global tokens (4d + x)·n ... + n - 1
    kept = np.zeros(64, bool)
    for d in range(2):
        kept[4 * d * n: 4 * d * n + 4] = True
    np.testing.assert_allclose(y[kept], want[kept], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(y[~kept], 0.0)


def test_device_limited_routing_hand_worked():
    """E = 8 experts on X = 4 shards of 2, K = 4, at most M = 2 shards per token.

    Logits 0 make every s = 0.5, so the selection scores are 0.5 + bias:
      s_sel = [1.4, 0.5 | 1.0, 0.95 | 1.1, 0.6 | 1.3, 0.0]   (shards separated by |)
    Unlimited top-4: experts 0 (1.4), 6 (1.3), 4 (1.1), 2 (1.0), spread over all 4 shards.
    Shard score = sum of its top ceil(K/M) = 2: [1.9, 1.95, 1.7, 1.3] → keep shards 1 and 0,
    so the token uses experts {0, 1, 2, 3}. (Ranking shards by their best expert instead would
    keep shards 0 and 3, {0, 1, 6, 7}: the sum rule matters.) Weights are from the unbiased
    scores: all 0.5, normalized to 1/4, times 2.5.
    """
    config = ModelConfig.preset("tiny", n_routed_experts=8, num_experts_per_tok=4, n_group=1,
                                topk_group=1, expert_shard_limit=2)
    bias = jnp.array([0.9, 0.0, 0.5, 0.45, 0.6, 0.1, 0.8, -0.5])
    logits = jnp.zeros((1, 8))
    limited = route(logits, bias, config, expert_shards=4)
    assert set(np.asarray(limited.experts[0]).tolist()) == {0, 1, 2, 3}
    np.testing.assert_allclose(limited.weights, np.full((1, 4), 2.5 / 4), rtol=1e-6)
    unlimited = route(logits, bias, config, expert_shards=1)
    assert set(np.asarray(unlimited.experts[0]).tolist()) == {0, 2, 4, 6}
    # M >= X: nothing to limit.
    assert set(np.asarray(route(logits, bias, config, expert_shards=2).experts[0]).tolist()) \
        == {0, 2, 4, 6}


def test_device_limited_routing_bounds_shards_per_token():
    """Random scores and biases: every token's experts lie on at most M of the X shards."""
    config = TINY.replace(expert_shard_limit=2, n_group=1, topk_group=1)
    _, _, logits, _ = inputs(config, 256, seed=5)
    bias = jax.random.normal(jax.random.key(6), (16,))
    experts = np.asarray(route(logits, bias, config, expert_shards=8).experts)
    shards_used = np.array([len(set(row // 2)) for row in experts])
    assert shards_used.max() <= 2 and (shards_used == 2).any()
    assert (np.sort(experts, 1)[:, 1:] != np.sort(experts, 1)[:, :-1]).all()  # distinct


def test_device_limited_expert_parallel_equals_dense_reference():
    config = TINY.replace(expert_shard_limit=1)  # n_group=4 groups nest in X = 4 shards
    tokens, kernels, logits, bias = inputs(config, 64, seed=7)
    routing, y = run_parallel(config, dict(data=2, expert=4), tokens, kernels, logits, bias)
    assert (np.asarray(routing.experts) // 4 == np.asarray(routing.experts[:, :1]) // 4).all()
    want = dense_reference(tokens, routing, kernels)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_device_limited_routing_errors():
    config = ModelConfig.preset("tiny", expert_shard_limit=1, n_group=1, topk_group=1)
    logits, bias = jnp.zeros((2, 16)), jnp.zeros(16)
    with pytest.raises(ValueError, match="leaves fewer than num_experts_per_tok=4"):
        route(logits, bias, config, expert_shards=8)  # 1 shard of 2 experts < K = 4
    grouped = dataclasses.replace(config, n_group=4, topk_group=2)
    with pytest.raises(ValueError, match="multiple of n_group=4"):
        # Each of 2 shards holds 2 groups: if the kept groups sit one per shard, limiting to one
        # shard could leave fewer than K experts, so the combination is refused.
        route(logits, bias, grouped, expert_shards=2)
    with pytest.raises(ValueError, match="expert_shard_limit"):
        ModelConfig.preset("tiny", expert_shard_limit=0)


def test_ragged_expert_parallel_equals_dense_reference_and_overflows_in_rounds():
    """moe_impl="ragged" under expert parallelism (the CPU twin of ragged_all_to_all) equals the
    dense reference on data 2 x expert 4, fsdp 2 x expert 2 x tensor 2 and expert 8. Then every
    token is pushed to experts 0-3 (a +10 bias), all on shard 0 of X = 4, with
    ep_buffer_factor 1: each device's buffer is its own A = n·K = 8·4 = 32 rows, and shard 0
    receives all 4 senders' 32 rows = 128: ceil(128 / 32) = 4 exchange rounds, recorded once
    (from the first device), and the output is still the dense reference: nothing dropped."""
    ragged = TINY.replace(moe_impl="ragged")
    for mesh_config in (dict(data=2, expert=4), dict(fsdp=2, expert=2, tensor=2),
                        dict(expert=8)):
        tokens, kernels, logits, bias = inputs(ragged, 64)
        routing, y = run_parallel(ragged, mesh_config, tokens, kernels, logits, bias)
        want = dense_reference(tokens, routing, kernels)
        np.testing.assert_allclose(y, want, rtol=0, atol=1e-5 * np.abs(want).max())
    skewed = ragged.replace(n_group=1, topk_group=1, ep_buffer_factor=1.0)
    tokens, kernels, logits, bias = inputs(skewed, 64, seed=4,
                                           bias=jnp.zeros(16).at[:4].set(10.0))
    ragged_expert_parallel.clear_overflow_events()
    routing, y = run_parallel(skewed, dict(data=2, expert=4), tokens, kernels, logits, bias)
    jax.effects_barrier()
    assert ragged_expert_parallel.overflow_events() == [
        dict(max_rows=128, buffer_rows=32, rounds=4)]
    want = dense_reference(tokens, routing, kernels)
    np.testing.assert_allclose(y, want, rtol=0, atol=1e-5 * np.abs(want).max())
