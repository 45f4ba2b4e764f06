"""Hugging Face DeepSeek-V3 checkpoints: load into our variables, save from them.

One table (`hf_layout`) says, for every HF tensor, which slices of which of our leaves it becomes:
the HF tensor is reshaped to `view`, transposed by `perm` and split along its last axis into
`pieces`; saving runs the same steps backwards. torch Linear weights are [out, in], our Einsum
kernels [in..., out...] (dimension key in `mla.py`):

  q_a_proj [Q, D] → [D, Q]          q_b_proj [N·(H+R), Q] → q_b_proj_nope [Q,N,H] | _pe [Q,N,R]
  q_proj [N·(H+R), D] → q_proj_nope [D,N,H] | q_proj_pe [D,N,R]          (q_lora_rank is None)
  kv_a_proj_with_mqa [C+R, D] → kv_a_proj [D,C] | k_pe_proj [D,R]
  kv_b_proj [N·(H+A), C] → kv_b_proj_k [C,N,H] | kv_b_proj_v [C,N,A]     o_proj [D, N·A] → [N,A,D]
  mlp.gate [E, D] → [D, E]       mlp.gate.e_score_correction_bias [E] → moe_bias row
  mlp.experts.e.{gate,up}_proj [F, D] → experts/{gate,up}_proj[e] [D,F];  down [D, F] → [F, D]
  (fused, transformers ≥ 5 in memory: experts.gate_up_proj [E, 2F, D] gate rows first, then up;
   experts.down_proj [E, D, F])
  MTP depth k = layer num_hidden_layers + k: enorm, hnorm, eh_proj [D, 2D] → [2D, D], the block,
  shared_head.norm → mtp_k/shared_head_norm; its embed_tokens and shared_head.head are copies of
  the main model's (saved, checked on load, not stored twice).

RoPE needs no permutation: our rotation acts on interleaved pairs in the weights' native layout,
which is what HF computes with `rope_interleave=True`.

Loading reads one tensor at a time through `safetensors.safe_open` into preallocated host arrays,
so memory beyond the result is bounded by the largest tensor. FP8 checkpoints (float8_e4m3fn
weights with `<name>_scale_inv` [ceil(out/128), ceil(in/128)]) are dequantized per 128×128
block on the way in (or per `quantization_config.weight_block_size` when config.json has one).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re
import struct
import warnings

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from dsv3_jax import fp8 as fp8_lib
from dsv3_jax.config import ModelConfig
from dsv3_jax.model import init_variables

FP8_BLOCK = 128
INDEX_FILE = "model.safetensors.index.json"
# safetensors' numpy backend cannot build float8 arrays; those are read from the raw bytes.
_RAW_DTYPES = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
# Buffers some exporters write that carry no weights.
_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Piece:
    """A slice of one of our leaves: variables[path][index] (index: layer in a stack, expert)."""

    path: Path
    index: tuple[int, ...]
    size: int  # extent along the split axis (the last axis after the transpose)


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One HF tensor: reshape to `view`, transpose by `perm`, split the last axis into pieces."""

    name: str
    shape: tuple[int, ...]
    view: tuple[int, ...]
    perm: tuple[int, ...]
    pieces: tuple[Piece, ...]
    copy: bool = False  # MTP's copies of embed/head: must equal the main model's, not stored

    def to_ours(self, x: np.ndarray) -> list[np.ndarray]:
        y = x.reshape(self.view).transpose(self.perm)
        return np.split(y, np.cumsum([p.size for p in self.pieces])[:-1], axis=-1)

    def to_hf(self, parts: list[np.ndarray]) -> np.ndarray:
        y = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)
        return y.transpose(np.argsort(self.perm)).reshape(self.shape)


def _linear(name: str, out: int, inp: int, path: Path, index=()) -> TensorMap:
    """torch Linear [out, in] ↔ our kernel [in, out]."""
    return TensorMap(name, (out, inp), (out, inp), (1, 0), (Piece(path, index, out),))


def _vector(name: str, n: int, path: Path, index=()) -> TensorMap:
    return TensorMap(name, (n,), (n,), (0,), (Piece(path, index, n),))


