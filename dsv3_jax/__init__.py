"""dsv3-jax: DeepSeek-V3 in JAX/Flax."""

from dsv3_jax.config import PRESETS, ModelConfig, YarnScaling
from dsv3_jax.model import DeepSeekV3, ModelOutput, init_cache, init_variables

__all__ = ["PRESETS", "DeepSeekV3", "ModelConfig", "ModelOutput", "YarnScaling", "init_cache",
           "init_variables"]
