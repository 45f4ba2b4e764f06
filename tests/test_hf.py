"""HF checkpoints: logit parity with transformers both ways, MTP parity, FP8 blocks, loader errors.

Parity runs in fp32 (conftest sets highest matmul precision); weights are random with std 0.1,
norm weights 1 ± 0.2 and a positive correction bias, so logits are O(1) and a mis-mapped tensor
moves them by O(1) (swapping kv_b_proj's k and v rows: 4.9), far above the 1e-4 bound.
"""

import functools
import json
import math
import os
import shutil

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from dsv3_jax import DeepSeekV3, ModelConfig, YarnScaling, load_hf_checkpoint, save_hf_checkpoint
from dsv3_jax.hf import _abstract_variables, _Reader, dequantize_fp8_blocks, hf_layout

try:  # the [reference] extra; FP8, error and layout tests run without it
    import torch
    import transformers
except ImportError:
    torch = transformers = None
needs_reference = pytest.mark.skipif(transformers is None,
                                     reason="needs torch and transformers ([reference] extra)")

TINY = ModelConfig.preset("tiny", initializer_range=0.1)
CONFIGS = {
    # q_lora, YaRN (factor 4), 4 groups keep 2, one MTP module.
    "q_lora_yarn": TINY,
    # q without compression (V2-Lite style), plain RoPE, 2 dense layers, 2 shared experts.
    "no_q_lora_no_yarn": TINY.replace(q_lora_rank=None, rope_scaling=None,
                                      first_k_dense_replace=2, n_shared_experts=2),
    # Every size distinct (catches transposed splits); D = 136 and F = 200 give ragged
    # 128-blocks for FP8; YaRN with mscale != mscale_all_dim (attention_factor != 1);
    # 6 groups keep 3; two MTP modules.
    "odd_sizes": TINY.replace(
        hidden_size=136, intermediate_size=200, moe_intermediate_size=24, num_hidden_layers=3,
        num_attention_heads=3, q_lora_rank=48, kv_lora_rank=24, qk_nope_head_dim=12,
        qk_rope_head_dim=6, v_head_dim=10, n_routed_experts=24, num_experts_per_tok=5,
        n_group=6, topk_group=3, num_nextn_predict_layers=2, max_position_embeddings=512,
        rope_scaling=YarnScaling(factor=8.0, original_max_position_embeddings=64, beta_fast=16.0,
                                 beta_slow=2.0, mscale=0.9, mscale_all_dim=0.7)),
}
TOKENS = np.random.default_rng(1).integers(0, TINY.vocab_size, (2, 12))


def random_variables(config: ModelConfig, seed: int) -> dict:
    """Random variables in our layout (cheaper than init: nothing is traced or compiled)."""
    rng = np.random.default_rng(seed)

    def leaf(path, a):
        if path[0] == "moe_bias":  # positive, so HF's 0.0 group masking agrees with our −inf
            return rng.uniform(0.0, 0.5, a.shape).astype(np.float32)
        if path[-1] == "weight":  # norms
            return (1.0 + 0.2 * rng.standard_normal(a.shape)).astype(np.float32)
        return (0.1 * rng.standard_normal(a.shape)).astype(np.float32)

    return traverse_util.unflatten_dict(
        {p: leaf(p, a) for p, a in _abstract_variables(config).items()})


@functools.cache
def _forward(config: ModelConfig):
    return jax.jit(lambda v, t: DeepSeekV3(config).apply(v, t))


def our_output(config, variables, tokens=TOKENS):
    return _forward(config)(variables, tokens)


def hf_model(path):
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32)
    return model.eval()


def hf_logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def saved(request, tmp_path_factory):
    """(config, our random variables, directory written by save_hf_checkpoint)."""
    config = CONFIGS[request.param]
    variables = random_variables(config, seed=sorted(CONFIGS).index(request.param))
    path = tmp_path_factory.mktemp(request.param)
    save_hf_checkpoint(path, config, variables)
    return config, variables, path


@pytest.fixture(scope="module")
def tiny_saved(tmp_path_factory):
    variables = random_variables(TINY, seed=7)
    path = tmp_path_factory.mktemp("tiny")
    save_hf_checkpoint(path, TINY, variables)
    return TINY, variables, path


