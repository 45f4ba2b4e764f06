"""Metrics out of a run: WORKDIR/metrics.jsonl, TensorBoard events, the console progress bar.

metrics.jsonl holds one JSON object per logged step (`step`, `loss`, `mtp_loss`, …) or
evaluation (`step`, `eval_loss`, `eval_bits_per_byte`, …). Floats are written with Python's
shortest round-trip repr, so two runs can be compared bit for bit from the file. On resume,
lines past the restored step (written after the checkpoint by the interrupted run) are dropped
so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import numpy as np

# Dense bf16 peak FLOP/s per device, for MFU. Unknown devices (CPUs) log FLOP/s without MFU.
_PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 125e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def peak_flops(device_kind: str) -> float:
    """Peak FLOP/s of one device of this kind, or 0.0 when unknown."""
    for name, flops in _PEAK_FLOPS.items():
        if name.lower() in device_kind.lower():
            return flops
    return 0.0


def _scalar(value: Any) -> float | int:
    value = np.asarray(value).item()
    return value if isinstance(value, int) else float(value)


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def eval_record(workdir: str, step: int) -> dict | None:
    """The last evaluation (a record with `eval_bits_per_byte`) logged at `step` in
    WORKDIR/metrics.jsonl, or None (no file, no such record, or an unreadable file)."""
    path = os.path.join(workdir, "metrics.jsonl")
    try:
        found = [r for r in read_jsonl(path)
                 if r.get("step") == step and "eval_bits_per_byte" in r]
    except (OSError, ValueError):
        return None
    return found[-1] if found else None


class MetricWriter:
    """Appends scalars to metrics.jsonl and TensorBoard; on resume trims lines past `step`."""

    def __init__(self, workdir: str, resume_step: int = 0, tensorboard: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        if os.path.exists(self.path):
            kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter  # heavy import, only when used

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: dict[str, Any]) -> dict[str, Any]:
        record = {"step": int(step), **{k: _scalar(v) for k, v in scalars.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, float | int) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()
        return record

    def close(self):
        self._file.close()
        if self._tb is not None:
            self._tb.close()


class Throughput:
    """Tokens/s over the steps since the last `reset`, excluding paused time (evals, saves)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self._start, self._tokens, self._paused = time.perf_counter(), 0, 0.0

    def add(self, tokens: int):
        self._tokens += tokens

    def pause(self, seconds: float):
        self._paused += seconds

    def tokens_per_sec(self) -> float:
        elapsed = time.perf_counter() - self._start - self._paused
        return self._tokens / elapsed if elapsed > 0 else 0.0


class Progress:
    """A tqdm bar on a terminal; plain log lines otherwise (CI logs, redirected output)."""

    def __init__(self, total: int, initial: int):
        self._bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                             smoothing=0.1)
        self._total, self._initial, self._done, self._start = total, initial, 0, None

    def update(self, n: int = 1):
        if self._start is None:  # the first step includes compilation: time from its end
            self._start = time.perf_counter()
        else:
            self._done += n
        if self._bar is not None:
            self._bar.update(n)

    def eta(self, step: int) -> str:
        if not self._done:
            return "?"
        seconds = (time.perf_counter() - self._start) / self._done * (self._total - step)
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"

    def log(self, step: int, record: dict[str, Any]):
        """Shows a logged step: bar postfix on a terminal, one line otherwise."""
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{record['loss']:.3f}",
                                  tok_s=f"{record['tokens_per_sec']:.0f}", refresh=False)
        else:
            self.print(f"step {step}/{self._total}  loss {record['loss']:.4f}  "
                       f"mtp {record['mtp_loss']:.4f}  grad_norm {record['grad_norm']:.3f}  "
                       f"maxvio {record['max_violation']:.3f}  "
                       f"tok/s {record['tokens_per_sec']:.0f}  eta {self.eta(step)}")

    def print(self, line: str):
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def close(self):
        if self._bar is not None:
            self._bar.close()
