"""Shared benchmark helpers: the bench config, timing of jitted functions, JSON-line reports."""

import argparse
import json
import os
import time

import jax

from dsv3_jax import ModelConfig
from dsv3_jax.cli import first_line

# Issue 10's benchmark config: vocab 512, hidden 256, 6 layers (first dense), 8 heads, 16 routed
# experts top-4 + 1 shared in 4 groups (top-2), expert blocks of 64, no YaRN, no MTP.
BENCH = dict(vocab_size=512, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
             num_hidden_layers=6, num_attention_heads=8, q_lora_rank=128, kv_lora_rank=64,
             qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=32, n_routed_experts=16,
             n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
             first_k_dense_replace=1, rms_norm_eps=1e-6, max_position_embeddings=4096,
             rope_scaling=None, expert_block_size=64, num_nextn_predict_layers=0)


def bench_config(name: str, **overrides) -> ModelConfig:
    """'bench' (BENCH on the tiny preset), a preset name, a JSON file, or inline JSON — of
    ModelConfig fields, or an HF config.json (one with "model_type")."""
    if name == "bench":
        return ModelConfig.preset("tiny", **{**BENCH, **overrides})
    if name.lstrip().startswith("{") or name.endswith(".json"):
        if name.lstrip().startswith("{"):
            fields = json.loads(name)
        else:
            with open(os.path.expanduser(name)) as f:
                fields = json.load(f)
        if "model_type" in fields:
            return ModelConfig.from_hf(fields).replace(**overrides)
        return ModelConfig(**{**fields, **overrides})
    return ModelConfig.preset(name, **overrides)


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (a count of tokens, steps, layers, repeats)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def parse_config(parser: argparse.ArgumentParser, flag: str, name: str,
                 **overrides) -> ModelConfig:
    """`bench_config(name, **overrides)`, or the parser's one-line error (exit status 2) naming
    `flag` and what is wrong: an unknown preset (and the allowed ones), unreadable or invalid
    JSON, a field ModelConfig lacks, a field value it rejects."""
    try:
        return bench_config(name, **overrides)
    except (ValueError, TypeError, OSError) as e:  # json.JSONDecodeError is a ValueError
        parser.error(f"{flag} {name}: {first_line(e)}")


def median_seconds(fn, repeats: int = 5, setup=lambda: ()) -> float:
    """Median wall seconds of fn(*setup()) after one warm-up call; setup() is not timed (its
    jax arrays are waited for: dispatched asynchronously, they would be finished on fn's
    clock). fn must block until its result is ready (a jax call: see `seconds_per_call`)."""
    fn(*setup())
    times = []
    for _ in range(repeats):
        state = jax.block_until_ready(setup())
        start = time.perf_counter()
        fn(*state)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def seconds_per_call(fn, *args, repeats: int = 5) -> float:
    """Median wall seconds of the jax call fn(*args) after one warm-up (compile) call."""
    return median_seconds(lambda: jax.block_until_ready(fn(*args)), repeats)


def report(**fields) -> None:
    print(json.dumps(fields), flush=True)
