"""Device meshes from a mesh config, and multi-host start-up.

A mesh config names five axes (any mapping or attribute object: a dict, an `ml_collections`
ConfigDict such as train.py's `config.mesh`, a dataclass):

  data    pure data parallelism: batch split, parameters replicated
  fsdp    batch split AND parameters / optimizer state split (ZeRO-3)
  expert  routed experts split; these ranks also split the batch for attention and dense layers
          (V3: expert-parallel ranks are data-parallel ranks everywhere else)
  tensor  attention heads, MLP hidden and vocab split (Megatron style); batch replicated
  pipe    pipeline stages (`sharding.pipeline`: 1F1B, ZB1P, DualPipe, DualPipeV)

Sizes must multiply to the device count; one of them may be -1 to take what is left. The device
mesh orders its axes pipe, data, fsdp, expert, tensor (slowest to fastest varying) so that the
axes with the most traffic — tensor's per-layer all-reduces, then expert's all-to-alls — span
the nearest devices (same host, same NVLink island) and the pipe's point-to-point hops the
farthest. All axes are `AxisType.Auto`: the model's logical constraints (linen) need Auto axes.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import math
import os
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "expert", "tensor", "pipe")  # config names, in config order
DEVICE_ORDER = ("pipe", "data", "fsdp", "expert", "tensor")  # device-mesh order, slow → fast
BATCH_AXES = ("data", "fsdp", "expert")  # axes the batch (and every token) is split over


def _size_of(mesh_config: Any, axis: str) -> int:
    if isinstance(mesh_config, Mapping):
        value = mesh_config.get(axis, 1)
    else:
        value = getattr(mesh_config, axis, 1)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"mesh.{axis}={value!r} is invalid: must be an integer >= 1 or -1")
    return value


def mesh_shape(mesh_config: Any, num_devices: int) -> dict[str, int]:
    """Resolves a mesh config to concrete axis sizes for `num_devices` devices.

    Args:
      mesh_config: sizes of data/fsdp/expert/tensor/pipe (missing axes are 1; one may be -1).
      num_devices: devices the mesh must cover exactly.
    Returns:
      {axis: size} for all five axes, in `AXES` order.
    Raises:
      ValueError: an unknown axis, a size that is not a positive integer or -1, more than one -1,
        or sizes whose product is not `num_devices`.
    """
    if isinstance(mesh_config, Mapping):
        unknown = sorted(set(mesh_config) - set(AXES))
        if unknown:
            raise ValueError(f"unknown mesh axes {unknown}; allowed: {list(AXES)}")
    sizes = {axis: _size_of(mesh_config, axis) for axis in AXES}
    for axis, size in sizes.items():
        if size < 1 and size != -1:
            raise ValueError(f"mesh.{axis}={size} is invalid: must be an integer >= 1 or -1")
    fill = [axis for axis, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise ValueError(f"mesh axes {fill} are all -1; at most one axis may be -1")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    described = " x ".join(f"{a}={s}" for a, s in sizes.items() if s != 1)
    if fill:
        if num_devices % fixed:
            raise ValueError(f"mesh {described}: the other axes multiply to {fixed}, which does "
                             f"not divide the {num_devices} devices, so mesh.{fill[0]}=-1 "
                             "cannot be filled")
        sizes[fill[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(f"mesh {described or 'of all 1s'} has {fixed} devices but "
                         f"{num_devices} are available; sizes must multiply to the device "
                         "count (or set one axis to -1)")
    return sizes


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The device mesh for a mesh config over `devices` (default: every device of every process).

    Raises:
      ValueError: as `mesh_shape`.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(mesh_config, len(devices))
    # Logical axes may split a physical torus axis (e.g. data=2 × fsdp=2 on a 4-chip ring):
    # jax.make_mesh refuses that, create_device_mesh allows it and still keeps neighbours close.
    grid = mesh_utils.create_device_mesh([sizes[a] for a in DEVICE_ORDER], devices,
                                         allow_split_physical_axes=True)
    return Mesh(grid, DEVICE_ORDER, axis_types=(AxisType.Auto,) * len(DEVICE_ORDER))


def abstract_mesh(mesh_config: Any, num_devices: int) -> AbstractMesh:
    """A device-free mesh of the same shape (for planning sizes nobody can run here)."""
    sizes = mesh_shape(mesh_config, num_devices)
    return AbstractMesh(tuple(sizes[a] for a in DEVICE_ORDER), DEVICE_ORDER,
                        axis_types=(AxisType.Auto,) * len(DEVICE_ORDER))


def batch_shards(mesh: Mesh | AbstractMesh) -> int:
    """How many ways the global batch is split (product of the batch axes in the mesh)."""
    shape = dict(mesh.shape)
    return math.prod(shape.get(axis, 1) for axis in BATCH_AXES)


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None) -> bool:
    """Joins a multi-process job (`jax.distributed.initialize`) when one is described.

    Call before anything touches a device. With all three arguments None/empty this is a no-op
    (a single process), so train.py can call it unconditionally with its flag values.

    Args:
      coordinator_address: "host:port" of process 0's coordination service.
      num_processes: total processes in the job.
      process_id: this process's index in [0, num_processes).
    Returns:
      True when the process joined a multi-process job.
    Raises:
      ValueError: only some of the three are given, or they are inconsistent.
    """
    given = [coordinator_address, num_processes, process_id]
    if all(v in (None, "") for v in given):
        return False
    if any(v in (None, "") for v in given):
        raise ValueError("multi-host needs all of --coordinator_address, --num_processes and "
                         f"--process_id; got {coordinator_address!r}, {num_processes!r}, "
                         f"{process_id!r}")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(f"--process_id={process_id} must be in [0, --num_processes="
                         f"{num_processes})")
    if ":" not in coordinator_address:
        raise ValueError(f"--coordinator_address={coordinator_address!r} must be host:port")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    if jax.default_backend() == "cpu":  # cross-process collectives over gloo
        route_gloo_output()
    return True


GLOO_PREFIX = b"[Gloo] "
_log = logging.getLogger(__name__)
_router: _StdoutRouter | None = None


class _StdoutRouter:
    """File descriptor 1 through a pipe: each "[Gloo] …" message (from `GLOO_PREFIX` to the end
    of its line) goes to the log at INFO, every other byte to the real stdout, unchanged and in
    order.

    Gloo (the CPU collectives of a multi-process job) prints one "[Gloo] Rank r is connected to
    n peer ranks …" line with C++ `std::cout` for every communicator it builds — lazily, at a
    program's first run, not at initialization, and from several threads at once — so only a
    filter on the descriptor itself, for the process's life, keeps them off stdout. A message
    is recognized wherever it starts, not only at a line start: writes of different threads
    interleave, so one can land in the middle of another line (CI once saw "…7[Gloo] Rank 3 …").
    Python's prints pass through the same pipe, so the order of everything written to stdout is
    kept; text without a newline (a progress bar's carriage returns) is passed on as it
    arrives, except a tail that might be the start of a message.
    """

    def __init__(self):
        sys.stdout.flush()
        self._real = os.dup(1)
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 1)
        os.close(write_fd)
        self._thread = threading.Thread(target=self._forward, args=(read_fd,), daemon=True,
                                        name="gloo-stdout-router")
        self._thread.start()
        atexit.register(self.close)

    def _forward(self, read_fd: int) -> None:
        pending = b""
        try:
            while chunk := os.read(read_fd, 65536):
                pending = self._route(pending + chunk)
            if pending:  # an unterminated last message, or a tail that was not one
                self._emit(pending, pending.startswith(GLOO_PREFIX))
        finally:
            os.close(read_fd)

    def _route(self, data: bytes) -> bytes:
        """Routes what can be decided; returns the undecided bytes: an unterminated message, or
        a tail that is a proper prefix of `GLOO_PREFIX`."""
        while data:
            at = data.find(GLOO_PREFIX)
            if at < 0:
                keep = next((n for n in range(min(len(data), len(GLOO_PREFIX) - 1), 0, -1)
                             if GLOO_PREFIX.startswith(data[-n:])), 0)
                self._emit(data[:len(data) - keep], False)
                return data[len(data) - keep:]
            self._emit(data[:at], False)
            end = data.find(b"\n", at)
            if end < 0:
                return data[at:]  # the rest of the message is on its way
            self._emit(data[at:end], True)
            data = data[end + 1:]
        return b""

    def _emit(self, data: bytes, gloo: bool) -> None:
        if not data:
            return
        if gloo:
            _log.info("%s", data.decode(errors="replace").rstrip())
            return
        while data:
            data = data[os.write(self._real, data):]

    def close(self) -> None:
        """Restores fd 1 and forwards what is still in the pipe (at exit)."""
        try:
            sys.stdout.flush()
            ctypes.CDLL(None).fflush(None)  # C/C++ stdio buffers (std::cout is synced to them)
        except Exception:  # a closed stream at shutdown must not stop the restore
            pass
        os.dup2(self._real, 1)  # closes the pipe's last write end: the thread sees EOF
        self._thread.join(timeout=10)


def route_gloo_output() -> None:
    """Sends gloo's per-connection "[Gloo] Rank …" lines from stdout to the log at INFO, for
    the rest of the process (see `_StdoutRouter`). Idempotent; `initialize_distributed` calls
    it for CPU jobs."""
    global _router
    if _router is None:
        _router = _StdoutRouter()


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device (scalars, metrics)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a [B, ...] batch: rows split over data × fsdp × expert."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def global_batch(local_rows, mesh: Mesh) -> jax.Array:
    """The global [B, ...] batch array from this process's rows (its contiguous slice).

    With one process this is a device_put; with several, each passes its own B / num_processes
    rows (process p the p-th slice), as the device mesh orders processes' devices contiguously.
    """
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local_rows)


def batch_from_global(rows, mesh: Mesh) -> jax.Array:
    """The batch-split global array from the whole batch, present on every process (e.g. the
    evaluation batches, which every process builds in full)."""
    return jax.make_array_from_callback(rows.shape, batch_sharding(mesh), lambda i: rows[i])
