"""The training objective and the optimizer, against independent computations.

* One train step (tiny model, 2 MTP depths, non-default λ, α, γ) against NumPy loops over
  positions for CE and MTP, against jax.grad of a hand-assembled loss for the gradient, and
  against the sign rule applied to counts from a separate forward for the correction biases.
* `state.make_optimizer` over two steps against AdamW written out in NumPy (global-norm
  clipping, bias-corrected moments, decoupled weight decay on matrices only, lr from the
  warm-up + cosine formula).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dsv3_jax import DeepSeekV3
from dsv3_jax.training import run_config, state, step

LAM, ALPHA, GAMMA = 0.7, 0.05, 0.003  # non-default λ, α, γ: a swapped or dropped weight shows


def tiny_run(**overrides):
    c = run_config.base_config("tiny")
    c.model.num_hidden_layers = 2  # 1 dense + 1 MoE layer: fast to compile
    c.model.num_nextn_predict_layers = 2  # two MTP depths: the loss averages over depths
    c.batch_size, c.seq_len = 4, 16
    for key, value in overrides.items():
        c[key] = value
    return c


def random_params(model, seed=0):
    """Params shaped like init's (from eval_shape, no compile): N(0, 0.02) weights, and norm
    scales 1 + N(0, 0.1) so that a swapped or skipped norm changes the output."""
    shapes = jax.eval_shape(lambda: DeepSeekV3(model).init(jax.random.key(0),
                                                           jnp.zeros((1, 4), jnp.int32)))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if path[-1].key == "weight":  # RMSNorm scales
            return jnp.asarray(1 + 0.1 * rng.standard_normal(leaf.shape), leaf.dtype)
        return jnp.asarray(0.02 * rng.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, nn.unbox(shapes["params"]))


def flat(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf, np.float64)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def log_softmax_np(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ---- one train step ------------------------------------------------------------------------

def capture_gradient() -> optax.GradientTransformation:
    """Stores the gradient it is given as its state (exactly, no p + g − p rounding) and
    leaves the params unchanged."""
    return optax.GradientTransformation(
        init=lambda p: jax.tree.map(jnp.zeros_like, p),
        update=lambda g, _, p=None: (jax.tree.map(jnp.zeros_like, g), g))


@pytest.fixture(scope="module")
def one_step():
    """One jitted train step whose "optimizer" keeps the gradient it gets as its state."""
    c = tiny_run(mtp_loss_weight=LAM, balance_loss_alpha=ALPHA, bias_update_rate=GAMMA,
                 warmup_steps=0, steps=10)
    model = run_config.model_config(c)
    params = random_params(model)
    rows = model.num_moe_layers + model.num_nextn_predict_layers
    bias0 = jnp.asarray(0.01 * np.random.default_rng(1).standard_normal(
        (rows, model.n_routed_experts)), jnp.float32)
    tx = capture_gradient()
    s0 = state.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params),
                          moe_bias={"e_score_correction_bias": bias0},
                          rng=jax.random.key_data(jax.random.key(7)))
    tokens = jax.random.randint(jax.random.key(2), (c.batch_size, c.seq_len + 1), 0,
                                model.vocab_size)
    train_step = jax.jit(step.make_train_step(model, c, tx, state.make_schedule(c)))
    s1, metrics = train_step(s0, tokens)

    net = DeepSeekV3(model)

    def hand_loss(p):
        """CE + λ·(mean over depths of masked MTP CE) + α·balance, written independently."""
        out = net.apply({"params": p, "moe_bias": {"e_score_correction_bias": bias0}},
                        tokens[:, :-1])
        T = tokens.shape[1] - 1
        logp = jax.nn.log_softmax(out.logits)
        ce = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()
        depth_losses = []
        for k, logits in enumerate(out.mtp_logits):
            i = np.arange(T)
            valid = (i + k + 2 <= T).astype(np.float32)  # depth k at i predicts t_{i+k+2}
            target = tokens[:, np.minimum(i + k + 2, T)]
            nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), target[..., None], -1)[..., 0]
            depth_losses.append((nll * valid).sum() / (valid.sum() * tokens.shape[0]))
        mtp = sum(depth_losses) / len(depth_losses)
        total = ce + LAM * mtp + ALPHA * out.balance_loss
        return total, (out.logits, out.mtp_logits, out.balance_loss, out.expert_counts)

    (total, aux), grads = jax.jit(jax.value_and_grad(hand_loss, has_aux=True))(params)
    return dict(c=c, model=model, s0=s0, s1=s1, metrics=metrics, tokens=np.asarray(tokens),
                total=total, aux=aux, grads=grads)


def test_total_loss_is_ce_plus_lambda_mtp_plus_alpha_balance(one_step):
    tokens, m = one_step["tokens"], one_step["metrics"]
    logits, mtp_logits, balance, _ = one_step["aux"]
    B, T = tokens.shape[0], tokens.shape[1] - 1
    # NumPy loops over positions: the main head at i predicts t_{i+1}; MTP depth k at i
    # predicts t_{i+k+2}, and positions whose target lies past the window are left out.
    lp = log_softmax_np(logits)
    ce = np.mean([-lp[b, i, tokens[b, i + 1]] for b in range(B) for i in range(T)])
    depths = []
    for k, lk in enumerate(mtp_logits):
        lpk = log_softmax_np(lk)
        depths.append(np.mean([-lpk[b, i, tokens[b, i + k + 2]]
                               for b in range(B) for i in range(T) if i + k + 2 <= T]))
    assert len(depths) == 2
    mtp = np.mean(depths)
    assert float(balance) > 0.5  # Σ over 3 MoE layers of Σ_i f_i P_i (≈ 1 per layer)
    # fp32 losses of a few units: 1e-5 relative is a few ulps of accumulated rounding.
    np.testing.assert_allclose(m["loss"], ce, rtol=1e-5)
    np.testing.assert_allclose(m["mtp_loss"], mtp, rtol=1e-5)
    np.testing.assert_allclose(m["balance_loss"], balance, rtol=1e-5)
    np.testing.assert_allclose(m["total_loss"], ce + LAM * mtp + ALPHA * float(balance),
                               rtol=1e-5)
    np.testing.assert_allclose(one_step["total"], m["total_loss"], rtol=1e-5)


def test_gradient_is_that_of_the_full_objective(one_step):
    """The gradient the step hands the optimizer is jax.grad of CE + λ·MTP + α·balance
    (dropping, detaching or reweighting a term changes it)."""
    got, want = flat(one_step["s1"].opt_state), flat(one_step["grads"])
    assert got.keys() == want.keys()
    for name in want:
        # Two fp32 programs for the same gradient: agreement to 1e-5 of the leaf's largest
        # entry (measured: bitwise equal; detaching α·balance changes it by ~1e-2 relative).
        scale = np.abs(want[name]).max()
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-5 * scale,
                                   err_msg=name)
    # The MTP modules learn only through λ·MTP (and α·balance): their gradient is not small.
    assert np.abs(want["mtp_1/eh_proj/kernel"]).max() > 1e-3
    # The global gradient norm metric is the norm of this gradient (before clipping).
    norm = math.sqrt(sum((g ** 2).sum() for g in want.values()))
    np.testing.assert_allclose(one_step["metrics"]["grad_norm"], norm, rtol=1e-5)
    # The step applies the optimizer's (here zero) update.
    for name, p in flat(one_step["s1"].params).items():
        np.testing.assert_array_equal(p, flat(one_step["s0"].params)[name])


def test_bias_moves_by_gamma_sign_of_mean_minus_count(one_step):
    _, _, _, counts = one_step["aux"]  # per MoE layer (main stack, then MTP depths) [3, E]
    counts = np.asarray(counts, np.float64)
    model, m = one_step["model"], one_step["metrics"]
    B, T = one_step["tokens"].shape[0], one_step["tokens"].shape[1] - 1
    assert counts.shape == (3, model.n_routed_experts)
    np.testing.assert_array_equal(counts.sum(1), B * T * model.num_experts_per_tok)
    # These are the step's own counts: its MaxVio metrics (max c / mean c − 1) agree.
    vio = counts.max(1) / counts.mean(1) - 1
    np.testing.assert_allclose(m["max_violation"], vio.mean(), rtol=1e-6)
    np.testing.assert_allclose(m["max_violation_worst"], vio.max(), rtol=1e-6)
    direction = np.sign(counts.mean(1, keepdims=True) - counts)  # under-loaded experts go up
    assert (direction > 0).sum() >= 3 and (direction < 0).sum() >= 3
    old = np.asarray(one_step["s0"].moe_bias["e_score_correction_bias"], np.float64)
    new = np.asarray(one_step["s1"].moe_bias["e_score_correction_bias"], np.float64)
    # |bias| ≈ 0.01 in fp32: 1e-9 absolute is far below γ = 3e-3 and above the rounding.
    np.testing.assert_allclose(new, old + GAMMA * direction, rtol=0, atol=1e-9)
    np.testing.assert_allclose(m["bias_abs_mean"], np.abs(new).mean(), rtol=1e-5)


def test_step_counts_steps_advances_rng_and_keeps_biases_out_of_params(one_step):
    s0, s1, m = one_step["s0"], one_step["s1"], one_step["metrics"]
    assert int(s0.step) == 0 and int(s1.step) == 1
    assert not np.array_equal(s1.rng, s0.rng)
    assert "e_score_correction_bias" not in str(jax.tree_util.tree_structure(s1.params))
    np.testing.assert_allclose(m["lr"], one_step["c"].learning_rate, rtol=1e-6)  # lr(0), no
    # warm-up


def test_mtp_loss_two_depths_by_hand():
    B, T, V = 2, 7, 11
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, V, (B, T + 1))
    logits = [rng.standard_normal((B, T, V)).astype(np.float32) for _ in range(2)]
    per_depth = []
    for k in range(2):
        lp = log_softmax_np(logits[k])
        nll = [-lp[b, i, tokens[b, i + k + 2]] for b in range(B) for i in range(T)
               if i + k + 2 <= T]  # depth 0: positions 0..5 (6), depth 1: 0..4 (5)
        assert len(nll) == B * (T - 1 - k)
        per_depth.append(np.mean(nll))
    want = (per_depth[0] + per_depth[1]) / 2
    got = step.mtp_loss(tuple(jnp.asarray(x) for x in logits), jnp.asarray(tokens))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # The positions without a target (the last k + 1 of depth k) do not count.
    poked = [logits[0].copy(), logits[1].copy()]
    poked[0][:, -1] = 100.0 * np.arange(V)
    poked[1][:, -2:] = 100.0 * np.arange(V)
    got = step.mtp_loss(tuple(jnp.asarray(x) for x in poked), jnp.asarray(tokens))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # One depth: its own mean.
    np.testing.assert_allclose(step.mtp_loss((jnp.asarray(logits[0]),), jnp.asarray(tokens)),
                               per_depth[0], rtol=1e-6)


# ---- the optimizer -------------------------------------------------------------------------

def hand_lr(c, t):
    """Linear warm-up to the peak, then cosine to end_lr_ratio · peak at t = steps."""
    peak, end = c.learning_rate, c.learning_rate * c.end_lr_ratio
    if t < c.warmup_steps:
        return peak * t / c.warmup_steps
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * (t - c.warmup_steps)
                                                     / (c.steps - c.warmup_steps)))


def is_norm_scale(name):
    return name.endswith("/weight")  # RMSNorm scales: vectors per layer, never decayed


@pytest.fixture(scope="module")
def adamw():
    """make_optimizer with non-default hyperparameters (so each must come from the config),
    and one jitted update shared by the tests (one compile)."""
    c = tiny_run(learning_rate=0.01, end_lr_ratio=0.1, warmup_steps=0, steps=4, adam_b1=0.8,
                 adam_b2=0.99, weight_decay=0.2, grad_clip_norm=0.5)
    model = run_config.model_config(c)
    tx = state.make_optimizer(c, model)

    @jax.jit
    def apply(g, opt_state, p):
        updates, opt_state = tx.update(g, opt_state, p)
        return optax.apply_updates(p, updates), opt_state

    return c, random_params(model), tx, apply


def test_optimizer_two_steps_match_numpy_adamw(adamw):
    c, params, tx, apply = adamw
    rng = np.random.default_rng(3)
    names = list(flat(params))
    # Gradients of very different global norms (≈ 60 and ≈ 3, both clipped to 0.5): the
    # clipping factors differ between the steps, so Adam's scale invariance does not hide it.
    grads = []
    for target in (60.0, 3.0):
        g = {k: rng.standard_normal(v.shape) for k, v in flat(params).items()}
        norm = math.sqrt(sum((x ** 2).sum() for x in g.values()))
        grads.append({k: x * target / norm for k, x in g.items()})
    treedef = jax.tree.structure(params)
    as_tree = lambda d: jax.tree.unflatten(treedef, [jnp.asarray(d[k], jnp.float32)
                                                     for k in names])
    opt_state, p = tx.init(params), params
    for g in grads:
        p, opt_state = apply(as_tree(g), opt_state, p)
    got = flat(p)

    # AdamW by hand, float64.
    b1, b2, eps = c.adam_b1, c.adam_b2, 1e-8
    want = flat(params)
    mom = {k: 0.0 for k in names}
    var = {k: 0.0 for k in names}
    for t, g in enumerate(grads, start=1):
        norm = math.sqrt(sum((x ** 2).sum() for x in g.values()))
        clip = min(1.0, c.grad_clip_norm / norm)
        lr = hand_lr(c, t - 1)  # the update of step t uses the schedule at t − 1
        for k in names:
            gk = g[k] * clip
            mom[k] = b1 * mom[k] + (1 - b1) * gk
            var[k] = b2 * var[k] + (1 - b2) * gk ** 2
            adam = (mom[k] / (1 - b1 ** t)) / (np.sqrt(var[k] / (1 - b2 ** t)) + eps)
            decay = 0.0 if is_norm_scale(k) else c.weight_decay * want[k]
            want[k] = want[k] - lr * (adam + decay)
    assert np.isclose(hand_lr(c, 1), 0.01 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))))
    for k in names:
        # fp32 optimizer vs float64: each step moves a weight by ≤ lr ≈ 0.01 and the rounding
        # of the fp32 arithmetic is ~1e-7 relative to |p| ≤ ~1.5.
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=3e-7, err_msg=k)
    # The updates are not negligible against that tolerance: every weight moved ~lr.
    moved = np.concatenate([np.abs(got[k] - flat(params)[k]).ravel() for k in names])
    assert np.median(moved) > 5e-3


def test_optimizer_decays_matrices_only(adamw):
    """Zero gradients: Adam's step is 0/(0+eps) = 0, so only decoupled weight decay acts:
    matrices (embedding, head, every kernel) shrink by lr·wd·p, norm scales stay."""
    c, params, tx, apply = adamw
    zeros = jax.tree.map(jnp.zeros_like, params)
    new, old = flat(apply(zeros, tx.init(params), params)[0]), flat(params)
    assert sum(is_norm_scale(k) for k in old) == 2 * 4 + 2 * (4 + 3) + 1  # per-block norms ×4
    # (2 scanned blocks, 2 MTP blocks), MTP enorm/hnorm/shared_head_norm ×2, final norm
    for k in old:
        factor = 1.0 if is_norm_scale(k) else 1 - 0.01 * 0.2  # lr(0) · wd
        np.testing.assert_allclose(new[k], old[k] * factor, rtol=1e-6, err_msg=k)
