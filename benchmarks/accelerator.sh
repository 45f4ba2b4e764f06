#!/usr/bin/env bash
# Blocks vs ragged routed experts on the attached accelerator (TPU or GPU), one JSON line per
# figure: the MoE layer's forward+backward and a small-preset train step.
#
#   bash benchmarks/accelerator.sh            # the figures (default sizes)
#   bash benchmarks/accelerator.sh --dry_run  # tiny sizes: checks the script, runs anywhere
#
# Extra arguments go to `python -m benchmarks.moe_impls`. Without --dry_run it refuses to run
# on a CPU-only machine (the CPU figures would say nothing about ragged_dot on an accelerator).
set -euo pipefail
cd "$(dirname "$0")/.."
backend=$(python -c "import dsv3_jax, jax; print(jax.default_backend())" 2>/dev/null | tail -1)
dry=0
for arg in "$@"; do [[ "$arg" == "--dry_run" ]] && dry=1; done
if [[ "$backend" == "cpu" && "$dry" == 0 ]]; then
  echo "benchmarks/accelerator.sh: no TPU or GPU attached (JAX backend: cpu); use --dry_run" >&2
  exit 2
fi
exec python -m benchmarks.moe_impls "$@"
