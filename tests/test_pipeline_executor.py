"""The pipelined step equals the unpipelined one: for 1F1B, DualPipe and DualPipeV (and an
explicit uneven layer split), one step's loss, metrics, expert counts and every gradient leaf
through `placed_step.pipelined_value_and_grad` (what train.py runs with mesh.pipe > 1) match
`step.make_value_and_grad` on one device, on the same global batch (tiny preset: 1 dense + 3 MoE
layers + 1 MTP module, float32, highest matmul precision).

Tolerances (fp32 with a different summation order over micro-batches): loss within 1e-6
relative; every gradient leaf within calc_diff = 1 − 2Σxy/Σ(x²+y²) < 1e-10 in float64 (the
official DualPipe example's measure; 1e-10 is a relative error of ~1e-5); the integer expert
counts exactly. A schedule that drops, repeats or misroutes one micro-batch's op moves some
gradient by far more (test_a_wrong_table_is_caught).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import DeepSeekV3, ModelConfig
from dsv3_jax.training import placed_step, run_config
from dsv3_jax.training import step as train_step
from sharding import mesh as mesh_lib
from sharding import placement
from sharding.pipeline import executor, schedule, simulate, stages

MODEL = ModelConfig.preset("tiny")
ROWS_PER_SHARD = 2  # sequences of one micro-batch on one batch shard
SEQ = 16


def calc_diff(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    denom = (x * x + y * y).sum()
    return 0.0 if denom == 0 else float(1 - 2 * (x * y).sum() / denom)


@pytest.fixture(scope="module")
def weights():
    import flax.linen as nn
    variables = nn.unbox(DeepSeekV3(MODEL).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    bias = 0.01 * jax.random.normal(jax.random.key(1), (MODEL.num_moe_layers + 1,
                                                         MODEL.n_routed_experts))
    return variables["params"], {"e_score_correction_bias": bias}


def _config(name, microbatches, layers=None):
    config = run_config.base_config("tiny")
    config.balance_loss_alpha = 1e-2  # large enough that its gradient shows
    config.pipeline.schedule = name
    config.pipeline.microbatches = microbatches
    config.pipeline.layers_per_stage = layers
    return config


_REFERENCE = {}


def _reference(weights, tokens, config):
    key = tokens.shape
    if key not in _REFERENCE:
        params, bias = weights
        fn = jax.jit(train_step.make_value_and_grad(MODEL, config))
        with jax.default_matmul_precision("highest"):
            _REFERENCE[key] = fn(params, {}, bias, tokens)
    return _REFERENCE[key]


def _check(weights, name, pp, microbatches, layers=None, **axes):
    params, bias = weights
    devices = pp * int(np.prod(list(axes.values()) or [1]))
    mesh = mesh_lib.make_mesh(dict(pipe=pp, **axes), jax.devices()[:devices])
    rows = microbatches * ROWS_PER_SHARD * mesh_lib.batch_shards(mesh)
    config = _config(name, microbatches, layers)
    config.batch_size = rows
    tokens = jax.random.randint(jax.random.key(2), (rows, SEQ + 1), 0, MODEL.vocab_size)
    (ref_loss, ref_aux), (ref_grads, _) = _reference(weights, tokens, config)
    fn = placed_step.pipelined_value_and_grad(MODEL, config, mesh)
    with placement.use_mesh(mesh, "fsdp"), jax.default_matmul_precision("highest"):
        (loss, aux), (grads, fp8_next) = jax.jit(fn)(params, {}, bias, tokens)
    assert fp8_next == {}
    assert abs(float(loss) / float(ref_loss) - 1) < 1e-6, (float(loss), float(ref_loss))
    for got, want, what in zip(aux[:3], ref_aux[:3], ("ce", "mtp", "balance"), strict=True):
        assert abs(float(got) / float(want) - 1) < 1e-5, (what, float(got), float(want))
    np.testing.assert_array_equal(np.asarray(aux[3]), np.asarray(ref_aux[3]))  # expert counts
    diffs = jax.tree.map(calc_diff, grads, ref_grads)
    worst = max(jax.tree.leaves(diffs))
    assert worst < 1e-10, jax.tree_util.tree_leaves_with_path(diffs)
    assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)


def test_dualpipe_with_data_parallel_matches(weights):
    """pp 2 × data 2: overlapped FB pairs, deferred W, both directions, batch-split stages."""
    _check(weights, "dualpipe", 2, 4, data=2)


@pytest.mark.slow
@pytest.mark.parametrize("name, pp, k", [(n, pp, k) for n in ("1f1b", "dualpipe", "dualpipev")
                                         for pp, k in ((2, 3), (4, 2))])
def test_schedule_matches_unpipelined(weights, name, pp, k):
    """Each schedule at 2 and 4 stages with 3 and 2 micro-batches per stage (DualPipe at pp 2
    with 2 per stage and data 2: test_dualpipe_with_data_parallel_matches). The tables
    themselves are validated for every pp ≤ 16 with several micro-batch counts in
    test_pipeline_schedules.py."""
    _check(weights, name, pp, k * pp)


@pytest.mark.slow
def test_expert_parallel_and_uneven_split_match(weights):
    """pipe 2 × expert 2 (the nested expert-parallel shard_map inside each stage), DualPipeV's
    four stages split unevenly by hand, one of them empty."""
    _check(weights, "dualpipev", 2, 4, layers=(2, 0, 1, 1), expert=2)


def test_a_wrong_table_is_caught(weights, monkeypatch):
    """The comparison can fail: a table that skips one micro-batch's weight gradient on one
    rank (its W becomes an idle tick) moves the gradients far past the tolerance."""
    original = executor.Tables.__init__

    def broken(self, s):
        original(self, s)
        t = int(np.flatnonzero(self.b_kind[:, 0] == executor.W_ONLY)[0])
        self.b_kind[t, 0] = executor.NONE

    monkeypatch.setattr(executor.Tables, "__init__", broken)
    with pytest.raises(AssertionError):
        _check(weights, "zb1p", 2, 2)


def test_split_layers_rules():
    v3 = ModelConfig.preset("deepseek-v3-671b")
    split = stages.split_layers(v3, 16)
    assert split == (3,) + (4,) * 14 + (2,)  # stage 0: the 3 dense layers; 15: 2 + MTP
    plan = stages.plan_stages(v3, 16)
    assert plan.dense[0] == (0, 1, 2) and plan.moe[0] == () and plan.moe[15] == (56, 57)
    assert (plan.dense_slots, plan.moe_slots) == (3, 4)
    assert stages.split_layers(MODEL, 4) == (1, 2, 1, 0)  # 5 units: the MTP module is one
    assert stages.split_layers(MODEL, 2) == (3, 1)
    with pytest.raises(ValueError, match="sums to 3; the model has 4"):
        stages.split_layers(MODEL, 2, (1, 2))
    with pytest.raises(ValueError, match="must list 2 non-negative"):
        stages.split_layers(MODEL, 2, (5, -1))


@pytest.mark.parametrize("name, pp, m", [("1f1b", 4, 8), ("dualpipe", 4, 8),
                                         ("dualpipev", 4, 8), ("zb1p", 4, 8)])
def test_buffers_hold_the_in_flight_micro_batches(name, pp, m):
    """The executor's inbox has as many slots as a chunk ever holds live inputs (at most the
    schedule's peak in-flight activations), not one per micro-batch."""
    s = schedule(name, pp, m)
    tables = executor.Tables(s)
    assert tables.x_slots <= max(simulate.peak_activations(s))
    assert tables.x_slots < m