# ---- ours → HF ------------------------------------------------------------------------------

@needs_reference
def test_ours_to_transformers_logit_parity(saved):
    config, variables, path = saved
    ours = np.asarray(our_output(config, variables).logits)
    theirs = hf_logits(hf_model(path))
    err = np.abs(ours - theirs).max()
    print(f"max |dlogit| ours->HF: {err:.3g} (logit std {theirs.std():.3g})")
    assert theirs.std() > 0.3  # the comparison is not between near-zero numbers
    assert err <= 1e-4


def test_save_load_gives_identical_arrays(saved):
    config, variables, path = saved
    loaded_config, loaded = load_hf_checkpoint(path)
    assert_trees_equal(loaded, variables)
    hf_fields = set(config.to_hf())
    assert {k: v for k, v in loaded_config.to_hf().items() if k in hf_fields} == config.to_hf()


@needs_reference
def test_mtp_parity_with_transformers_mtp_model(tiny_saved):
    """Our mtp_logits[0] vs transformers' MtpModel layer 0 on the main model's last hidden state."""
    from transformers.modeling_layers import MtpModel
    config, variables, path = tiny_saved
    model = hf_model(path)
    mtp = MtpModel(model, 1).eval()
    missing, unexpected = mtp.load_state_dict(_mtp_state_dict(path, config), strict=False)
    assert not unexpected and all("embed_tokens" in k or "shared_head" in k for k in missing)
    tokens = torch.tensor(TOKENS)
    B, T = tokens.shape
    with torch.no_grad():
        hidden = model.model(tokens).last_hidden_state  # after the final norm
        shifted = torch.nn.functional.pad(tokens[:, 1:], (0, 1))  # t_{i+1}, 0 past the end
        h = mtp.forward_layer(0, hidden, torch.arange(T)[None].expand(B, T), None,
                              input_ids=shifted)
        theirs = mtp._project_to_logits(h).numpy()
    ours = np.asarray(our_output(config, variables).mtp_logits[0])
    err = np.abs(ours - theirs).max()
    print(f"max |dlogit| MTP: {err:.3g}")
    assert theirs.std() > 0.3 and err <= 1e-4


def _mtp_state_dict(path, config) -> dict:
    """Checkpoint layer num_hidden_layers renamed to MtpModel's layer 0, experts fused."""
    prefix = f"model.layers.{config.num_hidden_layers}."
    rename = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight",
              "eh_proj.weight": "eh_proj.weight", "shared_head.norm.weight": "post_norm.weight"}
    state, experts = {}, {}
    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix):]
            if rest in ("embed_tokens.weight", "shared_head.head.weight"):
                continue  # shared with the main model
            if rest.startswith("mlp.experts."):
                _, _, e, proj, _ = rest.split(".")
                experts[(proj, int(e))] = f.get_tensor(key)
            else:
                state["layers.0." + rename.get(rest, "mtp_block." + rest)] = f.get_tensor(key)
    E = config.n_routed_experts
    state["layers.0.mtp_block.mlp.experts.gate_up_proj"] = torch.stack(
        [torch.cat([experts["gate_proj", e], experts["up_proj", e]]) for e in range(E)])
    state["layers.0.mtp_block.mlp.experts.down_proj"] = torch.stack(
        [experts["down_proj", e] for e in range(E)])
    return state


