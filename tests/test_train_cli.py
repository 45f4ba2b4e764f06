"""`python train.py` as a user runs it (subprocesses, tiny config, 1 CPU device).

One 12-step reference run is shared: end to end (metrics.jsonl against bits/byte and xz computed
here from the corpus, TensorBoard, checkpoints, sampling), then an interrupted run (stop after 6,
resume to 12), a corrupted latest checkpoint, a finished run started again, and SIGTERM/SIGINT
(during start-up, during training, twice) are compared against it — bit for bit on CPU where the
run is the same. A second reference run with the byte-level BPE ("bpe:N", trained at start and
cached in the workdir) is resumed the same way, bit for bit. Bad input must fail with one line on
stderr, exit status 2, and leave the workdir as it was (absent when it was).
"""

import json
import lzma
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
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


def train(workdir, *extra, timeout=600, extra_env=None) -> subprocess.CompletedProcess:
    cmd, cwd = command(workdir, *extra)
    return subprocess.run(cmd, cwd=cwd, env={**env(), **(extra_env or {})},
                          capture_output=True, text=True, timeout=timeout)


def start(workdir, *extra, extra_env=None) -> subprocess.Popen:
    """train.py in the background, its stdout read line by line (`wait_for`)."""
    cmd, cwd = command(workdir, *extra)
    return subprocess.Popen(cmd, cwd=cwd, env={**env(), **(extra_env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)


def wait_for(proc: subprocess.Popen, prefix: str) -> list[str]:
    """stdout lines up to and including the first one starting with `prefix`."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(prefix):
            return lines
    raise AssertionError(f"train.py exited ({proc.wait()}) before printing {prefix!r}: "
                         f"{proc.stderr.read()[-3000:]}")


def assert_clean_exit(stderr: str):
    assert "Fatal Python error" not in stderr and "Traceback" not in stderr, stderr[-3000:]


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


def heldout_by_hand(workdir):
    """(held-out token count, the held-out files' raw bytes) of the corpus the run used (its
    config.json), the bytes read here from the files the path-hash split holds out."""
    from dsv3_jax.training import checkpoint, data
    from dsv3_jax.training.tokenizer import load_tokenizer

    config = checkpoint.load_config(workdir)
    assert config.data.source == "stdlib" and config.data.tokenizer == "byte"
    corpus = data.load_corpus(config.data, load_tokenizer(config.data.tokenizer))
    files = [path for rel, path in data.stdlib_files()
             if data.is_heldout(rel, config.data.heldout_fraction)]
    raw = b""
    for path in files:
        with open(path, "rb") as f:
            raw += f.read()
    assert len(corpus.heldout) == len(raw) + len(files)  # byte tokens + one separator per file
    return len(corpus.heldout), raw


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
    # bits/byte = nats/token / ln 2 × tokens/byte of the held-out split, and the xz figure is
    # lzma -9e on the very bytes the held-out files hold, both computed here independently.
    tokens, raw = heldout_by_hand(workdir)
    xz = 8 * len(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)) / len(raw)
    for r in evals.values():
        assert r["eval_bits_per_byte"] == pytest.approx(
            r["eval_loss"] / math.log(2) * tokens / len(raw), rel=1e-12)
        assert r["xz_bits_per_byte"] == pytest.approx(xz, rel=1e-12)
        assert r["eval_tokens"] == 2 * 4 * 32  # eval_batches × batch_size × seq_len
    assert evals[12]["eval_loss"] < evals[8]["eval_loss"] + 0.5
    assert f"{evals[12]['eval_bits_per_byte']:.3f} bits/byte" in result.stdout
    files = os.listdir(workdir)
    assert "config.json" in files
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(
        os.path.join(workdir, "tensorboard")))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["12", "6", "9"]
    assert "done: 12 steps" in result.stdout
    assert "python -m dsv3_jax.sample --workdir=run" in result.stdout


def sample(workdir, *args) -> str:
    """The continuation `python -m dsv3_jax.sample` prints after the prompt "def "."""
    result = subprocess.run(
        [sys.executable, "-m", "dsv3_jax.sample", f"--workdir={workdir}", "--prompt=def ",
         *args], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step 12" in result.stderr
    if "--speculative" in args:  # the acceptance summary, overall and per draft position
        assert re.search(r"# speculative: acceptance rate [0-9.]+, .*by draft position, given "
                         r"the earlier ones were: [0-9.]+, (?:[0-9.]+|nan)\)", result.stderr), \
            result.stderr[-2000:]
    assert result.stdout.startswith("def ") and result.stdout.endswith("\n")
    return result.stdout[len("def "):-1]


def test_sample_from_the_run(reference):
    workdir, _ = reference
    greedy = sample(workdir, "--max_new_tokens=8", "--temperature=0", "--seed=0")
    # Greedy decoding ignores the seed.
    assert sample(workdir, "--max_new_tokens=8", "--temperature=0", "--seed=1") == greedy
    # Speculative greedy (the run's MTP module drafting, a second draft chained) is greedy.
    assert sample(workdir, "--max_new_tokens=8", "--temperature=0", "--speculative",
                  "--draft_tokens=2") == greedy
    # Byte tokenizer: 8 new tokens are 8 bytes, unless a document separator ended the text —
    # then a larger budget stops at the same place.
    assert greedy, "nothing generated"
    if len(greedy.encode()) != 8:
        assert len(greedy.encode()) < 8
        assert sample(workdir, "--max_new_tokens=16", "--temperature=0") == greedy


@pytest.mark.slow
def test_sample_temperature_uses_the_seed(reference):
    workdir, _ = reference
    a, b = (sample(workdir, "--max_new_tokens=16", "--temperature=1.0", f"--seed={seed}")
            for seed in (0, 1))
    assert a and b and a != b


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


def test_finished_run_says_so(reference, tmp_path):
    ref, _ = reference
    workdir = str(tmp_path / "run")
    shutil.copytree(ref, workdir)
    before = snapshot(workdir)
    result = train(workdir, extra_env={"JAX_LOG_COMPILES": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    bpb = by_step(workdir, "eval_loss")[12]["eval_bits_per_byte"]
    assert result.stdout.splitlines()[-1] == (
        f"already complete at step 12 (held-out {bpb:.3f} bits/byte); raise --config.steps to "
        "continue")
    assert "Compiling jit(train_step)" not in result.stderr  # nothing to train: no compile
    assert snapshot(workdir) == before


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_and_resumes(sig, tmp_path):
    """A signal during training: the step finishes, is saved, and the exit status says the run
    did not finish (128 + signal: 143 for SIGTERM, 130 for SIGINT)."""
    workdir = str(tmp_path / "run")
    proc = start(workdir, "--config.steps=100000", "--config.checkpoint_every=100000")
    wait_for(proc, "step 3/")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, err[-3000:]
    assert_clean_exit(err)
    stopped = max(by_step(workdir))
    assert f"stopped at step {stopped} of 100000 ({sig.name} received); checkpoint saved" in out
    assert os.path.isdir(os.path.join(workdir, "checkpoints", str(stopped)))
    again = train(workdir, "--config.steps=100000", "--config.checkpoint_every=100000",
                  f"--config.stop_after={stopped + 2}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from step {stopped}" in again.stdout
    logged = [r["step"] for r in records(workdir) if "loss" in r]
    assert logged == list(range(1, stopped + 3))  # each step once: no gap, no duplicate


@pytest.mark.slow
def test_sigint_during_startup(reference, tmp_path):
    """Ctrl-C while the state is created and the step compiles: no step is trained, exit 130
    (no segfault, no traceback), and the same command then runs the reference run exactly."""
    ref, _ = reference
    workdir = str(tmp_path / "run")
    proc = start(workdir)
    wait_for(proc, "data:")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert_clean_exit(err)
    assert "stopped" in out and "(SIGINT received" in out, out
    assert "step 1/" not in out
    again = train(workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [exact(r) for r in records(workdir)] == [exact(r) for r in records(ref)]


@pytest.mark.slow
def test_second_sigint_exits_at_once(reference, tmp_path):
    """The second Ctrl-C exits at once, even while the main thread is inside the train step's
    compile. Both signals land in that compile: the first after "model:" (printed just before
    it), the second 0.5 s later. This run gets an empty compilation cache so the compile takes
    seconds: with the suite's warm cache it took less than 0.5 s, and the first signal's
    graceful stop won the race (CI, stop 17)."""
    ref, _ = reference
    workdir = str(tmp_path / "run")
    proc = start(workdir, extra_env={"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache")})
    wait_for(proc, "model:")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    t = time.time()
    out, err = proc.communicate(timeout=300)
    assert time.time() - t < 10  # not after the compiles
    assert proc.returncode == 130, err[-3000:]
    assert_clean_exit(err)
    assert err.strip().splitlines()[-1].startswith("train.py: second SIGINT: exiting now")
    again = train(workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [exact(r) for r in records(workdir)] == [exact(r) for r in records(ref)]


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


# ---- the byte-level BPE: trained at start, cached in the workdir, resumed bit for bit ------

BPE = ["--config.data.tokenizer=bpe:320", "--config.model.vocab_size=0",  # 0: 384, from 320
       "--config.data.source=" + os.path.join(sysconfig.get_paths()["stdlib"], "[a-c]*.py"),
       "--config.data.heldout_fraction=0.1"]


@pytest.fixture(scope="module")
def bpe_reference(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("bpe_reference") / "run")
    result = train(workdir, *BPE)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def bpe_heldout_by_hand(workdir):
    """(held-out token count, held-out raw bytes): the held-out files read here and encoded with
    the workdir's tokenizer.json, one separator after each."""
    from dsv3_jax.training import checkpoint, data
    from dsv3_jax.training.tokenizer import load_tokenizer

    config = checkpoint.load_config(workdir)
    tok = load_tokenizer(os.path.join(workdir, "tokenizer.json"))
    tokens, raw = 0, b""
    for rel, path in data.glob_files(config.data.source):
        if data.is_heldout(rel, config.data.heldout_fraction):
            with open(path, "rb") as f:
                text = f.read()
            ids = tok.encode(text)
            assert tok.decode_bytes(ids) == text  # lossless
            tokens, raw = tokens + len(ids) + 1, raw + text
    return tokens, raw


@pytest.mark.slow
def test_bpe_exact_resume(bpe_reference, tmp_path):
    ref = bpe_reference
    with open(os.path.join(ref, "tokenizer.json"), "rb") as f:
        trained = f.read()
    workdir = str(tmp_path / "run")
    first = train(workdir, *BPE, "--config.stop_after=6")
    assert first.returncode == 0, first.stderr[-3000:]
    cache = os.path.join(workdir, "tokenizer.json")
    with open(cache, "rb") as f:
        assert f.read() == trained  # training the BPE is deterministic
    before = os.stat(cache).st_mtime_ns
    second = train(workdir, *BPE)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from step 6" in second.stdout
    assert os.stat(cache).st_mtime_ns == before  # read back, not trained again
    ours, theirs = records(workdir), records(ref)
    assert [r["step"] for r in ours] == [r["step"] for r in theirs]
    for a, b in zip(ours, theirs):
        assert exact(a) == exact(b), a["step"]  # bit for bit
    # Bits per byte of held-out text, never per token: the BPE's tokens per original byte.
    tokens, raw = bpe_heldout_by_hand(ref)
    assert tokens < 0.8 * len(raw)  # the BPE merged something
    xz = 8 * len(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)) / len(raw)
    for r in by_step(ref, "eval_loss").values():
        assert r["eval_bits_per_byte"] == pytest.approx(
            r["eval_loss"] / math.log(2) * tokens / len(raw), rel=1e-12)
        assert r["xz_bits_per_byte"] == pytest.approx(xz, rel=1e-12)
    with open(os.path.join(ref, "config.json")) as f:
        assert json.load(f)["model"]["vocab_size"] == 384  # sized from bpe:320, recorded
    assert sample(ref, "--max_new_tokens=4", "--temperature=0")  # sampling reads tokenizer.json


@pytest.fixture(scope="module")
def big_tokenizer(tmp_path_factory):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<unk>": 0, **{f"w{i}": i + 1 for i in range(499)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    tok.save(path)
    return path


BAD_INPUT = {  # case: (arguments, what the one line says, arguments replace ARGS)
    "unknown_field": (["--config.model.hidden_sizes=8"],
                      "unknown config field 'config.model.hidden_sizes'; did you mean "
                      "'hidden_size'?", False),
    # No --config: config_flags resolves overrides of the default file at flag definition.
    "unknown_field_default_config": (["--config.model.hidden_sizee=5"],
                                     "did you mean 'hidden_size'?", True),
    "missing_config_file": (["--config=configs/nope.py"],
                            "config file 'configs/nope.py' does not exist; available: ", True),
    "mesh": (["--config.mesh.data=2"], "config.mesh"),
    "mesh_splits_model": (["--cpu_devices=8", "--config.mesh.fsdp=8",
                           "--config.model.hidden_size=100", "--config.batch_size=8"],
                          "dimension 1 ('embed', size 100, set by ModelConfig.hidden_size) is "
                          "not divisible by mesh axes fsdp=8"),
    "batch_mesh": (["--cpu_devices=2", "--config.mesh.data=2", "--config.batch_size=3"],
                   "config.batch_size=3 must be divisible by the 2 batch shards"),
    "empty_glob": (["--config.data.source={tmp}/none/*.txt"], "matches no files"),
    "seq_len": (["--config.seq_len=4096"], "max_position_embeddings=1024"),
    "tokenizer": (["--config.data.tokenizer={tokenizer}"], "500 tokens"),
    "bpe_zero": (["--config.data.tokenizer=bpe:0"],
                 "data.tokenizer='bpe:0' is invalid: allowed: 'byte', 'bpe:N'"),
    "bpe_not_a_number": (["--config.data.tokenizer=bpe:abc"], "'bpe:abc' is invalid"),
    "bpe_below_bytes_and_separator": (["--config.data.tokenizer=bpe:256"], "N >= 257 ids"),
    "bpe_beyond_vocab": (["--config.data.tokenizer=bpe:1000"],
                         "'bpe:1000' has 1000 tokens, more than config.model.vocab_size=384 "
                         "(use --config.model.vocab_size=1024, or 0"),
    "bpe_token_file": (["--config.data.tokenizer=bpe:300", "--config.data.source={tmp}/t.npy"],
                       "is a token file"),
    "different_tokenizer": (["--config.data.tokenizer=bpe:300"],
                            "was trained with data.tokenizer='byte', not 'bpe:300'"),
    "different_model": (["--config.model.hidden_size=128"], "different model"),
    # ~2 TB of state and gradients: more than any machine's memory, caught before allocation
    "model_too_big": (["--config.model.vocab_size=1000000000"],
                      "the train state and its gradients need "),
    "pipeline_schedule": (["--cpu_devices=2", "--config.mesh.pipe=2",
                           "--config.pipeline.schedule=dualpipe",
                           "--config.pipeline.microbatches=2"],
                          "config.pipeline: dualpipe needs microbatches even and >= 2*pp=4"),
    "pipeline_layers": (["--cpu_devices=2", "--config.mesh.pipe=2",
                         "--config.pipeline.layers_per_stage=(1,2)"],
                        "config.pipeline.layers_per_stage=[1, 2] sums to 3; the model has 2"),
    "pipe_devices": (["--cpu_devices=2", "--config.mesh.pipe=3"],
                     "mesh pipe=3 has 3 devices but 2 are available"),
    "pipeline_batch": (["--cpu_devices=2", "--config.mesh.pipe=2",
                        "--config.pipeline.microbatches=3"],
                       "config.batch_size=4 must be divisible by config.pipeline.microbatches=3"),
}

ON_REFERENCE = ("different_model", "different_tokenizer")  # cases run on the reference workdir


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_one_line_exit_2_nothing_written(case, reference, big_tokenizer, tmp_path):
    ref, _ = reference
    args, expected, *replace = BAD_INPUT[case]
    args = [a.format(tmp=tmp_path, tokenizer=big_tokenizer) for a in args]
    workdir = ref if case in ON_REFERENCE else str(tmp_path / "fresh")
    before = snapshot(workdir) if os.path.exists(workdir) else None
    if replace and replace[0]:
        result = subprocess.run([sys.executable, TRAIN, "--workdir=fresh", *args], cwd=tmp_path,
                                env=env(), capture_output=True, text=True, timeout=120)
    else:
        result = train(workdir, *args, timeout=120)
    assert result.returncode == 2, (result.stdout[-1000:], result.stderr[-2000:])
    errors = result.stderr.splitlines()
    assert len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith("train.py: error: ") and expected in errors[0], errors[0]
    if before is None:
        assert not os.path.exists(workdir)
    else:
        assert snapshot(workdir) == before
