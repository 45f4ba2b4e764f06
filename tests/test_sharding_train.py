"""Training on meshes: the same losses as on one device, through the training step in-process
and through train.py itself (one process with 8 devices, and two processes with 4 each over
127.0.0.1).

Each mesh's compile of the placed train step (train.py's, `place_train_step`) is also checked
for XLA's "Involuntary full rematerialization" warning: SPMD replicating a tensor it cannot
reshard, printed by C++ on stderr (caught at the file descriptor by capfd, or from train.py's
output). Multi-process runs must keep gloo's per-connection chatter off stdout.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
from typing import NamedTuple

import jax
import numpy as np
import pytest

from dsv3_jax.training import run_config, step
from dsv3_jax.training import state as train_state_lib
from dsv3_jax.training.placed_step import place_train_step
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
REMAT_WARNING = "Involuntary full rematerialization"


def run_steps(mesh_sizes=None, layout="fsdp") -> list[dict]:
    """STEPS train steps of the tiny config on random tokens; metrics as floats per step."""
    config = run_config.base_config("tiny")
    config.batch_size, config.seq_len, config.steps = 8, 16, STEPS
    model = run_config.model_config(config)
    if mesh_sizes is None:
        tx = train_state_lib.make_optimizer(config, model)
        fn = step.make_train_step(model, config, tx, train_state_lib.make_schedule(config))
        train_step = jax.jit(fn)
        state = jax.jit(lambda rng: train_state_lib.create_state(model, tx, rng))(
            jax.random.key(0))
        place = lambda batch: batch
    else:  # the same wiring as train.py: its placed step, state created shard by shard
        config.mesh.update(mesh_sizes)
        config.mesh.layout = layout
        mesh = mesh_lib.make_mesh(mesh_sizes)
        placed = place_train_step(model, config, mesh)
        create = lambda rng: train_state_lib.create_state(model, placed.tx, rng)
        state = placement.on_mesh(jax.jit(create, out_shardings=placed.shardings), mesh,
                                  layout)(jax.random.key(0))
        train_step = placement.on_mesh(placed.step, mesh, layout)
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
def test_train_steps_equal_single_device(name, single_device_history, capfd):
    capfd.readouterr()
    history = run_steps(*MESHES[name])
    xla_said = capfd.readouterr().err
    assert REMAT_WARNING not in xla_said, (name, xla_said[-3000:])
    for want, got in zip(single_device_history, history, strict=True):
        for key in ("loss", "mtp_loss", "balance_loss", "total_loss", "grad_norm",
                    "max_violation", "bias_abs_mean"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (name, key)
    print(f"\n{name}: losses {[round(h['loss'], 6) for h in history]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TrainRun(NamedTuple):
    records: list[dict]  # process 0's metrics.jsonl
    stdout: list[str]  # per process
    stderr: list[str]


def train_py(workdir, *extra: str, cpu_devices: int, processes: int = 1) -> TrainRun:
    """Runs train.py for STEPS tiny steps (in `processes` processes); process 0's metrics and
    every process's stdout and stderr (which must not hold XLA's rematerialization warning)."""
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
    logs = pathlib.Path(workdir).parent / f"{pathlib.Path(workdir).name}_logs"
    logs.mkdir()
    runs, files = [], []
    for i in range(processes):  # output to files: a full pipe must not stall a collective
        out, err = open(logs / f"stdout_{i}", "w+"), open(logs / f"stderr_{i}", "w+")
        files.append((out, err))
        runs.append(subprocess.Popen(args + ([f"--process_id={i}"] if processes > 1 else []),
                                     cwd=REPO, env=env, stdout=out, stderr=err, text=True))
    stdout, stderr = [], []
    for run, (out, err) in zip(runs, files, strict=True):
        run.wait(timeout=600)
        out.seek(0), err.seek(0)
        stdout.append(out.read())
        stderr.append(err.read())
        out.close(), err.close()
        assert run.returncode == 0, (stdout[-1][-2000:], stderr[-1][-3000:])
        assert REMAT_WARNING not in stderr[-1], stderr[-1][-3000:]
    with open(pathlib.Path(workdir) / "metrics.jsonl") as f:
        return TrainRun([json.loads(line) for line in f], stdout, stderr)


def _losses(records):
    return [(r["step"], r.get("loss", r.get("eval_loss"))) for r in records]


@pytest.fixture(scope="module")
def eight_device_run(tmp_path_factory):
    return train_py(tmp_path_factory.mktemp("mesh8"), "--config.mesh.data=2",
                    "--config.mesh.expert=4", cpu_devices=8)


@pytest.mark.slow
def test_train_py_on_a_mesh_matches_one_device(tmp_path, eight_device_run):
    one = train_py(tmp_path, cpu_devices=1)
    for (s1, a), (s8, b) in zip(_losses(one.records), _losses(eight_device_run.records),
                                strict=True):
        assert s1 == s8 and b == pytest.approx(a, rel=1e-5)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, eight_device_run):
    """2 processes x 4 CPU devices (gloo over 127.0.0.1), each feeding its half of the batch.
    Gloo's "[Gloo] Rank r is connected to …" lines (one per communicator it builds, 12 per
    process in this run) go to the log at INFO, not to stdout."""
    two = train_py(tmp_path, "--config.mesh.data=2", "--config.mesh.expert=4", cpu_devices=4,
                   processes=2)
    assert (tmp_path / "process_1" / "metrics.jsonl").exists()
    for (s2, a), (s8, b) in zip(_losses(two.records), _losses(eight_device_run.records),
                                strict=True):
        assert s2 == s8 and a == pytest.approx(b, rel=1e-5)
    for i, out in enumerate(two.stdout):
        assert "[Gloo]" not in out, (i, out[-3000:])
        assert "done: 3 steps" in out or i > 0, (i, out[-3000:])  # stdout itself still flows


def test_state_fits_counts_each_devices_shard():
    """check_state_fits: the state and one set of gradients per device, each leaf by its shard
    (fsdp=8 holds an eighth of each split leaf), against the device's limit; a limit between
    the sharded and the whole figure passes the sharded state and rejects the replicated one."""
    config = run_config.base_config("tiny")
    model = run_config.model_config(config)
    whole = place_train_step(model, config, mesh_lib.make_mesh(dict(data=8))).abstract_state
    config.mesh.update(dict(fsdp=8))
    split = place_train_step(model, config, mesh_lib.make_mesh(dict(fsdp=8))).abstract_state
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
    need = nbytes(whole) + nbytes(whole.params)  # replicated: every device holds it all
    device = jax.devices()[0]
    run_config.check_state_fits(whole, device, limit=need)  # exactly fits
    with pytest.raises(run_config.ConfigError, match=r"need [0-9.]+ GiB per device"):
        run_config.check_state_fits(whole, device, limit=need - 1)
    run_config.check_state_fits(split, device, limit=need // 4)  # ~1/8 of it per device
    with pytest.raises(run_config.ConfigError):
        run_config.check_state_fits(split, device, limit=need // 16)