# ---- HF → ours ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_saved(tmp_path_factory):
    """A transformers-initialized model (weights scaled to std 0.1 etc.), saved two ways."""
    config = CONFIGS["no_q_lora_no_yarn"]
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(
        transformers.DeepseekV3Config(**config.to_hf()))
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn_like(p)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.1 * noise)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.5 * torch.rand_like(b))
    model.eval()
    per_expert = tmp_path_factory.mktemp("hf_per_expert")
    model.save_pretrained(per_expert)  # writes the per-expert on-disk layout, no MTP layer
    fused = tmp_path_factory.mktemp("hf_fused")  # the in-memory fused layout, as a file
    save_file({k: v.contiguous().numpy() for k, v in model.state_dict().items()},
              os.path.join(fused, "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.join(per_expert, "config.json"), fused)
    return model, {"per_expert": per_expert, "fused": fused}


@needs_reference
@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_transformers_to_ours_logit_parity(hf_saved, layout):
    model, paths = hf_saved
    config, variables = load_hf_checkpoint(paths[layout], drop_mtp=True)
    assert config.num_nextn_predict_layers == 0
    theirs = hf_logits(model)
    err = np.abs(np.asarray(our_output(config, variables).logits) - theirs).max()
    print(f"max |dlogit| HF->ours ({layout}): {err:.3g} (logit std {theirs.std():.3g})")
    assert theirs.std() > 0.3 and err <= 1e-4


@needs_reference
def test_checkpoint_without_mtp_layer_needs_drop_mtp(hf_saved):
    with pytest.raises(ValueError, match=r"num_nextn_predict_layers=1.*model\.layers\.4\..*"
                                         r"drop_mtp=True"):
        load_hf_checkpoint(hf_saved[1]["per_expert"])


# ---- dtype, shards ----------------------------------------------------------------------------

def test_load_bfloat16(tiny_saved):
    config, variables, path = tiny_saved
    loaded_config, loaded = load_hf_checkpoint(path, dtype="bfloat16")
    assert loaded_config.param_dtype == "bfloat16"
    assert loaded["moe_bias"]["e_score_correction_bias"].dtype == np.float32
    assert {x.dtype for x in jax.tree.leaves(loaded["params"])} == {np.dtype(ml_dtypes.bfloat16)}
    expected = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), variables["params"])
    assert_trees_equal(loaded["params"], expected)


@needs_reference
def test_sharded_round_trip_and_missing_shard(tiny_saved, tmp_path):
    config, variables, _ = tiny_saved
    save_hf_checkpoint(tmp_path, config, variables, max_shard_bytes=200_000)
    with open(tmp_path / "model.safetensors.index.json") as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    assert len(files) > 2 and not (tmp_path / "model.safetensors").exists()
    assert_trees_equal(load_hf_checkpoint(tmp_path)[1], variables)
    theirs = hf_logits(hf_model(tmp_path))  # transformers reads the sharded layout too
    assert np.abs(np.asarray(our_output(config, variables).logits) - theirs).max() <= 1e-4
    os.remove(tmp_path / files[1])
    with pytest.raises(FileNotFoundError, match=files[1]):
        load_hf_checkpoint(tmp_path)


# ---- FP8 ------------------------------------------------------------------------------------

def quantize_fp8(w: np.ndarray, block: int = 128):
    """Per-tile amax scaling to float8_e4m3fn (max 448): (weight, scale_inv)."""
    O, I = w.shape
    q = np.empty(w.shape, ml_dtypes.float8_e4m3fn)
    scale = np.empty((math.ceil(O / block), math.ceil(I / block)), np.float32)
    for r in range(scale.shape[0]):
        for s in range(scale.shape[1]):
            tile = (slice(r * block, (r + 1) * block), slice(s * block, (s + 1) * block))
            # float32 arithmetic throughout (as the quantizers run), amax floored at 1e-4
            scale[r, s] = np.float32(max(np.abs(w[tile]).max(), 1e-4)) / np.float32(448.0)
            q[tile] = (w[tile].astype(np.float32) / scale[r, s]).astype(ml_dtypes.float8_e4m3fn)
    return q, scale