def _block(c: ModelConfig, prefix: str, at: Path, idx: tuple[int, ...], moe: bool,
           bias_row: int | None, fused: bool) -> list[TensorMap]:
    """The tensors of one decoder layer `prefix` (e.g. 'model.layers.3.') stored at `at`[idx]."""
    D, N, H, R, A, C = (c.hidden_size, c.num_attention_heads, c.qk_nope_head_dim,
                        c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank)
    p = lambda *names: at + names  # noqa: E731
    a, sa = prefix + "self_attn.", ("self_attn",)
    maps = [_vector(prefix + "input_layernorm.weight", D, p("input_layernorm", "weight"), idx),
            _vector(prefix + "post_attention_layernorm.weight", D,
                    p("post_attention_layernorm", "weight"), idx)]
    # Per head the q rows are [nope H | rope R]; kv_b rows are [k_nope H | v A].
    if c.q_lora_rank is None:
        maps.append(TensorMap(a + "q_proj.weight", (N * (H + R), D), (N, H + R, D), (2, 0, 1), (
            Piece(p(*sa, "q_proj_nope", "kernel"), idx, H),
            Piece(p(*sa, "q_proj_pe", "kernel"), idx, R))))
    else:
        Q = c.q_lora_rank
        maps += [
            _linear(a + "q_a_proj.weight", Q, D, p(*sa, "q_a_proj", "kernel"), idx),
            _vector(a + "q_a_layernorm.weight", Q, p(*sa, "q_a_layernorm", "weight"), idx),
            TensorMap(a + "q_b_proj.weight", (N * (H + R), Q), (N, H + R, Q), (2, 0, 1), (
                Piece(p(*sa, "q_b_proj_nope", "kernel"), idx, H),
                Piece(p(*sa, "q_b_proj_pe", "kernel"), idx, R)))]
    maps += [
        TensorMap(a + "kv_a_proj_with_mqa.weight", (C + R, D), (C + R, D), (1, 0), (
            Piece(p(*sa, "kv_a_proj", "kernel"), idx, C),
            Piece(p(*sa, "k_pe_proj", "kernel"), idx, R))),
        _vector(a + "kv_a_layernorm.weight", C, p(*sa, "kv_a_layernorm", "weight"), idx),
        TensorMap(a + "kv_b_proj.weight", (N * (H + A), C), (N, H + A, C), (2, 0, 1), (
            Piece(p(*sa, "kv_b_proj_k", "kernel"), idx, H),
            Piece(p(*sa, "kv_b_proj_v", "kernel"), idx, A))),
        TensorMap(a + "o_proj.weight", (D, N * A), (D, N, A), (1, 2, 0),
                  (Piece(p(*sa, "o_proj", "kernel"), idx, D),))]
    m = prefix + "mlp."
    if not moe:
        return maps + _swiglu(m, c.intermediate_size, D, p("mlp"), idx)
    E, F = c.n_routed_experts, c.moe_intermediate_size
    maps += [_linear(m + "gate.weight", E, D, p("mlp", "gate", "kernel"), idx),
             _vector(m + "gate.e_score_correction_bias", E, ("moe_bias", "e_score_correction_bias"),
                     (bias_row,))]
    if c.n_shared_experts:
        maps += _swiglu(m + "shared_experts.", c.n_shared_experts * F, D,
                        p("mlp", "shared_experts"), idx)
    ex = p("mlp", "experts")
    if fused:
        maps += [
            TensorMap(m + "experts.gate_up_proj", (E, 2 * F, D), (E, 2 * F, D), (0, 2, 1), (
                Piece(ex + ("gate_proj", "kernel"), idx, F),
                Piece(ex + ("up_proj", "kernel"), idx, F))),
            TensorMap(m + "experts.down_proj", (E, D, F), (E, D, F), (0, 2, 1),
                      (Piece(ex + ("down_proj", "kernel"), idx, D),))]
    else:
        for e in range(E):
            maps += _swiglu(f"{m}experts.{e}.", F, D, ex, idx + (e,))
    return maps


def _swiglu(prefix: str, F: int, D: int, at: Path, idx) -> list[TensorMap]:
    """gate/up [F, D] → [D, F]; down [D, F] → [F, D]."""
    return [_linear(prefix + "gate_proj.weight", F, D, at + ("gate_proj", "kernel"), idx),
            _linear(prefix + "up_proj.weight", F, D, at + ("up_proj", "kernel"), idx),
            _linear(prefix + "down_proj.weight", D, F, at + ("down_proj", "kernel"), idx)]


