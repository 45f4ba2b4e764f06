"""Every entry point keeps the command-line conventions (dsv3_jax/cli.py): --help prints usage
and exits 0; bad input is one `PROG: error: …` line on stderr with exit status 2."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = {"train.py": ["train.py"], "sample": ["-m", "dsv3_jax.sample"],
            "sharding.aot": ["-m", "sharding.aot"], "sharding.plan": ["-m", "sharding.plan"],
            "sharding.pipeline.simulate": ["-m", "sharding.pipeline.simulate"]}


def _run(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *COMMANDS[name], *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_exits_zero(name):
    r = _run(name, "--help")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "USAGE" in r.stdout or "flags:" in r.stdout, r.stdout[:500]


@pytest.mark.parametrize("name, args, message", [
    ("sharding.aot", ["--config=configs/tiny.py"],
     "sharding.aot: error: --topology is required (e.g. v5p:2x2x1)"),
    ("sharding.aot", ["--topology=v5p:2x2x1"],
     "sharding.aot: error: --config is required, e.g. --config=configs/tiny.py"),
    ("sharding.plan", ["--mesh=expert=3", "--devices=3"],
     "sharding.plan: error: ModelConfig.n_routed_experts=256 is not divisible by mesh.expert=3"),
    ("sharding.plan", ["--mesh=expert=64,data=-1"],
     "sharding.plan: error: a mesh size of -1 needs --devices"),
    ("sample", ["--workdir=/nonexistent/run"], "sample: error: '/nonexistent/run' holds no"),
    ("sample", ["--workdir=x", "--max_new_tokens=many"],
     "sample: error: flag --max_new_tokens=many: invalid literal for int()"),
])
def test_bad_input_is_one_line_with_status_2(name, args, message):
    r = _run(name, *args)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), r.stderr[-2000:]
