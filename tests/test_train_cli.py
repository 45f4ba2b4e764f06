"""`python train.py` as a user runs it (subprocesses, tiny config, 1 CPU device).

One 12-step reference run is shared: end to end (metrics.jsonl, TensorBoard, checkpoints,
sampling), then an interrupted run (stop after 6, resume to 12), a corrupted latest checkpoint
and a SIGTERM are compared against it — bit for bit on CPU where the run is the same. Bad input
must fail with one line, exit status 2, and leave the workdir as it was.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, "train.py")
ARGS = ["--cpu_devices=1", f"--config={REPO}/configs/tiny.py", "--config.model.num_hidden_layers=2",
        "--config.batch_size=4", "--config.seq_len=32", "--config.steps=12",
        "--config.warmup_steps=2", "--config.learning_rate=1e-2", "--config.log_every=1",
        "--config.eval_every=8", "--config.eval_batches=2", "--config.final_eval_batches=2",
        "--config.checkpoint_every=3"]
# Everything a step computes from state and data (not wall-clock figures like tokens/s).
EXACT_KEYS = ("loss", "mtp_loss", "balance_loss", "total_loss", "grad_norm", "lr",
              "max_violation", "max_violation_worst", "bias_abs_mean", "eval_loss",
              "eval_bits_per_byte")


_CACHE = {}


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """One persistent XLA cache for all the runs here: each subprocess compiles the same tiny
    programs, so only the first pays for it (the cached executable is the same binary, which
    keeps the bit-for-bit comparisons meaningful)."""
    _CACHE["dir"] = str(tmp_path_factory.mktemp("jax_cache"))
    yield
    _CACHE.clear()


def env():
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO,
            "JAX_COMPILATION_CACHE_DIR": _CACHE["dir"],
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def command(workdir, *extra) -> tuple[list[str], str]:
    """train.py with `workdir` given relative to the directory it runs in (orbax itself needs
    absolute paths: this keeps that conversion tested)."""
    parent, name = os.path.split(workdir)
    return [sys.executable, TRAIN, f"--workdir={name}", *ARGS, *extra], parent


def train(workdir, *extra, timeout=600) -> subprocess.CompletedProcess:
    cmd, cwd = command(workdir, *extra)
    return subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True,
                          timeout=timeout)


def records(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def by_step(workdir, kind="loss") -> dict[int, dict]:
    return {r["step"]: r for r in records(workdir) if kind in r}


def exact(record: dict) -> dict:
    return {k: record[k] for k in EXACT_KEYS if k in record}


def snapshot(path) -> dict:
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(root, name)
            st = os.stat(full)
            out[os.path.relpath(full, path)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("reference") / "run")
    result = train(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


def test_end_to_end_run(reference):
    workdir, result = reference
    steps = by_step(workdir)
    assert sorted(steps) == list(range(1, 13))
    for r in steps.values():
        for key in ("loss", "mtp_loss", "balance_loss", "grad_norm", "lr", "tokens_per_sec",
                    "max_violation", "model_flops_per_sec"):
            assert isinstance(r[key], float), key
    # Loss decreases on the tiny config (from ~ln 384 = 5.95 at the start).
    assert steps[1]["loss"] > 5.5
    assert max(steps[s]["loss"] for s in (10, 11, 12)) < steps[1]["loss"] - 1.0
    evals = by_step(workdir, "eval_loss")
    assert sorted(evals) == [8, 12]
    for r in evals.values():
        assert r["eval_bits_per_byte"] > 0 and 0 < r["xz_bits_per_byte"] < 3
    assert evals[12]["eval_loss"] < evals[8]["eval_loss"] + 0.5
    files = os.listdir(workdir)
    assert "config.json" in files
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(
        os.path.join(workdir, "tensorboard")))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["12", "6", "9"]
    assert "python -m dsv3_jax.sample --workdir=run" in result.stdout


def test_sample_from_the_run(reference):
    workdir, _ = reference
    result = subprocess.run(
        [sys.executable, "-m", "dsv3_jax.sample", f"--workdir={workdir}", "--prompt=def ",
         "--max_new_tokens=8", "--temperature=0"],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("def ")
    assert "step 12" in result.stderr


def test_exact_resume(reference, tmp_path):
    ref, _ = reference
    workdir = str(tmp_path / "run")
    first = train(workdir, "--config.stop_after=6")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "stopped at step 6" in first.stdout
    second = train(workdir)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from step 6" in second.stdout
    ours, theirs = records(workdir), records(ref)
    assert [r["step"] for r in ours] == [r["step"] for r in theirs]  # no duplicated lines
    for a, b in zip(ours, theirs):
        assert exact(a) == exact(b), a["step"]  # bit for bit: floats compared with ==


def test_corrupted_latest_checkpoint_falls_back(reference, tmp_path):
    ref, _ = reference
    workdir = str(tmp_path / "run")
    shutil.copytree(ref, workdir)
    for root, _, files in os.walk(os.path.join(workdir, "checkpoints", "12", "state")):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(3)
    result = train(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "checkpoint 12" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning:")
    assert "Traceback" not in result.stderr
    assert "resumed from step 9" in result.stdout
    assert os.path.isdir(os.path.join(workdir, "corrupted_checkpoints", "12"))
    ours, theirs = by_step(workdir), by_step(ref)
    for s in (10, 11, 12):  # steps 10-12 again, from checkpoint 9: the same numbers
        assert exact(ours[s]) == exact(theirs[s]), s


@pytest.mark.slow
def test_sigterm_saves_and_resumes(tmp_path):
    workdir = str(tmp_path / "run")
    cmd, cwd = command(workdir, "--config.steps=100000", "--config.checkpoint_every=100000")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics_path) and len(records(workdir)) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    stopped = max(by_step(workdir))
    assert f"stopped at step {stopped} of 100000 (SIGTERM received)" in out
    assert os.path.isdir(os.path.join(workdir, "checkpoints", str(stopped)))
    again = train(workdir, "--config.steps=100000", "--config.checkpoint_every=100000",
                  f"--config.stop_after={stopped + 2}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from step {stopped}" in again.stdout
    logged = [r["step"] for r in records(workdir) if "loss" in r]
    assert logged == list(range(1, stopped + 3))  # each step once: no gap, no duplicate


def test_non_finite_loss_names_the_step(tmp_path):
    workdir = str(tmp_path / "run")
    result = train(workdir, "--config.learning_rate=1e30", "--config.warmup_steps=0",
                   "--config.checkpoint_every=1")
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("train.py: error: non-finite") and " at step " in line
    bad_step = int(line.split(" at step ")[1].split(";")[0])
    saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")))
    assert saved and max(saved) == bad_step - 1  # the last good step's checkpoint stays
    assert f"last good checkpoint: {bad_step - 1}" in line


@pytest.fixture(scope="module")
def big_tokenizer(tmp_path_factory):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<unk>": 0, **{f"w{i}": i + 1 for i in range(499)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    tok.save(path)
    return path


@pytest.mark.parametrize("case", ["unknown_field", "mesh", "empty_glob", "seq_len", "tokenizer",
                                  "different_model"])
def test_bad_input_fails_before_compiling(case, reference, big_tokenizer, tmp_path):
    ref, _ = reference
    args, expected = {
        "unknown_field": (["--config.model.hidden_sizes=8"], "unknown config field"),
        "mesh": (["--config.mesh.data=2"], "config.mesh"),
        "empty_glob": ([f"--config.data.source={tmp_path}/none/*.txt"], "matches no files"),
        "seq_len": (["--config.seq_len=4096"], "max_position_embeddings=1024"),
        "tokenizer": ([f"--config.data.tokenizer={big_tokenizer}"], "500 tokens"),
        "different_model": (["--config.model.hidden_size=128"], "different model"),
    }[case]
    workdir = ref if case == "different_model" else str(tmp_path / "fresh")
    before = snapshot(workdir) if os.path.exists(workdir) else None
    result = train(workdir, *args, timeout=120)
    assert result.returncode == 2, (result.stdout[-1000:], result.stderr[-2000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    if before is None:
        assert not os.path.exists(workdir)
    else:
        assert snapshot(workdir) == before