def hf_layout(config: ModelConfig, fused_layers: frozenset[int] = frozenset()) -> list[TensorMap]:
    """Every HF tensor of `config` and where it lives in our variables.

    Args:
      config: the architecture; MTP layers are included for num_nextn_predict_layers > 0.
      fused_layers: HF layer indices whose experts use the fused `gate_up_proj`/`down_proj`
        layout; all others use per-expert tensors (the on-disk layout).
    Returns:
      TensorMaps, main embedding and head first (the MTP copies are checked against them).
    """
    c = config
    D, V, L = c.hidden_size, c.vocab_size, c.num_hidden_layers
    maps = [TensorMap("model.embed_tokens.weight", (V, D), (V, D), (0, 1),
                      (Piece(("params", "embed_tokens"), (), D),)),
            _linear("lm_head.weight", V, D, ("params", "lm_head", "kernel")),
            _vector("model.norm.weight", D, ("params", "norm", "weight"))]
    for i in range(L):
        moe = i >= c.num_dense_layers
        j = i - c.num_dense_layers if moe else i
        maps += _block(c, f"model.layers.{i}.", ("params", "moe_layers" if moe else "dense_layers"),
                       (j,), moe, j if moe else None, i in fused_layers)
    for k in range(c.num_nextn_predict_layers):
        i, at = L + k, ("params", f"mtp_{k}")
        prefix = f"model.layers.{i}."
        maps += [_vector(prefix + "enorm.weight", D, at + ("enorm", "weight")),
                 _vector(prefix + "hnorm.weight", D, at + ("hnorm", "weight")),
                 _linear(prefix + "eh_proj.weight", D, 2 * D, at + ("eh_proj", "kernel")),
                 _vector(prefix + "shared_head.norm.weight", D,
                         at + ("shared_head_norm", "weight")),
                 dataclasses.replace(maps[0], name=prefix + "embed_tokens.weight", copy=True),
                 dataclasses.replace(maps[1], name=prefix + "shared_head.head.weight", copy=True)]
        maps += _block(c, prefix, at + ("block",), (), True, c.num_moe_layers + k,
                       i in fused_layers)
    return maps


def dequantize_fp8_blocks(weight: np.ndarray, scale_inv: np.ndarray,
                          block: tuple[int, int] = (FP8_BLOCK, FP8_BLOCK)) -> np.ndarray:
    """W = W_fp8 · scale_inv per tile of `block` = (rows, cols); edge tiles may be smaller
    (`fp8.blockwise_dequantize`, the one definition of the convention).

    Args:
      weight: [O, I] float8 weight.
      scale_inv: [ceil(O/rows), ceil(I/cols)] per-tile scale.
    Returns:
      [O, I] float32.
    """
    return fp8_lib.blockwise_dequantize(weight, scale_inv, block, np.float32)


def _fp8_quantized(name: str) -> bool:
    """The tensors DeepSeek's FP8 release stores as float8_e4m3fn + `weight_scale_inv`: every
    linear projection of the decoder layers (attention, dense MLP, shared and routed experts),
    not the embedding, LM head, router gate, norms, correction biases or MTP's eh_proj."""
    return (name.startswith("model.layers.") and name.endswith("_proj.weight")
            and not name.endswith("eh_proj.weight"))


FP8_QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                           "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}