@pytest.mark.slow
def test_train_py_runs_give_the_same_losses(tmp_path):
    """Three train.py steps with pipe 2 × data 2 (DualPipeV, 4 micro-batches) log the same
    losses, gradient norms and balance figures as data 4 (relative 1e-5): the step, the bias
    update and the metrics around the pipelined gradients are train.py's own."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = ["--cpu_devices=4", f"--config={root}/configs/tiny.py",
            "--config.model.num_hidden_layers=2", "--config.batch_size=8",
            "--config.seq_len=32", "--config.steps=3", "--config.warmup_steps=1",
            "--config.log_every=1", "--config.eval_every=100", "--config.eval_batches=1",
            "--config.final_eval_batches=1", "--config.checkpoint_every=3"]
    runs = {"flat": ["--config.mesh.data=4"],
            "piped": ["--config.mesh.pipe=2", "--config.mesh.data=2",
                      "--config.pipeline.schedule=dualpipev", "--config.pipeline.microbatches=4"]}
    logged = {}
    for name, extra in runs.items():
        workdir = tmp_path / name
        r = subprocess.run([sys.executable, os.path.join(root, "train.py"), f"--workdir={workdir}",
                            *args, *extra], capture_output=True, text=True, timeout=900,
                           env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": root})
        assert r.returncode == 0, r.stderr[-3000:]
        with open(workdir / "metrics.jsonl") as f:
            logged[name] = [json.loads(line) for line in f if '"loss"' in line]
    assert [r["step"] for r in logged["piped"]] == [1, 2, 3]
    for flat, piped in zip(logged["flat"], logged["piped"], strict=True):
        for key in ("loss", "mtp_loss", "balance_loss", "grad_norm", "max_violation",
                    "bias_abs_mean"):
            assert piped[key] == pytest.approx(flat[key], rel=1e-5), (key, flat, piped)