def dequantize_loop(q: np.ndarray, scale_inv: np.ndarray, block=(128, 128)) -> np.ndarray:
    """Reference: element by element, W[i, j] = q[i, j] · scale_inv[i // rows, j // cols]."""
    out = np.empty(q.shape, np.float32)
    for i in range(q.shape[0]):
        for j in range(q.shape[1]):
            out[i, j] = np.float32(q[i, j]) * scale_inv[i // block[0], j // block[1]]
    return out


def test_dequantize_fp8_blocks_matches_loop_with_ragged_edges():
    rng = np.random.default_rng(0)
    # 300 = 2·128 + 44 rows, 200 = 128 + 72 columns: both edges ragged; tile scales span 1e4.
    w = rng.standard_normal((300, 200)).astype(np.float32) * np.float32(10.0) ** rng.integers(
        -2, 3, (300, 1))
    q, scale = quantize_fp8(w)
    assert scale.shape == (3, 2)
    np.testing.assert_array_equal(dequantize_fp8_blocks(q, scale), dequantize_loop(q, scale))
    # And the quantization itself is sound: e4m3 keeps 3 mantissa bits (relative step 2^-3).
    np.testing.assert_allclose(dequantize_fp8_blocks(q, scale), w, rtol=2**-4,
                               atol=float(scale.max()) * 2**-9)
    # Non-square tiles (quantization_config.weight_block_size), here [64, 128]: 5 x 2 scales.
    tall = np.random.default_rng(1).uniform(0.5, 2.0, (5, 2)).astype(np.float32)
    np.testing.assert_array_equal(dequantize_fp8_blocks(q, tall, (64, 128)),
                                  dequantize_loop(q, tall, (64, 128)))


def test_fp8_checkpoint_load(tmp_path):
    """The released-FP8 layout: every linear weight except gate/embedding/head is e4m3 + scales.

    Loaded weights must equal the loop-dequantized ones exactly (that is what catches a wrong
    block scale). The logit tolerance is a control, not a guess: the same random model with
    Gaussian noise of the rounding error's rms added to each quantized tensor. e4m3 rounding is
    2.6% rms per weight (measured on N(0,1) tiles); this random model amplifies it, flips some
    expert choices and moves logits by ~20% of their spread, and so does the control (0.18-0.22
    over three noise seeds), so fp8 must stay within 2x the control.
    """
    config = CONFIGS["odd_sizes"]
    variables = random_variables(config, seed=3)
    save_hf_checkpoint(tmp_path / "f32", config, variables)
    tensors = load_file(tmp_path / "f32" / "model.safetensors")
    fp8, dequantized, noisy = dict(tensors), dict(tensors), dict(tensors)
    rng = np.random.default_rng(0)
    n_ragged = 0
    for name, w in tensors.items():
        if (w.ndim == 2 and name.endswith("proj.weight") and "embed" not in name
                and "head" not in name):
            q, scale = quantize_fp8(w)
            fp8[name], fp8[name + "_scale_inv"] = q, scale
            dequantized[name] = dequantize_loop(q, scale)
            noise = rng.standard_normal(w.shape) * (dequantized[name] - w).std()
            noisy[name] = (w + noise).astype(np.float32)
            n_ragged += any(d > 128 and d % 128 for d in w.shape)
    assert n_ragged > 10  # D = 136 and F = 200 make most tiles ragged
    for name, tree in (("fp8", fp8), ("ref", dequantized), ("noisy", noisy)):
        os.makedirs(tmp_path / name)
        save_file(tree, tmp_path / name / "model.safetensors", metadata={"format": "pt"})
        hf_config = config.to_hf()
        if name == "fp8":  # as in the released config.json
            hf_config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                                "weight_block_size": [128, 128]}
        with open(tmp_path / name / "config.json", "w") as f:
            json.dump(hf_config, f)
    _, loaded = load_hf_checkpoint(tmp_path / "fp8")
    assert_trees_equal(loaded, load_hf_checkpoint(tmp_path / "ref")[1])
    exact = np.asarray(our_output(config, variables).logits)

    def rel(v):  # relative rms logit error
        return np.sqrt(np.mean((np.asarray(our_output(config, v).logits) - exact) ** 2)
                       ) / exact.std()

    err, control = rel(loaded), rel(load_hf_checkpoint(tmp_path / "noisy")[1])
    print(f"fp8 vs fp32 logits: relative rms {err:.3g}; same-rms noise control {control:.3g}")
    assert err < 2 * control


