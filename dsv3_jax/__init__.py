"""dsv3-jax: DeepSeek-V3 in JAX/Flax."""

from dsv3_jax.backends import skip_absent_tpu
from dsv3_jax.host_memory import retain_on_cpu

skip_absent_tpu()  # before anything starts a backend: no libtpu probe without a TPU
retain_on_cpu()  # a CPU process keeps its freed memory: no page faults on every step

# ruff: noqa: E402

from dsv3_jax.accounting import count_params, flops_per_token, kv_cache_bytes
from dsv3_jax.config import PRESETS, ModelConfig, YarnScaling
from dsv3_jax.decode import Generation, generate
from dsv3_jax.decode_step import DecodeStep
from dsv3_jax.hf import load_hf_checkpoint, save_hf_checkpoint
from dsv3_jax.model import DeepSeekV3, ModelOutput, init_cache, init_variables

__all__ = ["PRESETS", "DecodeStep", "DeepSeekV3", "Generation", "ModelConfig", "ModelOutput",
           "YarnScaling", "count_params", "flops_per_token", "generate", "init_cache",
           "init_variables", "kv_cache_bytes", "load_hf_checkpoint", "save_hf_checkpoint"]
