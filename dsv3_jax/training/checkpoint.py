"""Checkpoints (orbax CheckpointManager) and the run config saved beside them.

Layout of a workdir:
  config.json                  the full run config (model fields included) of the latest start
  checkpoints/<step>/state     TrainState (params, optimizer, biases, step, RNG)
  checkpoints/<step>/data      the grain iterator's position (orbax's grain handler)
  corrupted_checkpoints/<step> a checkpoint that failed to restore, moved aside

Saves are asynchronous: `save` returns once the arrays are copied off the devices, the files
are written in the background, and orbax only marks a step complete after its last file, so a
killed save leaves no half-written step behind. A step whose files were damaged afterwards
fails to restore; `restore` then warns, moves it aside and falls back to the previous step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Callable

import grain
import ml_collections
import orbax.checkpoint as ocp

from dsv3_jax.config import ModelConfig
from dsv3_jax.training.run_config import ConfigError

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
CORRUPTED_DIR = "corrupted_checkpoints"
# Model fields that change how the model computes but not what it is: may differ on resume.
_NUMERICS_FIELDS = frozenset({"dtype", "remat_policy", "layer_loop", "capacity_factor",
                              "expert_block_size"})


def saved_steps(workdir: str) -> list[int]:
    """Steps with a complete checkpoint in `workdir` (no orbax manager, nothing created)."""
    root = os.path.join(workdir, CHECKPOINT_DIR)
    if not os.path.isdir(root):
        return []
    return sorted(int(name) for name in os.listdir(root)
                  if name.isdigit() and os.path.isdir(os.path.join(root, name)))


def load_config(workdir: str) -> ml_collections.ConfigDict | None:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    path = os.path.join(workdir, CONFIG_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(config.to_dict(), f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def check_workdir(workdir: str, model: ModelConfig) -> None:
    """ConfigError if `workdir` holds checkpoints of a model with different architecture."""
    if not saved_steps(workdir):
        return
    saved = load_config(workdir)
    if saved is None or "model" not in saved:
        raise ConfigError(f"workdir {workdir!r} holds checkpoints but no {CONFIG_FILE} saying "
                          "which model they are; use a new --workdir")
    ours = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)}
    ours["rope_scaling"] = (dataclasses.asdict(model.rope_scaling)
                            if model.rope_scaling is not None else None)
    theirs = saved.model.to_dict()
    diffs = [f"{k}: {theirs.get(k)!r} saved vs {v!r} now" for k, v in ours.items()
             if k not in _NUMERICS_FIELDS and _normalize(theirs.get(k)) != _normalize(v)]
    if diffs:
        raise ConfigError(f"workdir {workdir!r} holds checkpoints of a different model "
                          f"({'; '.join(diffs[:3])}{'; …' if len(diffs) > 3 else ''}); "
                          "use a new --workdir")


def _normalize(value):
    if isinstance(value, dict):
        return {k: _normalize(v) for k, v in value.items()}
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


class Checkpointer:
    """An orbax CheckpointManager over `workdir/checkpoints` with items `state` and `data`."""

    def __init__(self, workdir: str, keep: int, *, read_only: bool = False):
        # orbax (tensorstore) needs absolute paths; the workdir may be given relative.
        self.workdir, self.read_only = os.path.abspath(workdir), read_only
        self._manager = ocp.CheckpointManager(
            os.path.join(self.workdir, CHECKPOINT_DIR),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                                 read_only=read_only,
                                                 enable_async_checkpointing=True),
            item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state, data_iterator) -> bool:
        """Starts an async save of `state` and the iterator position; False if already saved."""
        if step in self._manager.all_steps():
            return False
        return self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator)), force=True)

    def restore(self, abstract_state, data_iterator=None,
                warn: Callable[[str], None] = print) -> tuple[object, int]:
        """(state, step) from the newest readable checkpoint, or (None, 0) if there is none.

        With `data_iterator`, its position is restored in place too.
        """
        for step in sorted(self._manager.all_steps(), reverse=True):
            items = {"state": ocp.args.StandardRestore(abstract_state)}
            if data_iterator is not None:
                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as e:  # any failure to read is treated as a damaged checkpoint
                _quiet_orphaned_reads()
                reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                action = ("skipping it" if self.read_only
                          else f"moved it to {self._move_aside(step)}")
                warn(f"warning: checkpoint {step} could not be restored ({type(e).__name__}: "
                     f"{reason}); {action} and trying the previous one")
                continue
            return restored.state, step
        return None, 0

    def _move_aside(self, step: int) -> str:
        source = os.path.join(self.workdir, CHECKPOINT_DIR, str(step))
        target = os.path.join(self.workdir, CORRUPTED_DIR, str(step))
        suffix = 0
        while os.path.exists(target):
            suffix += 1
            target = os.path.join(self.workdir, CORRUPTED_DIR, f"{step}.{suffix}")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.move(source, target)
        self._manager.reload()
        return target

    def wait(self):
        self._manager.wait_until_finished()

    def close(self):
        self._manager.wait_until_finished()
        self._manager.close()


def _quiet_orphaned_reads() -> None:
    """Silences the echo of a failed restore.

    When one array of a checkpoint fails to read, orbax's event loop closes while tensorstore
    still completes the other reads; each completion then reports an unraisable
    "RuntimeError: Event loop is closed" (hundreds of tracebacks for one damaged file). Those,
    and only those, are dropped; the warning above says what happened.
    """
    previous = sys.unraisablehook
    if getattr(previous, "_drops_closed_loop", False):
        return

    def hook(unraisable):
        if isinstance(unraisable.exc_value, RuntimeError) and \
                str(unraisable.exc_value) == "Event loop is closed":
            return
        previous(unraisable)

    hook._drops_closed_loop = True
    sys.unraisablehook = hook