class _Reader:
    """The tensors of a checkpoint directory, by name, one at a time (single file or sharded)."""

    def __init__(self, directory: str):
        index = os.path.join(directory, INDEX_FILE)
        weight_map = None
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
            for name, file in weight_map.items():
                if not os.path.isfile(os.path.join(directory, file)):
                    raise FileNotFoundError(
                        f"{index} maps tensor {name!r} to {file!r}, which does not exist")
        else:
            files = sorted(os.path.basename(f)
                           for f in glob.glob(os.path.join(directory, "*.safetensors")))
            if not files:
                raise FileNotFoundError(f"no *.safetensors files (and no {INDEX_FILE}) in "
                                        f"{directory}")
        self._paths = {f: os.path.join(directory, f) for f in files}
        self._handles = {f: safe_open(p, framework="np") for f, p in self._paths.items()}
        self._headers: dict[str, tuple[int, dict]] = {}  # raw reads: (header length, header)
        self.file_of: dict[str, str] = {}
        for file, handle in self._handles.items():
            for name in handle.keys():
                if name in self.file_of:
                    raise ValueError(f"tensor {name!r} is in both {self.file_of[name]!r} and "
                                     f"{file!r}")
                self.file_of[name] = file
        for name, file in (weight_map or {}).items():
            if self.file_of.get(name) != file:
                raise ValueError(f"{index} maps tensor {name!r} to {file!r}, which does not "
                                 "contain it")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.file_of[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The safetensors dtype code, e.g. 'BF16', 'F8_E4M3'."""
        return self._handles[self.file_of[name]].get_slice(name).get_dtype()

    def read(self, name: str) -> np.ndarray:
        file = self.file_of[name]
        kind = self.dtype(name)
        if kind not in _RAW_DTYPES:
            return self._handles[file].get_tensor(name)
        if file not in self._headers:  # 8-byte header length, JSON header, then the data
            with open(self._paths[file], "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                self._headers[file] = n, json.loads(f.read(n))
        n, header = self._headers[file]
        start, end = header[name]["data_offsets"]
        data = np.fromfile(self._paths[file], dtype=np.uint8, count=end - start,
                           offset=8 + n + start)
        return data.view(_RAW_DTYPES[kind]).reshape(self.shape(name))

    def close(self):
        for handle in self._handles.values():
            handle.__exit__(None, None, None)


def _abstract_variables(config: ModelConfig) -> dict[Path, jax.ShapeDtypeStruct]:
    """Our leaves for `config` (shapes and dtypes only, nothing allocated)."""
    tree = jax.eval_shape(lambda: nn.unbox(init_variables(config, jax.random.key(0))))
    return traverse_util.flatten_dict(tree)


def _problems(title: str, lines: list[str]) -> str:
    shown = lines[:20] + ([f"... and {len(lines) - 20} more"] if len(lines) > 20 else [])
    return f"{title}:\n  " + "\n  ".join(shown)


def _check_names(reader: _Reader, layout: list[TensorMap], ignored, block) -> None:
    """Raises ValueError listing missing, unexpected and mis-shaped tensors."""
    expected = {t.name: t for t in layout}
    lines = []
    for t in layout:
        if t.name not in reader.file_of:
            lines.append(f"missing tensor {t.name!r} (expected shape {t.shape})")
        elif (found := reader.shape(t.name)) != t.shape:
            lines.append(f"tensor {t.name!r} has shape {found}, expected {t.shape}")
        elif (scale := t.name + "_scale_inv") in reader.file_of:
            want = tuple(math.ceil(d / b) for d, b in zip(t.shape, block, strict=False))
            if len(t.shape) != 2 or (found := reader.shape(scale)) != want:
                lines.append(f"tensor {scale!r} has shape {found}, expected {want} "
                             f"({block[0]}x{block[1]} blocks of a 2-D weight)")
        elif reader.dtype(t.name) in _RAW_DTYPES:
            lines.append(f"tensor {t.name!r} is {reader.dtype(t.name)} but has no "
                         f"{t.name + '_scale_inv'!r}")
    for name in sorted(reader.file_of):
        base = name[:-len("_scale_inv")] if name.endswith("_scale_inv") else None
        if name not in expected and base not in expected and not ignored(name):
            lines.append(f"unexpected tensor {name!r} with shape {reader.shape(name)}")
    if lines:
        raise ValueError(_problems("checkpoint does not match its config.json", lines))


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def _check_checkpoint_dir(path: str) -> None:
    """A clear error for each way `path` is not a checkpoint directory (only local files are
    read: a hub id is not fetched)."""
    if not os.path.exists(path):
        if not os.path.isabs(path) and _HUB_ID.fullmatch(path):
            raise FileNotFoundError(
                f"checkpoint directory {path!r} does not exist; if it is a Hugging Face hub id, "
                f"download it first (e.g. `huggingface-cli download {path} --local-dir DIR`) "
                "and pass DIR: hub ids are not fetched at run time")
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    if not os.path.isdir(path):
        hint = (f"; its directory is {os.path.dirname(path) or '.'!r}"
                if os.path.basename(path) == "config.json" or path.endswith(".safetensors")
                else "")
        raise NotADirectoryError(f"{path!r} is a file, not a checkpoint directory (one holding "
                                 f"config.json and *.safetensors){hint}")
    if not os.listdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} is empty: expected config.json "
                                "and *.safetensors")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"no config.json in checkpoint directory {path!r} (it holds "
                                f"{', '.join(sorted(os.listdir(path))[:5])}"
                                f"{', …' if len(os.listdir(path)) > 5 else ''})")


def load_hf_checkpoint(path, dtype=None, *, drop_mtp: bool = False,
                       device="default") -> tuple[ModelConfig, dict]:
    """Loads an HF DeepSeek-V3 checkpoint directory.

    Args:
      path: directory with config.json and *.safetensors (one file, or shards listed by
        model.safetensors.index.json). Per-expert or fused expert layout; FP8 block-scaled or
        plain float weights.
      dtype: stored parameter dtype, any dtype-like ('bfloat16', jnp.bfloat16, ...); default
        float32. Sets config.param_dtype; the correction bias stays float32.
      drop_mtp: load without the MTP module(s) and return num_nextn_predict_layers=0. Needed
        for checkpoints written by transformers' `save_pretrained`, which drops the MTP layer
        while keeping num_nextn_predict_layers in config.json; any MTP tensors are skipped.
      device: where the arrays go — "default" (the default device, once: jitted calls then
        never copy host → device again), "host" (NumPy arrays, e.g. to place them yourself
        with `jax.device_put(variables, shardings)` across a mesh), or anything
        `jax.device_put` takes (a Device, a Sharding, or a pytree of them).
    Returns:
      (config, variables): variables = {'params', 'moe_bias'}, the structure of
      `nn.unbox(DeepSeekV3(config).init(...))`; usable directly in
      `DeepSeekV3(config).apply(variables, tokens)`.
    Raises:
      FileNotFoundError: no such directory (a hub id must be downloaded first), an empty one,
        no config.json, no safetensors files, or an index naming a missing file.
      NotADirectoryError: `path` is a file.
      ValueError: missing, unexpected or mis-shaped tensors (each named with both shapes).
    """
    path = os.fspath(path)
    _check_checkpoint_dir(path)
    config_file = os.path.join(path, "config.json")
    with open(config_file) as f:
        raw = json.load(f)
    config = ModelConfig.from_hf(raw)
    block = tuple((raw.get("quantization_config") or {}).get("weight_block_size",
                                                             (FP8_BLOCK, FP8_BLOCK)))
    if dtype is not None:
        config = config.replace(param_dtype=dtype)  # ModelConfig normalizes/validates
    if isinstance(device, str) and device not in ("default", "host"):
        raise ValueError(f"device must be 'default', 'host', a jax Device or Sharding; got "
                         f"{device!r}")
    reader = _Reader(path)
    try:
        L = config.num_hidden_layers

        def is_mtp(name: str) -> bool:  # layers L, L+1, ...: at least L even when config says 0
            depth = max(config.num_nextn_predict_layers, 1)
            return any(name.startswith(f"model.layers.{L + k}.") for k in range(depth))

        if drop_mtp:
            config = config.replace(num_nextn_predict_layers=0)
        elif config.num_nextn_predict_layers and not any(map(is_mtp, reader.file_of)):
            raise ValueError(
                f"config.json sets num_nextn_predict_layers={config.num_nextn_predict_layers} but "
                f"the checkpoint has no tensors model.layers.{L}.* (the MTP module; transformers' "
                "save_pretrained drops it). Pass drop_mtp=True to load the model without MTP.")
        fused = frozenset(i for i in range(L + config.num_nextn_predict_layers)
                          if f"model.layers.{i}.mlp.experts.gate_up_proj" in reader.file_of)
        layout = hf_layout(config, fused)
        _check_names(reader, layout,
                     lambda name: bool(_IGNORED.match(name)) or (drop_mtp and is_mtp(name)),
                     block)
        leaves = {p: np.empty(a.shape, a.dtype) for p, a in _abstract_variables(config).items()}
        written = dict.fromkeys(leaves, 0)
        for t in layout:
            x = reader.read(t.name)
            if t.name + "_scale_inv" in reader.file_of:
                x = dequantize_fp8_blocks(x, reader.read(t.name + "_scale_inv"), block)
            for piece, part in zip(t.pieces, t.to_ours(x), strict=True):
                target = leaves[piece.path]
                if t.copy:
                    if not np.array_equal(target[piece.index], part.astype(target.dtype)):
                        warnings.warn(f"{t.name} differs from the main model's copy; our MTP "
                                      "shares embedding and head, so it is ignored", stacklevel=2)
                    continue
                target[piece.index] = part.astype(target.dtype)
                written[piece.path] += part.size
    finally:
        reader.close()
    unfilled = [p for p, n in written.items() if n != leaves[p].size]
    if unfilled:  # a layout/model mismatch, not a checkpoint problem
        raise AssertionError(f"hf_layout leaves {unfilled} (partly) unwritten")
    variables = traverse_util.unflatten_dict(leaves)
    if device == "host":
        return config, variables
    return config, jax.device_put(variables, None if device == "default" else device)


def save_hf_checkpoint(path, config: ModelConfig, variables, max_shard_bytes: int = 5 * 2**30,
                       fp8: bool = False):
    """Writes config.json and safetensors that transformers' DeepseekV3ForCausalLM loads.

    `fp8=True` writes DeepSeek's released FP8 format: the decoder layers' projections as
    float8_e4m3fn with `<name>_scale_inv` [ceil(out/128), ceil(in/128)] (one scale per 128×128
    block, `fp8.blockwise_quantize`), everything else as stored, and `quantization_config` in
    config.json; `load_hf_checkpoint` reads it back (dequantized).

    Per-expert expert tensors, MTP depth k as layer num_hidden_layers + k (with its copies of
    embedding and head, as in the released checkpoints). Tensors keep their leaves' dtypes.
    One `model.safetensors`, or shards `model-0000i-of-0000n.safetensors` with
    model.safetensors.index.json when the total exceeds `max_shard_bytes`; earlier files of
    those names in `path` are removed first so a stale index cannot shadow the new files.

    Args:
      path: output directory (created).
      config: the architecture of `variables`.
      variables: {'params', 'moe_bias'}, boxed (from `init`) or plain; numpy or jax arrays.
        An `fp8` collection (delayed-scaling state: training state, not weights) is ignored.
    """
    path = os.fspath(path)
    variables = {k: v for k, v in dict(variables).items() if k != "fp8"}
    flat = traverse_util.flatten_dict(nn.unbox(variables))
    expected = _abstract_variables(config)
    lines = [f"missing leaf {'/'.join(p)} (expected shape {a.shape})"
             for p, a in expected.items() if p not in flat]
    lines += [f"leaf {'/'.join(p)} has shape {tuple(flat[p].shape)}, expected {a.shape}"
              for p, a in expected.items() if p in flat and tuple(flat[p].shape) != a.shape]
    lines += [f"unexpected leaf {'/'.join(p)}" for p in flat if p not in expected]
    if lines:
        raise ValueError(_problems("variables do not match config", lines))
    layout = hf_layout(config)

    def nbytes(t: TensorMap) -> int:
        if fp8 and _fp8_quantized(t.name):  # one byte per weight + the block scales
            return math.prod(t.shape) + 4 * math.prod(-(-n // FP8_BLOCK) for n in t.shape)
        return math.prod(t.shape) * np.dtype(flat[t.pieces[0].path].dtype).itemsize

    def tensors(t: TensorMap) -> dict[str, np.ndarray]:
        x = np.ascontiguousarray(t.to_hf([np.asarray(flat[p.path][p.index]) for p in t.pieces]))
        if not (fp8 and _fp8_quantized(t.name)):
            return {t.name: x}
        q, scale_inv = fp8_lib.blockwise_quantize(x)
        return {t.name: np.asarray(q), t.name + "_scale_inv": np.asarray(scale_inv)}

    shards: list[list[TensorMap]] = [[]]
    size = 0
    for t in layout:
        if shards[-1] and size + nbytes(t) > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes(t)
    os.makedirs(path, exist_ok=True)
    stale = [INDEX_FILE, "model.safetensors"] + [os.path.basename(f) for f in glob.glob(
        os.path.join(path, "model-[0-9]*-of-[0-9]*.safetensors"))]
    for f in stale:
        if os.path.isfile(os.path.join(path, f)):
            os.remove(os.path.join(path, f))
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [
        f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for file, shard in zip(names, shards, strict=True):
        written = {name: x for t in shard for name, x in tensors(t).items()}
        save_file(written, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(written, file))
    if n > 1:
        index = {"metadata": {"total_size": sum(map(nbytes, layout))}, "weight_map": weight_map}
        with open(os.path.join(path, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2)
    hf_config = config.to_hf()
    if fp8:
        hf_config["quantization_config"] = FP8_QUANTIZATION_CONFIG
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
