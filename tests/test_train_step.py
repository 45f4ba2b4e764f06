"""The training step's parts in-process: bias rule and MaxVio by hand, weight-decay mask, the
schedule against the warm-up + cosine formula, the aux-loss-free balancing at work (a skewed
router becomes balanced by the sign rule, and does not without it), remat policies and bf16
compute against the fp32 baseline. The loss, gradient, bias update and optimizer of one step
against independent computations are in test_objective.py."""

import math

import jax
import jax.numpy as jnp
import numpy as np
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
    peak, end = 1e-3, 1e-4

    def by_hand(t):  # linear warm-up, then cosine from the peak to end at t = steps
        if t < 10:
            return peak * t / 10
        return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * (t - 10) / 90))

    ts = np.arange(0, 101)
    np.testing.assert_allclose(jax.vmap(lr)(ts), [by_hand(t) for t in ts], rtol=1e-5,
                               atol=1e-12)  # fp32 schedule arithmetic
    # Landmarks by hand: half the peak half-way through warm-up; the cosine's midpoint
    # (t = 55) half-way between peak and end; at t = 32 the cosine is still at 8.74e-4 where a
    # linear decay would be at 7.80e-4.
    np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(32), lr(55), lr(100)],
                               [0.0, 5e-4, 1e-3, 8.7374e-4, 5.5e-4, 1e-4], rtol=1e-4)


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


# ---- numerics options: remat policies, bf16 compute -----------------------------------------

def random_params(model, seed=0):
    """Params shaped like init's (eval_shape, no compile): N(0, 0.02) weights, norm scales
    1 + N(0, 0.1)."""
    import flax.linen as nn

    from dsv3_jax.model import init_variables

    shapes = nn.unbox(jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))["params"])
    rng = np.random.default_rng(seed)
    fill = lambda path, leaf: jnp.asarray(
        (1 + 0.1 * rng.standard_normal(leaf.shape)) if path[-1].key == "weight"
        else 0.02 * rng.standard_normal(leaf.shape), leaf.dtype)
    return jax.tree_util.tree_map_with_path(fill, shapes)


REMAT_POLICIES = ["full", "dots_saveable", "dots_with_no_batch_dims_saveable"]


@pytest.fixture(scope="module")
def remat_case():
    """(loss and grads of CE + balance without remat, a function computing them for a policy).

    The MTP modules are not scanned and never rematerialized, so mtp=False keeps the program
    small without leaving out any rematerialized block."""
    from dsv3_jax import DeepSeekV3

    model = run_config.model_config(tiny_run())
    params = random_params(model)
    bias = {"e_score_correction_bias": jnp.zeros(
        (model.num_moe_layers + model.num_nextn_predict_layers, model.n_routed_experts))}
    tokens = jax.random.randint(jax.random.key(1), (4, 17), 0, model.vocab_size)

    def loss_and_grads(policy, layer_loop="auto"):
        net = DeepSeekV3(model.replace(remat_policy=policy, layer_loop=layer_loop))

        def loss(p):
            out = net.apply({"params": p, "moe_bias": bias}, tokens[:, :-1], mtp=False)
            ce = step.cross_entropy(out.logits, tokens[:, 1:]).mean()
            return ce + 0.1 * out.balance_loss

        grad_fn = jax.value_and_grad(loss)
        # checkpoints in the program: a blocks' remat policy adds its own (to none without
        # one: the dropless blocks' expert_compute.block_swiglu keeps what its backward needs)
        return jax.jit(grad_fn)(params), str(jax.make_jaxpr(grad_fn)(params)).count("remat2[")

    reference, checkpoints = loss_and_grads("none")
    return reference, checkpoints, loss_and_grads


@pytest.mark.parametrize("policy", REMAT_POLICIES)
def test_remat_policy_leaves_loss_and_grads_unchanged(remat_case, policy):
    from dsv3_jax import config as config_lib

    assert set(REMAT_POLICIES) | {"none"} == set(config_lib._REMAT_POLICIES)  # all covered
    (loss0, grads0), checkpoints0, loss_and_grads = remat_case
    (loss, grads), checkpoints = loss_and_grads(policy)
    assert checkpoints > checkpoints0  # the policy reaches the program
    # Rematerialization recomputes the same fp32 ops (measured: bitwise equal for every policy).
    assert_same_loss_and_grads((loss, grads), (loss0, grads0))


