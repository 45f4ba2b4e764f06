"""The training step in-process: bias rule and MaxVio by hand, MTP target alignment, weight-decay
mask, and the aux-loss-free balancing at work — a deliberately skewed router becomes balanced
by the sign rule (MaxVio falls), and does not without it."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dsv3_jax.training import run_config, state, step


def tiny_run(**overrides):
    c = run_config.base_config("tiny")
    c.model.num_hidden_layers = 2  # 1 dense + 1 MoE layer (+ the MTP block): fast to compile
    c.batch_size, c.seq_len = 8, 32
    for key, value in overrides.items():
        c[key] = value
    return c


def test_update_bias_sign_rule_by_hand():
    counts = jnp.array([[6, 2, 4, 4], [1, 1, 1, 1]])  # layer 0 mean 4; layer 1 balanced
    bias = jnp.array([[0.5, 0.0, -0.1, 0.0], [0.2, 0.2, 0.2, 0.2]])
    new = step.update_bias(bias, counts, 0.01)
    # Over-loaded expert 0 goes down, under-loaded expert 1 up, the ones at the mean stay.
    np.testing.assert_allclose(new, [[0.49, 0.01, -0.1, 0.0], [0.2, 0.2, 0.2, 0.2]])


def test_max_violation_by_hand():
    counts = jnp.array([[6, 2, 4, 4], [1, 1, 1, 1], [8, 0, 0, 0]])
    # max/mean − 1: 6/4 − 1 = 0.5; balanced 0; all on one of 4 experts: 8/2 − 1 = 3.
    np.testing.assert_allclose(step.max_violation(counts), [0.5, 0.0, 3.0])


def test_mtp_loss_targets_are_two_ahead_and_masked():
    B, T, V = 2, 6, 11
    tokens = jax.random.randint(jax.random.key(0), (B, T + 1), 0, V)
    logits = jax.random.normal(jax.random.key(1), (B, T, V))
    # Depth 0 at position i predicts t_{i+2}; positions 0..T-2 have that target in the window.
    want = np.mean([[-jax.nn.log_softmax(logits[b, i])[tokens[b, i + 2]] for i in range(T - 1)]
                    for b in range(B)])
    np.testing.assert_allclose(step.mtp_loss((logits,), tokens), want, rtol=1e-6)
    # Changing the logits at the last position (no target) changes nothing.
    poked = logits.at[:, -1].set(100.0)
    np.testing.assert_allclose(step.mtp_loss((poked,), tokens), want, rtol=1e-6)


def test_weight_decay_applies_to_matrices_only():
    model = run_config.model_config(tiny_run())
    from dsv3_jax.model import init_variables

    boxed = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))["params"]
    mask = state.decay_mask(boxed)
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): v
            for path, v in jax.tree_util.tree_leaves_with_path(mask)}
    assert flat["embed_tokens"] and flat["lm_head/kernel"]
    assert flat["moe_layers/mlp/experts/gate_proj/kernel"]
    # Scanned norm scales are [L, D]: two dimensions, but not matrices.
    assert not flat["moe_layers/input_layernorm/weight"] and not flat["norm/weight"]
    assert not flat["mtp_0/enorm/weight"]


def test_schedule_warmup_then_cosine():
    c = tiny_run(steps=100, warmup_steps=10, learning_rate=1e-3, end_lr_ratio=0.1)
    lr = state.make_schedule(c)
    np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(100)], [0.0, 5e-4, 1e-3, 1e-4],
                               rtol=1e-5)


def run_skewed(gamma: float, steps: int = 40) -> list[float]:
    """MaxVio per step for a router whose correction bias starts at +0.1 on 4 of 16 experts."""
    c = tiny_run(bias_update_rate=gamma, learning_rate=1e-3, warmup_steps=0, steps=steps)
    model = run_config.model_config(c)
    tx = state.make_optimizer(c, model)
    s = state.create_state(model, tx, jax.random.key(0))
    bias = s.moe_bias["e_score_correction_bias"]
    skew = jnp.zeros_like(bias).at[:, :4].set(0.1)  # experts 0-3 win most tokens at first
    s = s.replace(moe_bias={"e_score_correction_bias": skew})
    train_step = jax.jit(step.make_train_step(model, c, tx, state.make_schedule(c)))
    tokens = jax.random.randint(jax.random.key(1), (steps, c.batch_size, c.seq_len + 1), 0, 256)
    out = []
    for i in range(steps):
        s, m = train_step(s, tokens[i])
        out.append(float(m["max_violation"]))
    return out


@pytest.mark.slow
def test_bias_update_balances_a_skewed_router():
    with_rule = run_skewed(gamma=5e-3)
    without = run_skewed(gamma=0.0)
    # 4 of 16 experts taking every assignment would be MaxVio = 16/4 − 1 = 3.
    assert with_rule[0] > 2.5 and without[0] > 2.5
    assert np.mean(with_rule[-10:]) < 1.5  # the sign rule spreads the load (measured ~0.95)
    assert np.mean(without[-10:]) > 2.5  # the control: gradients alone do not (measured 3.0)


def test_train_step_updates_params_and_biases_and_counts_steps():
    c = tiny_run(warmup_steps=0)
    model = run_config.model_config(c)
    tx = state.make_optimizer(c, model)
    s0 = state.create_state(model, tx, jax.random.key(0))
    copy = jax.tree.map(jnp.copy, s0)
    train_step = jax.jit(step.make_train_step(model, c, tx, state.make_schedule(c)),
                         donate_argnums=0)
    tokens = jax.random.randint(jax.random.key(1), (c.batch_size, c.seq_len + 1), 0, 256)
    s1, m = train_step(s0, tokens)
    assert int(s1.step) == 1
    assert not np.array_equal(s1.rng, copy.rng)
    bias = s1.moe_bias["e_score_correction_bias"]
    # From zero, the sign rule moves each bias by exactly ±γ (or 0 for a count at the mean).
    np.testing.assert_allclose(np.abs(bias)[np.abs(bias) > 0], c.bias_update_rate, rtol=1e-6)
    for key in ("loss", "mtp_loss", "balance_loss", "grad_norm", "lr", "max_violation"):
        assert np.isfinite(m[key]), key
    # The optimizer never sees the biases: they are not in params.
    assert "e_score_correction_bias" not in str(jax.tree_util.tree_structure(s1.params))
    assert optax.tree.norm(jax.tree.map(lambda a, b: a - b, s1.params, copy.params)) > 0


@pytest.mark.parametrize("name", ["default", "tiny", "small", "deepseek_v3_671b"])
def test_every_config_file_loads_and_validates(name):
    import os

    from dsv3_jax.training.tokenizer import ByteTokenizer

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", f"{name}.py")
    config = run_config.load_config_file(path)
    run_config.check_run(config)
    model = run_config.model_config(config)
    run_config.check_model_fits(config, model, ByteTokenizer())
    with open(path) as f:
        assert "python train.py" in f.read().split('"""')[1]  # the docstring holds the command
    if name == "deepseek_v3_671b":
        assert (model.hidden_size, model.n_routed_experts, config.seq_len) == (7168, 256, 4096)