def test_fp8_export_is_the_released_format_and_loads_back(tmp_path):
    """save_hf_checkpoint(fp8=True): the decoder projections as e4m3 + 128×128 block scales,
    nothing else quantized, quantization_config written, a sharded index naming every scale;
    loading gives the loop quantizer's dequantized weights."""
    config = CONFIGS["odd_sizes"]
    variables = random_variables(config, seed=4)
    save_hf_checkpoint(tmp_path / "f32", config, variables)
    plain = load_file(tmp_path / "f32" / "model.safetensors")
    save_hf_checkpoint(tmp_path / "fp8", config, {**variables, "fp8": {}}, fp8=True,
                       max_shard_bytes=200_000)
    with open(tmp_path / "fp8" / "config.json") as f:
        assert json.load(f)["quantization_config"] == {
            "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
            "weight_block_size": [128, 128]}
    with open(tmp_path / "fp8" / "model.safetensors.index.json") as f:
        weight_map = json.load(f)["weight_map"]
    written = {}
    for file in sorted(set(weight_map.values())):
        with safe_open(tmp_path / "fp8" / file, "np") as handle:  # float8: read raw below
            for name in handle.keys():
                assert weight_map[name] == file
                written[name] = file
    quantized = sorted(n[:-len("_scale_inv")] for n in written if n.endswith("_scale_inv"))
    expected = sorted(n for n in plain if n.startswith("model.layers.")
                      and n.endswith("_proj.weight") and "eh_proj" not in n)
    assert quantized == expected and len(expected) > 20
    assert set(written) == set(plain) | {n + "_scale_inv" for n in expected}
    reader = _Reader(str(tmp_path / "fp8"))
    dequantized = dict(plain)
    for name in expected:
        q, scale = reader.read(name), reader.read(name + "_scale_inv")
        q_ref, scale_ref = quantize_fp8(plain[name])
        # The loop divides by 448 in NumPy, XLA may multiply by 1/448: last-bit differences of
        # a scale, which can move a rounding by one e4m3 step for a handful of weights.
        np.testing.assert_allclose(scale, scale_ref, rtol=2.5e-7)
        codes_differ = q.view(np.uint8) != q_ref.view(np.uint8)
        assert codes_differ.mean() < 1e-3, (name, codes_differ.mean())
        dequantized[name] = dequantize_loop(q, scale)
    reader.close()
    ref_dir = tmp_path / "ref"  # what was written, dequantized by the element loop
    os.makedirs(ref_dir)
    save_file(dequantized, ref_dir / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(tmp_path / "f32" / "config.json", ref_dir / "config.json")
    assert_trees_equal(load_hf_checkpoint(tmp_path / "fp8")[1], load_hf_checkpoint(ref_dir)[1])


# ---- loader errors ----------------------------------------------------------------------------

def _corrupt(src, dst, change):
    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(dst, "model.safetensors"))
    change(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


KV_B = "model.layers.1.self_attn.kv_b_proj.weight"  # [N·(H+A), C] = [4·32, 32] in tiny


def test_error_missing_tensor(tiny_saved, tmp_path):
    path = _corrupt(tiny_saved[2], tmp_path / "c", lambda t: t.pop(KV_B))
    with pytest.raises(ValueError,
                       match=rf"missing tensor '{KV_B}' \(expected shape \(128, 32\)\)"):
        load_hf_checkpoint(path)


def test_error_unexpected_tensor(tiny_saved, tmp_path):
    name = "model.layers.2.self_attn.extra.weight"
    path = _corrupt(tiny_saved[2], tmp_path / "c",
                    lambda t: t.update({name: np.zeros((3, 5), np.float32)}))
    with pytest.raises(ValueError, match=rf"unexpected tensor '{name}' with shape \(3, 5\)"):
        load_hf_checkpoint(path)


def test_error_wrong_shape(tiny_saved, tmp_path):
    path = _corrupt(tiny_saved[2], tmp_path / "c", lambda t: t.update({KV_B: t[KV_B].T.copy()}))
    with pytest.raises(ValueError,
                       match=rf"tensor '{KV_B}' has shape \(32, 128\), expected \(128, 32\)"):
        load_hf_checkpoint(path)


def test_error_fp8_scales(tiny_saved, tmp_path):
    scale = KV_B + "_scale_inv"  # [128, 32] weight: one 128x128 block, scale shape (1, 1)
    path = _corrupt(tiny_saved[2], tmp_path / "a",
                    lambda t: t.update({scale: np.ones((2, 2), np.float32)}))
    with pytest.raises(ValueError, match=rf"'{scale}' has shape \(2, 2\), expected \(1, 1\)"):
        load_hf_checkpoint(path)
    path = _corrupt(tiny_saved[2], tmp_path / "b",
                    lambda t: t.update({KV_B: t[KV_B].astype(ml_dtypes.float8_e4m3fn)}))
    with pytest.raises(ValueError, match=rf"'{KV_B}' is F8_E4M3 but has no '{scale}'"):
        load_hf_checkpoint(path)


def test_save_accepts_boxed_and_rejects_mismatched_variables(tiny_saved, tmp_path):
    config, variables, _ = tiny_saved
    boxed = jax.tree.map(lambda x: nn.Partitioned(x, (None,) * x.ndim), variables)
    save_hf_checkpoint(tmp_path, config, boxed)
    assert_trees_equal(load_hf_checkpoint(tmp_path)[1], variables)
    with pytest.raises(ValueError, match=r"leaf params/moe_layers/mlp/gate/kernel has shape "
                                         r"\(3, 64, 16\), expected \(3, 64, 32\)"):
        save_hf_checkpoint(tmp_path, config.replace(n_routed_experts=32), variables)


def test_error_missing_files(tiny_saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_checkpoint(tmp_path)
    shutil.copy(os.path.join(tiny_saved[2], "config.json"), tmp_path)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_hf_checkpoint(tmp_path)


def test_error_not_a_checkpoint_directory(tmp_path, monkeypatch):
    """Each way a path is not a checkpoint directory has its own message; nothing is fetched."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'deepseek-ai/DeepSeek-V3' does not exist; if it "
                       r"is a Hugging Face hub id, download it first \(e\.g\. `huggingface-cli "
                       r"download deepseek-ai/DeepSeek-V3 --local-dir DIR`\)"):
        load_hf_checkpoint("deepseek-ai/DeepSeek-V3")
    missing = str(tmp_path / "absent" / "model")  # absolute: a path, not a hub id
    with pytest.raises(FileNotFoundError) as e:
        load_hf_checkpoint(missing)
    assert str(e.value) == f"checkpoint directory {missing!r} does not exist"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="'empty' is empty: expected config.json"):
        load_hf_checkpoint("empty")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(NotADirectoryError, match="is a file, not a checkpoint directory .*; "
                       "its directory is '.'"):
        load_hf_checkpoint("config.json")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no config.json in checkpoint directory "
                       r"'other' \(it holds model.safetensors\)"):
        load_hf_checkpoint("other")


def test_layout_covers_every_leaf_once():
    """Each of our leaves is written exactly once by the HF table (no overlaps, no gaps).

    Shapes only (eval_shape), so the 671B preset is included: its HF tensors, with the MTP
    layer's copies of embedding and head, total the 685B of the released checkpoint.
    """
    full = ModelConfig.preset("deepseek-v3-671b")
    total = sum(math.prod(t.shape) for t in hf_layout(full))
    assert abs(total / 685e9 - 1) < 0.005, total
    for config in [*CONFIGS.values(), full]:
        leaves = _abstract_variables(config)
        for fused in (frozenset(), frozenset(range(config.num_hidden_layers + 2))):
            covered = dict.fromkeys(leaves, 0)
            for t in hf_layout(config, fused):
                assert math.prod(t.shape) == math.prod(t.view)
                if not t.copy:
                    for p in t.pieces:
                        slab = leaves[p.path].shape[len(p.index):]
                        covered[p.path] += math.prod(slab)
            assert covered == {p: math.prod(a.shape) for p, a in leaves.items()}


def test_load_places_arrays_once(tiny_saved):
    """load_hf_checkpoint: device arrays by default (a jitted call copies nothing host→device),
    NumPy with device='host', a given Sharding honoured, a bad device named."""
    config, variables, path = tiny_saved
    _, on_device = load_hf_checkpoint(path)
    leaves = jax.tree.leaves(on_device)
    assert all(isinstance(a, jax.Array) and a.devices() == {jax.devices()[0]} for a in leaves)
    _, on_host = load_hf_checkpoint(path, device="host")
    assert all(type(a) is np.ndarray for a in jax.tree.leaves(on_host))
    assert_trees_equal(on_host, on_device)
    last = jax.sharding.SingleDeviceSharding(jax.devices()[-1])
    _, placed = load_hf_checkpoint(path, device=last)
    assert all(a.sharding == last for a in jax.tree.leaves(placed))
    with pytest.raises(ValueError, match="device must be 'default', 'host'"):
        load_hf_checkpoint(path, device="gpu0")
