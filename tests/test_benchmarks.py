"""Smoke runs of every benchmark (benchmarks/*.py) at tiny sizes: each exits 0 and prints JSON
lines holding the fields its docstring promises, with sane values. The default sizes (the
figures the benchmarks exist for) are not run here."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parent.parent
# the benchmarks time compiles and steps: run them without the suite's compilation cache and
# XLA flags (conftest.py), i.e. on one CPU device at XLA's default optimization level
BENCH_ENV = {**{k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"},
             "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
RUNS = {  # module: (tiny-size arguments, expected keys of its JSON line)
    "compile_time": (["--layers", "2"], {
        "benchmark", "preset", "seconds", "ratio", "depth_ratio"}),
    "decode_warmup": (["--config", "tiny", "--context", "32", "--steps", "3", "--repeats",
                       "2", "--passes", "1"], {
        "benchmark", "config", "batch", "context", "start", "steps", "mean_ms", "per_step_ms",
        "first_over_last", "backend"}),
    "decode": (["--preset", "tiny", "--context", "64"], {
        "benchmark", "preset", "context", "batch", "absorbed_ms", "full_latent_ms",
        "full_per_head_cache_ms", "full_latent_over_absorbed", "per_head_over_absorbed",
        "cache_bytes_per_token_bf16", "backend"}),
    "moe_decode": (["--preset", "tiny", "--context", "32"], {
        "benchmark", "preset", "context", "batch", "model_picks", "picked_ms", "blocks_ms",
        "blocks_over_picked", "backend"}),
    "moe_impls": (["--dry_run"], {
        "benchmark", "preset", "blocks_ms", "ragged_ms", "ragged_over_blocks", "max_rel_diff",
        "backend", "device", "tokens", "batch", "seq_len"}),
    "moe_vs_dense": (["--preset", "tiny", "--tokens", "512", "--capacity_factor", "1.25"], {
        "benchmark", "preset", "tokens", "experts", "top_k", "mode", "moe_ms", "dense_ms",
        "ratio", "backend"}),
    "speculative": (["--preset", "tiny", "--max_new_tokens", "8", "--draft_tokens", "1",
                     "--repeats", "1"], {
        "benchmark", "model", "weights", "batch", "temperature", "prompt_tokens",
        "max_new_tokens", "mtp_modules", "draft_tokens", "plain_tokens_per_s",
        "speculative_tokens_per_s", "speedup", "acceptance_rate", "acceptance_by_position",
        "tokens_per_forward", "round_cost", "speedup_at_full_acceptance", "limited_by",
        "identical", "backend"}),
    "profile_ops": (["--figure", "decode", "--config", "tiny", "--batch", "1", "--context",
                     "32", "--top", "3"], {
        "benchmark", "figure", "config", "kind", "ms", "share", "thunks"}),
    "vs_transformers": (["--config", "tiny", "--batch", "2", "--seq_len", "16", "--context",
                         "32", "--decode_batch", "1", "--steps", "2", "--new_tokens", "2",
                         "--repeats", "1"], {
        "benchmark", "figure", "config", "batch", "shape", "ours_tok_s", "transformers_tok_s",
        "ratio", "ours_peak_fraction", "transformers_peak_fraction", "matmul_peak_gflops",
        "transformers_attention", "threads", "kernels_blas"}),
}

# vs_transformers' decode lines: the memory roofline
DECODE_ROOFLINE = {"step_mb", "memory_gb_s", "ours_bandwidth_fraction",
                   "transformers_bandwidth_fraction", "ratio_bound"}


def test_every_benchmark_is_covered():
    found = {p.stem for p in (ROOT / "benchmarks").glob("*.py")} - {"__init__", "common"}
    assert found == set(RUNS), found


@pytest.mark.parametrize("name", list(RUNS))
def test_benchmark_smoke(name):
    args, keys = RUNS[name]
    r = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env=BENCH_ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert lines, r.stdout[-2000:]
    for record in lines:
        expected = keys | (DECODE_ROOFLINE if (name, record.get("figure")) == (
            "vs_transformers", "decode") else set())
        assert set(record) == expected, (name, sorted(record))
    record = lines[0]
    if name == "compile_time":
        assert record["preset"] == "tiny" and set(record["seconds"]) == {"2"}
        assert record["seconds"]["2"] > 0 and record["ratio"] == 1.0
    elif name == "decode":
        assert (record["preset"], record["context"], record["batch"]) == ("tiny", 64, 1)
        assert min(record["absorbed_ms"], record["full_latent_ms"],
                   record["full_per_head_cache_ms"]) > 0
        # tiny: C = 32 latent + R = 8 rope values vs 4 heads x (16 + 8 + 16), bf16
        assert record["cache_bytes_per_token_bf16"] == {"latent": 80, "per_head": 320}
    elif name == "decode_warmup":  # one line per start, each step timed
        assert [r["start"] for r in lines] == ["after_prefill", "after_passes", "warm_copy"]
        for r in lines:
            assert (r["config"], r["context"], r["steps"]) == ("tiny", 32, 3)
            assert len(r["per_step_ms"]) == 3 and min(r["per_step_ms"]) > 0
            assert r["mean_ms"] == pytest.approx(sum(r["per_step_ms"]) / 3, rel=0.01)
            assert r["first_over_last"] == pytest.approx(  # 3 significant digits
                r["per_step_ms"][0] / r["per_step_ms"][-1], rel=0.01)
    elif name == "moe_decode":  # one token on this CPU: the grouped-GEMM kernel
        assert record["model_picks"] == "ragged"
        assert min(record["picked_ms"], record["blocks_ms"]) > 0
    elif name == "moe_impls":  # the dry run: tiny preset, fp32, blocks vs ragged agree
        assert [r["benchmark"] for r in lines] == ["moe_layer_fwd_bwd", "train_step"]
        assert all(r["max_rel_diff"] < 1e-5 and r["ragged_over_blocks"] > 0 for r in lines)
    elif name == "speculative":
        assert (record["model"], record["batch"], record["max_new_tokens"]) == ("tiny", 1, 8)
        assert record["weights"].startswith("random") and record["identical"] is True
        assert 0 <= record["acceptance_rate"] <= 1 and 1 <= record["tokens_per_forward"] <= 2
        assert record["speedup"] == pytest.approx(
            record["speculative_tokens_per_s"] / record["plain_tokens_per_s"], rel=0.02)
        # speedup = tokens per forward / round cost (both sides decode max_new_tokens)
        assert record["speedup"] == pytest.approx(
            record["tokens_per_forward"] / record["round_cost"], rel=0.02)
        assert record["speedup_at_full_acceptance"] == pytest.approx(
            2 / record["round_cost"], rel=0.01)
        assert record["limited_by"] in (None, "round cost", "acceptance")
        (first,) = record["acceptance_by_position"]  # one draft: the overall rate
        assert first == pytest.approx(record["acceptance_rate"], abs=1e-4)
    elif name == "profile_ops":  # one line per op kind; the shares of the call add up to 1
        kinds = [r["kind"] for r in lines]
        # the products: XLA's dots, or the CPU kernels' calls (a decode step's whole layers)
        assert len(kinds) == len(set(kinds)) and ({"dot", "matmul", "custom-call"}
                                                  & set(kinds)), kinds
        assert sum(r["share"] for r in lines) == pytest.approx(1, abs=0.01)
        assert all(r["ms"] >= 0 and r["thunks"] >= 1 for r in lines)
    elif name == "vs_transformers":
        assert [r["figure"] for r in lines] == ["train", "prefill", "decode", "generate"]
        for r in lines:
            assert r["ours_tok_s"] > 0 and r["transformers_tok_s"] > 0
            assert r["ratio"] == pytest.approx(r["ours_tok_s"] / r["transformers_tok_s"],
                                               rel=0.02)
            assert 0 < r["ours_peak_fraction"] < 1 and r["matmul_peak_gflops"] > 0
            assert r["kernels_blas"] in ("mkl", "openblas")  # the kernels run on this CPU
        decode = lines[2]
        assert decode["step_mb"] > 0 and decode["memory_gb_s"] > 0
        assert decode["ratio_bound"] == pytest.approx(1 / decode["transformers_bandwidth_fraction"],
                                                      rel=0.02)
        assert decode["ours_bandwidth_fraction"] == pytest.approx(
            decode["transformers_bandwidth_fraction"] * decode["ratio"], rel=0.02)
    else:
        assert (record["tokens"], record["experts"], record["top_k"]) == (512, 16, 4)
        assert record["mode"] == "capacity 1.25"
        assert record["moe_ms"] > 0 and record["dense_ms"] > 0
        assert record["ratio"] == pytest.approx(record["moe_ms"] / record["dense_ms"],
                                                rel=0.02)


def test_accelerator_script_refuses_a_cpu_without_dry_run():
    """benchmarks/accelerator.sh runs benchmarks.moe_impls (smoke-tested above with --dry_run)
    only where a TPU or GPU is attached, unless told --dry_run."""
    r = subprocess.run(["bash", "benchmarks/accelerator.sh"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 2 and "no TPU or GPU attached" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("name, args, message", [
    ("vs_transformers", ["--config", "nosuch"],
     "--config nosuch: unknown preset 'nosuch'; allowed: ['deepseek-v3-671b', 'small', 'tiny']"),
    ("vs_transformers", ["--config", '{"hidden_size": 0}'],
     "--config {\"hidden_size\": 0}: ModelConfig.hidden_size=0 is invalid"),
    ("vs_transformers", ["--decode_batch", "1", "0"],
     "argument --decode_batch: 0 is not a positive integer"),
    ("vs_transformers", ["--seq_len", "1"], "--seq_len 1: the train figure predicts"),
    ("profile_ops", ["--config", "{bad"], "--config {bad: Expecting property name"),
    ("moe_vs_dense", ["--tokens", "100"], "--tokens 100: must be a multiple of 512"),
    ("compile_time", ["--layers", "x"], "argument --layers: 'x' is not an integer"),
    ("decode_warmup", ["--context", "5000"],
     "--context 5000 + --steps 16 exceed the config's max_position_embeddings=4096"),
])
def test_bad_arguments_are_one_error_line(name, args, message):
    """A bad count, config or preset: argparse's usage and one `PROG: error: …` line naming the
    argument and what is allowed, status 2, before any model is built (no traceback)."""
    r = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{name}.py: error: {message}"), r.stderr[-2000:]


def test_vs_transformers_without_torch_says_what_to_install():
    """Without the `reference` extra: one error line naming the missing package and the install
    command (torch hidden from the import system in a subprocess)."""
    code = (
        "import sys, importlib.abc\n"
        "class Hide(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] == 'torch':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Hide())\n"
        "sys.argv = ['vs_transformers.py', '--config', 'tiny']\n"
        "import runpy\n"
        "runpy.run_module('benchmarks.vs_transformers', run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == (
        "vs_transformers.py: error: the transformers side needs torch and transformers (torch is "
        "not installed): pip install -e \".[reference]\""), r.stderr[-2000:]
