"""Training on meshes: the same losses as on one device, through the training step in-process
and through train.py itself (one process with 8 devices, and two processes with 4 each over
127.0.0.1)."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from dsv3_jax.training import run_config, step
from dsv3_jax.training import state as train_state_lib
from sharding import mesh as mesh_lib
from sharding import placement

REPO = pathlib.Path(__file__).parent.parent
MESHES = {  # name: (mesh sizes, layout); every layout appears at least once
    "data8": (dict(data=8), "dp"),
    "data2_expert4": (dict(data=2, expert=4), "fsdp"),
    "data2_expert2_tensor2": (dict(data=2, expert=2, tensor=2), "fsdp"),
    "fsdp4_tensor2": (dict(fsdp=4, tensor=2), "fsdp"),
    "data2_fsdp2_expert2": (dict(data=2, fsdp=2, expert=2), "zero1"),
}
STEPS = 3


def run_steps(mesh_sizes=None, layout="fsdp") -> list[dict]:
    """STEPS train steps of the tiny config on random tokens; metrics as floats per step."""
    config = run_config.base_config("tiny")
    config.batch_size, config.seq_len, config.steps = 8, 16, STEPS
    model = run_config.model_config(config)
    tx = train_state_lib.make_optimizer(config, model)
    fn = step.make_train_step(model, config, tx, train_state_lib.make_schedule(config))
    create = lambda rng: train_state_lib.create_state(model, tx, rng)
    if mesh_sizes is None:
        train_step, state = jax.jit(fn), jax.jit(create)(jax.random.key(0))
        place = lambda batch: batch
    else:  # the same wiring as train.py
        mesh = mesh_lib.make_mesh(mesh_sizes)
        shardings = placement.state_shardings(
            train_state_lib.abstract_state(model, tx),
            train_state_lib.param_partition_specs(model), mesh, layout)
        state = placement.on_mesh(jax.jit(create, out_shardings=shardings), mesh, layout)(
            jax.random.key(0))
        train_step = placement.on_mesh(jax.jit(
            fn, in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
            out_shardings=(shardings, mesh_lib.replicated(mesh))), mesh, layout)
        place = lambda batch: mesh_lib.global_batch(batch, mesh)
    history = []
    for i in range(STEPS):
        batch = np.asarray(jax.random.randint(jax.random.key(100 + i), (8, 17), 0, 256))
        state, metrics = train_step(state, place(batch))
        history.append({k: float(v) for k, v in metrics.items()})
    return history


@pytest.fixture(scope="module")
def single_device_history():
    return run_steps()


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=[] if name == "data2_fsdp2_expert2" else pytest.mark.slow)
    for name in MESHES])
def test_train_steps_equal_single_device(name, single_device_history):
    history = run_steps(*MESHES[name])
    for want, got in zip(single_device_history, history, strict=True):
        for key in ("loss", "mtp_loss", "balance_loss", "total_loss", "grad_norm",
                    "max_violation", "bias_abs_mean"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (name, key)
    print(f"\n{name}: losses {[round(h['loss'], 6) for h in history]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_py(workdir, *extra: str, cpu_devices: int, processes: int = 1) -> list[dict]:
    """Runs train.py for STEPS tiny steps (in `processes` processes); process 0's metrics."""
    corpus = pathlib.Path(workdir) / "corpus.txt"
    corpus.write_text((REPO / "dsv3_jax" / "moe.py").read_text() * 4)
    args = [sys.executable, "train.py", f"--workdir={workdir}", "--config=configs/tiny.py",
            f"--config.steps={STEPS}", "--config.log_every=1", "--config.eval_every=100",
            "--config.checkpoint_every=100", "--config.final_eval_batches=1",
            f"--config.data.source={corpus}", "--config.seq_len=32", "--config.batch_size=8",
            f"--cpu_devices={cpu_devices}", *extra]
    if processes > 1:
        port = _free_port()
        args += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    runs = [subprocess.Popen(args + ([f"--process_id={i}"] if processes > 1 else []), cwd=REPO,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(processes)]
    for run in runs:
        out, _ = run.communicate(timeout=600)
        assert run.returncode == 0, out[-3000:]
    with open(pathlib.Path(workdir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def _losses(records):
    return [(r["step"], r.get("loss", r.get("eval_loss"))) for r in records]


@pytest.fixture(scope="module")
def eight_device_run(tmp_path_factory):
    return train_py(tmp_path_factory.mktemp("mesh8"), "--config.mesh.data=2",
                    "--config.mesh.expert=4", cpu_devices=8)


@pytest.mark.slow
def test_train_py_on_a_mesh_matches_one_device(tmp_path, eight_device_run):
    one = train_py(tmp_path, cpu_devices=1)
    for (s1, a), (s8, b) in zip(_losses(one), _losses(eight_device_run), strict=True):
        assert s1 == s8 and b == pytest.approx(a, rel=1e-5)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, eight_device_run):
    """2 processes x 4 CPU devices (gloo over 127.0.0.1), each feeding its half of the batch."""
    two = train_py(tmp_path, "--config.mesh.data=2", "--config.mesh.expert=4", cpu_devices=4,
                   processes=2)
    assert (tmp_path / "process_1" / "metrics.jsonl").exists()
    for (s2, a), (s8, b) in zip(_losses(two), _losses(eight_device_run), strict=True):
        assert s2 == s8 and a == pytest.approx(b, rel=1e-5)
