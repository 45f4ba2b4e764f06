"""ModelConfig: the DeepSeek-V3 architecture, in Hugging Face `config.json` field names.

The dataclass is frozen and hashable, so it can be a static argument of `jax.jit` and a field of
a Flax module. All validation lives in `_validate`, which runs on construction: an impossible
combination raises `ValueError` naming the field and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

_DTYPES = ("float32", "bfloat16", "float16")  # canonical names (= numpy/torch dtype names)
# Not HF `config.json` fields: numerics and implementation choices. `to_hf` leaves them out and
# `from_hf` takes them from its overrides only (transformers 5 writes a `dtype` key, the weights'
# storage dtype, which is not our compute dtype).
NON_HF_FIELDS = frozenset({"dtype", "param_dtype", "remat_policy", "layer_loop", "fp8",
                            "fp8_amax_history_length", "fp8_margin", "capacity_factor",
                            "expert_block_size", "expert_shard_limit", "moe_impl",
                            "ep_buffer_factor"})
_REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
FP8_RECIPES = ("none", "delayed", "blockwise")  # dsv3_jax/fp8.py implements them
MOE_IMPLS = ("auto", "blocks", "ragged", "capacity")  # dsv3_jax/moe.py documents them
LAYER_LOOPS = ("auto", "scan", "unrolled")  # ModelConfig.layer_loop
# layer_loop="auto" unrolls a block stack of at most this many layers.
UNROLLED_STACK_MAX = 8


@dataclasses.dataclass(frozen=True)
class YarnScaling:
    """YaRN long-context RoPE parameters (HF `rope_scaling` with type "yarn")."""

    factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0

    def to_hf(self) -> dict[str, Any]:
        return {"type": "yarn", "rope_type": "yarn", **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """DeepSeek-V3 architecture. Field names follow HF `DeepseekV3Config` (REFERENCE §1)."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: YarnScaling | None = YarnScaling()
    num_nextn_predict_layers: int = 1
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # Not in HF: numerics and implementation choices.
    # dtype / param_dtype: "float32", "bfloat16" or "float16", or a dtype or scalar type of one
    # (jnp.bfloat16, np.float32, jnp.dtype("bfloat16"), ...); stored as the canonical name.
    dtype: str = "float32"  # compute dtype of activations and matmul inputs
    param_dtype: str = "float32"  # storage dtype of parameters (fp32 master weights)
    remat_policy: str = "none"  # activation checkpointing of each scanned block
    # How each block stack's layers run (parameters are stacked [L, ...] either way): "scan"
    # (one compiled body: compile time flat in depth), "unrolled" (each layer its own code: no
    # per-layer slices of the stacks and no zero-filled [L, ...] residual stacks, compile time
    # grows with depth), or "auto": unrolled for the forward passes without a decode cache
    # (training, scoring) of a stack of at most UNROLLED_STACK_MAX layers, without remat (the
    # loop is what keeps a remat policy's recomputation from being scheduled early: unrolled,
    # "full" saved 13% of a TPU step's temporaries instead of 20+%). Measured on 2 CPU
    # cores (bench config, 5 MoE layers): the train step 1,070 → 920 ms unrolled, but prefill
    # 158 → 184 ms and a batch-8 decode step 10.7 → 21.9 ms, hence scanned passes with a cache.
    layer_loop: str = "auto"
    # FP8 recipe of the weight projections (dsv3_jax/fp8.py): "none", "delayed" (per-tensor
    # delayed scaling, state in the `fp8` collection) or "blockwise" (1x128 / 128x128 tiles).
    fp8: str = "none"
    fp8_amax_history_length: int = 1024  # delayed: amaxes remembered per operand
    fp8_margin: int = 0  # delayed: scales leave 2^margin of headroom
    capacity_factor: float | None = None  # None: dropless; else per-expert slots = cf·N·K/E
    # Dropless: tokens per expert block of the grouped matmul. Larger blocks gather fewer copies
    # of the expert weights but pad more (benchmarks/moe_vs_dense.py measures the trade).
    expert_block_size: int = 64
    # Device-limited routing (V3's node-limited): None, or M = the most expert shards (devices
    # of the mesh's `expert` axis) one token may use; applies only when the experts are split
    # over more than M shards, so routing then depends on the expert-parallel degree.
    expert_shard_limit: int | None = None
    # Routed-expert compute (dsv3_jax/moe.py): "blocks" (dropless, sorted tokens in padded blocks,
    # one batched matmul with gathered weights: fast on XLA:CPU), "ragged" (dropless, sorted
    # tokens through jax.lax.ragged_dot grouped GEMMs; under expert parallelism the tokens move
    # with ragged_all_to_all), "capacity" (capacity_factor slots per expert, may drop), or
    # "auto": "capacity" when capacity_factor is set, else "ragged" on TPU/GPU and "blocks" on
    # CPU (logged once per choice). "ragged" has no FP8 recipe (auto then picks "blocks").
    moe_impl: str = "auto"
    # Ragged expert parallelism: each device's receive buffer holds ep_buffer_factor x the
    # expected load (its own n·K assignments); a step that routes more to one device than that
    # runs extra exchange rounds for the excess (counted and logged), never drops.
    ep_buffer_factor: float = 2.0

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", _yarn_from_hf(self.rope_scaling))
        for name in ("dtype", "param_dtype"):  # "bfloat16" whichever way it was spelled
            object.__setattr__(self, name, _dtype_name(getattr(self, name)))
        _validate(self)

    # ---- derived sizes ---------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.num_dense_layers

    @property
    def num_dense_layers(self) -> int:
        return min(self.first_k_dense_replace, self.num_hidden_layers)

    def unrolled(self, layers: int, cached: bool = False) -> bool:
        """Whether a block stack of `layers` layers runs unrolled (`layer_loop`), in a forward
        pass with (`cached`) or without a decode cache."""
        if self.layer_loop == "auto":
            return layers <= UNROLLED_STACK_MAX and not cached and self.remat_policy == "none"
        return self.layer_loop == "unrolled"

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ---- presets and HF conversion ---------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; allowed: {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> ModelConfig:
        """From a dict of ModelConfig fields (`rope_scaling` may be a dict), e.g. a run config's
        `config.model.to_dict()`. TypeError on an unknown field, ValueError on a bad value."""
        rope = fields.get("rope_scaling")
        if isinstance(rope, dict):
            fields = {**fields, "rope_scaling": YarnScaling(**rope)}
        return cls(**fields)

    @classmethod
    def from_hf(cls, config: dict[str, Any] | str | os.PathLike, **overrides) -> ModelConfig:
        """Builds a config from an HF `config.json` dict, file, or checkpoint directory.

        Numerics fields (`dtype`, `param_dtype`, ...) come from `overrides` only, never from the
        HF dict (whose `dtype`/`torch_dtype` is the checkpoint's storage dtype)."""
        if not isinstance(config, dict):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            with open(path) as f:
                config = json.load(f)
        names = {f.name for f in dataclasses.fields(cls)} - NON_HF_FIELDS
        kwargs = {k: v for k, v in config.items() if k in names}
        rope = config.get("rope_scaling") or config.get("rope_parameters")
        if isinstance(rope, dict):
            kind = rope.get("type", rope.get("rope_type", "default"))
            kwargs["rope_scaling"] = None if kind == "default" else rope
            if "rope_theta" in rope and "rope_theta" not in config:
                kwargs["rope_theta"] = rope["rope_theta"]
        else:
            kwargs["rope_scaling"] = None
        for key in ("n_group", "topk_group"):  # V2-Lite style configs leave these null
            if kwargs.get(key) is None:
                kwargs[key] = 1
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` dict that `transformers.DeepseekV3Config` reads."""
        hf_fields = {f.name for f in dataclasses.fields(self)} - NON_HF_FIELDS
        out = {k: getattr(self, k) for k in sorted(hf_fields)}
        out["rope_scaling"] = self.rope_scaling.to_hf() if self.rope_scaling else None
        out.update(
            architectures=["DeepseekV3ForCausalLM"],
            model_type="deepseek_v3",
            num_key_value_heads=self.num_attention_heads,
            attention_bias=False,
            rope_interleave=True,
            torch_dtype=self.param_dtype,  # canonical names are torch's names
        )
        return out


def _yarn_from_hf(rope: dict[str, Any]) -> YarnScaling:
    kind = rope.get("type", rope.get("rope_type"))
    if kind != "yarn":
        raise ValueError(f"rope_scaling type {kind!r} is not supported; allowed: 'yarn' or null")
    fields = {f.name for f in dataclasses.fields(YarnScaling)}
    return YarnScaling(**{k: v for k, v in rope.items() if k in fields and v is not None})


def _dtype_name(value: Any) -> Any:
    """The canonical name of a dtype object or scalar type (jnp.bfloat16, np.float32,
    jnp.dtype("bfloat16"), ...: what `jnp.dtype` accepts). Strings are left as they are: only
    the canonical names are valid, so a run config (strings, saved beside its checkpoints and
    compared on resume) has one spelling per dtype. Anything else is returned unchanged, for
    `_validate` to reject."""
    if isinstance(value, str) or value is None or isinstance(value, (bool, int, float)):
        return value  # (np.dtype(None) would be float64)
    import jax.numpy as jnp  # here: importing the config module stays cheap

    try:
        return jnp.dtype(value).name
    except (TypeError, ValueError):
        return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(ok: bool, field: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"ModelConfig.{field}={value!r} is invalid: {allowed}")


def _validate(c: ModelConfig) -> None:
    positive = ["vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
                "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok",
                "n_group", "topk_group", "max_position_embeddings", "expert_block_size"]
    for name in positive:
        value = getattr(c, name)
        _require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                 name, "must be a positive integer", value)
    for name in ("first_k_dense_replace", "n_shared_experts", "num_nextn_predict_layers"):
        value = getattr(c, name)
        _require(isinstance(value, int) and value >= 0, name, "must be an integer >= 0", value)
    _require(c.q_lora_rank is None or (isinstance(c.q_lora_rank, int) and c.q_lora_rank > 0),
             "q_lora_rank", "must be a positive integer or None (no query compression)",
             c.q_lora_rank)
    _require(c.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
             "must be even (RoPE rotates pairs)", c.qk_rope_head_dim)
    _require(c.num_experts_per_tok <= c.n_routed_experts, "num_experts_per_tok",
             f"must be <= n_routed_experts={c.n_routed_experts}", c.num_experts_per_tok)
    _require(c.n_routed_experts % c.n_group == 0, "n_group",
             f"must divide n_routed_experts={c.n_routed_experts}", c.n_group)
    _require(c.topk_group <= c.n_group, "topk_group", f"must be <= n_group={c.n_group}",
             c.topk_group)
    per_group = c.n_routed_experts // c.n_group
    _require(c.topk_group * per_group >= c.num_experts_per_tok, "topk_group",
             f"topk_group x experts per group ({per_group}) must be >= num_experts_per_tok="
             f"{c.num_experts_per_tok}", c.topk_group)
    _require(c.scoring_func == "sigmoid", "scoring_func", "allowed: 'sigmoid'", c.scoring_func)
    _require(c.topk_method == "noaux_tc", "topk_method", "allowed: 'noaux_tc'", c.topk_method)
    _require(c.hidden_act == "silu", "hidden_act", "allowed: 'silu'", c.hidden_act)
    _require(not c.tie_word_embeddings, "tie_word_embeddings",
             "DeepSeek-V3 has an untied head; allowed: False", c.tie_word_embeddings)
    _require(c.rms_norm_eps > 0, "rms_norm_eps", "must be > 0", c.rms_norm_eps)
    _require(c.rope_theta > 0, "rope_theta", "must be > 0", c.rope_theta)
    _require(c.routed_scaling_factor > 0, "routed_scaling_factor", "must be > 0",
             c.routed_scaling_factor)
    _require(c.rope_scaling is None or isinstance(c.rope_scaling, YarnScaling), "rope_scaling",
             "allowed: None, a YarnScaling, or an HF dict with type 'yarn'", c.rope_scaling)
    if c.rope_scaling is not None:
        y = c.rope_scaling
        _require(y.factor >= 1.0, "rope_scaling.factor", "must be >= 1", y.factor)
        _require(y.original_max_position_embeddings > 0,
                 "rope_scaling.original_max_position_embeddings", "must be > 0",
                 y.original_max_position_embeddings)
        _require(y.beta_fast > 0 and y.beta_slow > 0, "rope_scaling.beta_fast/beta_slow",
                 "must be > 0", (y.beta_fast, y.beta_slow))
    for name in ("dtype", "param_dtype"):
        value = getattr(c, name)
        _require(isinstance(value, str) and value in _DTYPES, name,
                 f"allowed: {', '.join(map(repr, _DTYPES))}, or a dtype or scalar type of one "
                 "(jnp.bfloat16, np.float32, jnp.dtype('bfloat16'))", value)
    _require(c.remat_policy in _REMAT_POLICIES, "remat_policy", f"allowed: {_REMAT_POLICIES}",
             c.remat_policy)
    _require(c.layer_loop in LAYER_LOOPS, "layer_loop", f"allowed: {LAYER_LOOPS}", c.layer_loop)
    _require(c.fp8 in FP8_RECIPES, "fp8", f"allowed: {FP8_RECIPES}", c.fp8)
    _require(_is_int(c.fp8_amax_history_length) and c.fp8_amax_history_length >= 1,
             "fp8_amax_history_length", "must be an integer >= 1", c.fp8_amax_history_length)
    _require(_is_int(c.fp8_margin) and c.fp8_margin >= 0, "fp8_margin",
             "must be an integer >= 0", c.fp8_margin)
    _require(c.expert_shard_limit is None or (
        isinstance(c.expert_shard_limit, int) and not isinstance(c.expert_shard_limit, bool)
        and c.expert_shard_limit > 0), "expert_shard_limit",
             "must be None (no device limit) or a positive integer", c.expert_shard_limit)
    _require(c.capacity_factor is None or (c.capacity_factor > 0 and math.isfinite(
        c.capacity_factor)), "capacity_factor", "must be None (dropless) or > 0",
             c.capacity_factor)
    _require(c.moe_impl in MOE_IMPLS, "moe_impl", f"allowed: {MOE_IMPLS}", c.moe_impl)
    _require(c.moe_impl != "capacity" or c.capacity_factor is not None, "moe_impl",
             "'capacity' needs capacity_factor (slots per expert = cf·N·K/E)", c.moe_impl)
    _require(c.capacity_factor is None or c.moe_impl in ("auto", "capacity"), "capacity_factor",
             f"is for moe_impl 'capacity' (or 'auto'), not the dropless {c.moe_impl!r}",
             c.capacity_factor)
    _require(c.moe_impl != "ragged" or c.fp8 == "none", "moe_impl",
             f"'ragged' runs without an FP8 recipe (fp8={c.fp8!r}): use 'blocks' or 'auto'",
             c.moe_impl)
    _require(isinstance(c.ep_buffer_factor, (int, float)) and not isinstance(
        c.ep_buffer_factor, bool) and math.isfinite(c.ep_buffer_factor)
             and c.ep_buffer_factor >= 1, "ep_buffer_factor",
             "must be a number >= 1 (receive rows per device / its own N·K assignments)",
             c.ep_buffer_factor)


PRESETS: dict[str, ModelConfig] = {
    # The published DeepSeek-V3 configuration (HF config.json of deepseek-ai/DeepSeek-V3).
    "deepseek-v3-671b": ModelConfig(dtype="bfloat16", remat_policy="full"),
    # Every code path, in a model that runs in milliseconds: 1 dense + 3 MoE layers, q_lora,
    # group-limited routing (4 groups, keep 2), YaRN, one MTP module.
    "tiny": ModelConfig(
        vocab_size=384, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=4, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=16,
        n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
        first_k_dense_replace=1, max_position_embeddings=1024,
        rope_scaling=YarnScaling(factor=4.0, original_max_position_embeddings=256),
        num_nextn_predict_layers=1, expert_block_size=16),
    # ~40M parameters (~12M active): trains on a 2-core CPU in minutes.
    "small": ModelConfig(
        vocab_size=384, hidden_size=384, intermediate_size=1024, moe_intermediate_size=256,
        num_hidden_layers=6, num_attention_heads=6, q_lora_rank=192, kv_lora_rank=128,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=32,
        n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
        first_k_dense_replace=1, max_position_embeddings=4096,
        rope_scaling=YarnScaling(factor=4.0, original_max_position_embeddings=1024),
        num_nextn_predict_layers=1, expert_block_size=256),
}
