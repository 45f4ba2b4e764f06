"""Which JAX backends a process starts: no TPU probe on a machine that has no TPU.

The `tpu-aot` extra installs libtpu so that `sharding.aot` can compile for described TPU slices
on any machine. With libtpu installed, JAX's start-up probes for a TPU on every run, and on a
machine without one libtpu prints errors ("Failed to find host bounds…", "unexpected worker
hostname…", a source-location trace) before falling back to the CPU. `skip_absent_tpu()`, run
when `dsv3_jax` is imported, limits JAX to the CPU when nothing else could be used:

  * no TPU chip on the PCI bus and no NVIDIA or AMD GPU visible (JAX's own hardware checks);
  * the user chose no platforms (`JAX_PLATFORMS` unset, `jax_platforms` not configured);
  * JAX has not started its backends yet.

A TPU or GPU host is left untouched and keeps using its accelerator; `JAX_PLATFORMS=…` always
wins. AOT compiles do not need the TPU backend: they load libtpu for a topology description.

`platform()` names the platform code is being traced for (a described TPU slice's under its
mesh), which picks the MoE's implementation and the CPU-only kernels.
"""

from __future__ import annotations

import os

import jax


def _accelerator_present() -> bool:
    from jax._src import hardware_utils

    tpu_chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
    return (tpu_chips > 0 or hardware_utils.has_visible_nvidia_gpu()
            or hardware_utils.num_available_amd_gpus(stop_at=1) > 0)


def skip_absent_tpu() -> bool:
    """Sets `jax_platforms` to "cpu" on a machine with no accelerator (see the module
    docstring). Returns True when it did."""
    from jax._src import xla_bridge

    if ("JAX_PLATFORMS" in os.environ or jax.config.jax_platforms is not None
            or xla_bridge.backends_are_initialized() or _accelerator_present()):
        return False
    jax.config.update("jax_platforms", "cpu")
    return True


def platform() -> str:
    """The platform code is traced for: the current mesh's devices, else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()