def assert_same_loss_and_grads(got, want):
    """The same fp32 ops in another program: 1e-6 relative on the loss and 1e-5 of each leaf's
    largest gradient entry allow a different fusion order."""
    (loss, grads), (loss0, grads0) = got, want
    np.testing.assert_allclose(loss, loss0, rtol=1e-6)
    for (path, g), g0 in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads0)):
        np.testing.assert_allclose(g, g0, rtol=0, atol=1e-5 * float(jnp.abs(g0).max()),
                                   err_msg=jax.tree_util.keystr(path))


def test_cpu_kernels_leave_loss_and_grads_unchanged(remat_case, monkeypatch):
    """The reference ran the CPU kernels (fused causal attention, the experts' grouped GEMMs:
    float32 on one CPU device); with them switched off the pure-JAX paths give the same loss
    and gradients to fp32 noise (1e-5 of each leaf's largest entry)."""
    from dsv3_jax import cpu_kernels

    assert cpu_kernels.runs_here(jnp.float32)
    (loss0, grads0), _, loss_and_grads = remat_case
    monkeypatch.setattr(cpu_kernels, "runs_here", lambda *dtypes: False)
    assert_same_loss_and_grads(loss_and_grads("none")[0], (loss0, grads0))


@pytest.mark.parametrize("layer_loop, policy", [("scan", "none"), ("unrolled", "full")])
def test_scanned_layers_equal_unrolled(remat_case, layer_loop, policy):
    """The reference's "auto" (the tiny model's short stacks unrolled, no remat) against a
    scanned stack, and against an unrolled one with remat (its own prevent_cse branch): other
    programs over the same parameters (measured: bitwise equal)."""
    (loss0, grads0), checkpoints0, loss_and_grads = remat_case
    model = run_config.model_config(tiny_run())
    assert model.unrolled(model.num_moe_layers) and not model.unrolled(model.num_moe_layers,
                                                                         cached=True)
    assert not model.replace(remat_policy="full").unrolled(model.num_moe_layers)
    (loss, grads), checkpoints = loss_and_grads(policy, layer_loop)
    assert (checkpoints > checkpoints0) == (policy != "none")
    assert_same_loss_and_grads((loss, grads), (loss0, grads0))


@pytest.mark.slow
def test_bfloat16_compute_tracks_float32():
    """The same fp32 master weights, compute in bf16 vs fp32: the logits, then the losses of
    four AdamW steps on one batch (so the loss falls: 5.96 → 5.10)."""
    from dsv3_jax import DeepSeekV3

    c = tiny_run(warmup_steps=0, steps=10, learning_rate=3e-3)
    f32 = run_config.model_config(c)
    b16 = f32.replace(dtype="bfloat16")
    params = random_params(f32)
    tokens = jax.random.randint(jax.random.key(1), (c.batch_size, c.seq_len + 1), 0,
                                f32.vocab_size)
    bias = jnp.zeros((f32.num_moe_layers + f32.num_nextn_predict_layers, f32.n_routed_experts))
    variables = {"params": params, "moe_bias": {"e_score_correction_bias": bias}}
    forward = lambda m: jax.jit(lambda v, t: DeepSeekV3(m).apply(v, t, mtp=False).logits)
    logits = {m.dtype: np.asarray(forward(m)(variables, tokens[:, :-1]))
              for m in (f32, b16)}
    assert logits["bfloat16"].dtype == np.float32  # the head's output stays fp32
    error = (np.linalg.norm(logits["bfloat16"] - logits["float32"])
             / np.linalg.norm(logits["float32"]))
    # bf16 rounds to 8 mantissa bits (2^-9 ≈ 2e-3 relative per op) through 2 blocks: measured
    # relative L2 error 8.8e-3; bound 3e-2. Nonzero: the bf16 path really runs in bf16.
    assert 1e-4 < error < 3e-2, error

    losses = {}
    for m in (f32, b16):
        tx = state.make_optimizer(c, m)
        s = state.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state=tx.init(params),
                             moe_bias={"e_score_correction_bias": bias},
                             rng=jax.random.key_data(jax.random.key(0)))
        train_step = jax.jit(step.make_train_step(m, c, tx, state.make_schedule(c)))
        losses[m.dtype] = []
        for _ in range(4):
            s, metrics = train_step(s, tokens)
            losses[m.dtype].append([float(metrics["loss"]), float(metrics["total_loss"])])
    a, b = np.array(losses["float32"]), np.array(losses["bfloat16"])
    assert a[-1, 0] < a[0, 0] - 0.5  # the steps train (measured 5.96 → 5.10)
    # Measured relative loss differences 2e-5 (step 1) to 4e-4 (step 3); bound 2e-3.
    np.testing.assert_allclose(b, a, rtol=2e-3)
