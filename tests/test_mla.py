"""MLA: the absorbed latent-cache path equals the full path; RoPE/YaRN against formulas."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import ModelConfig, cpu_kernels
from dsv3_jax.mla import MLA, LatentCache, write_entries
from dsv3_jax.rope import apply_rope, inv_freq, softmax_scale


@pytest.mark.parametrize("q_lora", [True, False])
def test_absorbed_decode_equals_full_path(q_lora):
    c = ModelConfig.preset("tiny")
    if not q_lora:
        c = dataclasses.replace(c, q_lora_rank=None)
    B, T, P = 2, 12, 5  # prefill P tokens, then decode one at a time, then a 3-token chunk
    x = jax.random.normal(jax.random.key(0), (B, T, c.hidden_size))
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    mla = MLA(c)
    params = nn.unbox(mla.init(jax.random.key(1), x, pos))
    params = jax.tree.map(lambda a: a * 4, params)  # sharper attention than the init's
    full, _ = jax.jit(lambda p, x: mla.apply(p, x, pos))(params, x)

    step = jax.jit(lambda p, x, pos, cache, i, absorb: mla.apply(
        p, x, pos, cache, i, absorb=absorb), static_argnums=5)
    cache = LatentCache.zeros(c, B, T, jnp.float32)
    out, cache = step(params, x[:, :P], pos[:, :P], cache, 0, False)  # prefill
    outs = [out]
    for t in range(P, T - 3):
        out, cache = step(params, x[:, t:t + 1], pos[:, t:t + 1], cache, t, True)
        outs.append(out)
    out, cache = step(params, x[:, T - 3:], pos[:, T - 3:], cache, T - 3, True)  # multi-token
    outs.append(out)
    cached = jnp.concatenate(outs, axis=1)
    scale = float(jnp.abs(full).max())
    np.testing.assert_allclose(np.asarray(cached), np.asarray(full), atol=2e-5 * scale, rtol=0)
    assert cache.c_kv.shape == (B, T, c.kv_lora_rank)
    assert cache.k_pe.shape == (B, T, c.qk_rope_head_dim)


def test_rope_rotates_interleaved_pairs():
    c = ModelConfig.preset("tiny", rope_scaling=None)
    R = c.qk_rope_head_dim
    x = np.random.default_rng(0).normal(size=(1, 3, R)).astype(np.float32)
    pos = np.array([[0, 1, 7]])
    got = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(pos), c))
    freqs = c.rope_theta ** (-np.arange(0, R, 2) / R)
    z = x[..., 0::2] + 1j * x[..., 1::2]
    rot = z * np.exp(1j * pos[..., None] * freqs)
    want = np.stack([rot.real, rot.imag], -1).reshape(x.shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_rope_gradient_is_the_opposite_rotation():
    """apply_rope's custom backward against NumPy: the gradient of Σ rope(x)·g is g rotated
    by the opposite angles (times YaRN's attention factor), for [B, T, R] and [B, T, N, R] and
    positions with gaps; bf16 inputs get bf16 gradients of the same values to bf16 rounding
    (the cotangent and the result each rounded once: 2⁻⁸ of the values, plus 2⁻⁸ of the
    largest cotangent for components that nearly cancel)."""
    c = ModelConfig.preset("tiny")
    freqs, factor = inv_freq(c)
    rng = np.random.default_rng(0)
    pos = np.array([[0, 1, 5, 6], [9, 2, 3, 400]])
    for shape in [(2, 4, c.qk_rope_head_dim), (2, 4, 3, c.qk_rope_head_dim)]:
        x = rng.normal(size=shape).astype(np.float32)
        g = rng.normal(size=shape).astype(np.float32)
        angle = pos.reshape(pos.shape + (1,) * (len(shape) - 3) + (1,)) * freqs
        z = (g[..., 0::2] + 1j * g[..., 1::2]) * np.exp(-1j * angle) * factor
        want = np.stack([z.real, z.imag], -1).reshape(shape)
        bf16 = 2.0 ** -8
        for dtype, rtol, atol in ((jnp.float32, 1e-5, 1e-5),
                                  (jnp.bfloat16, bf16, bf16 * np.abs(g).max())):
            got = jax.grad(lambda x: (apply_rope(x, jnp.asarray(pos), c).astype(jnp.float32)
                                      * g).sum())(jnp.asarray(x, dtype))
            assert got.dtype == dtype
            np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=rtol, atol=atol)


def test_yarn_frequencies_and_mscale():
    # DeepSeek-V3: d=64, base 1e4, factor 40, orig 4096, beta 32/1 → ramp over dims [10, 23].
    c = ModelConfig.preset("deepseek-v3-671b")
    freqs, attention_factor = inv_freq(c)
    base = 10000.0 ** (-np.arange(0, 64, 2) / 64)
    np.testing.assert_allclose(freqs[:10], base[:10], rtol=1e-6)  # extrapolated (high freq)
    np.testing.assert_allclose(freqs[23:], base[23:] / 40, rtol=1e-6)  # interpolated
    assert np.all(freqs[10:23] <= base[10:23]) and np.all(freqs[10:23] >= base[10:23] / 40)
    assert attention_factor == 1.0  # mscale == mscale_all_dim
    mscale = 0.1 * math.log(40) + 1
    np.testing.assert_allclose(softmax_scale(c), 192 ** -0.5 * mscale ** 2, rtol=1e-12)


@pytest.mark.parametrize("kernel", [True, False])
def test_causal_attention_equals_full_softmax(kernel, monkeypatch):
    """causal_attention (the fused CPU kernel, and with it switched off the query chunks, each
    over its visible keys only) against a NumPy full T × T masked softmax, at lengths of one
    chunk, several with a ragged last one, and 16+ chunks; positions with gaps (the mask is by
    position). Tolerance 2e-5 absolute (fp32 sums of up to 2,100 terms)."""
    from dsv3_jax.mla import causal_attention
    if not kernel:
        monkeypatch.setattr(cpu_kernels, "runs_here", lambda *dtypes: False)
    c = ModelConfig.preset("tiny")
    rng = np.random.default_rng(0)
    for T in (7, 300, 2100):
        B, N, H, R, A = 2, 3, 8, 4, 5
        q_nope, k_nope = (rng.normal(size=(B, N, T, H)).astype(np.float32) for _ in range(2))
        q_pe = rng.normal(size=(B, T, N, R)).astype(np.float32)
        k_pe = rng.normal(size=(B, T, R)).astype(np.float32)
        v = rng.normal(size=(B, N, T, A)).astype(np.float32)
        positions = np.cumsum(rng.integers(1, 3, size=(B, T)), axis=1).astype(np.int32)
        got = np.asarray(jax.jit(causal_attention, static_argnums=6)(
            q_nope, q_pe, k_nope, k_pe, v, positions, c))
        scores = (np.einsum("bnth,bnsh->bnts", q_nope, k_nope)
                  + np.einsum("btnr,bsr->bnts", q_pe, k_pe)) * softmax_scale(c)
        mask = positions[:, None, None, :] <= positions[:, None, :, None]
        scores = np.where(mask, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        np.testing.assert_allclose(got, np.einsum("bnts,bnsa->bnta", probs, v), atol=2e-5,
                                   err_msg=f"T={T}")


@pytest.mark.parametrize("rows", [3, 20])  # unrolled per-row writes, and the vmapped update
@pytest.mark.parametrize("at", [(), (1,)])  # a layer's own cache, and layer 1 of a stack
def test_write_entries_matches_a_loop(rows, at):
    """`mla.write_entries` against a NumPy loop: per-row indices (one near the end, where the
    window moves back to fit, as dynamic_update_slice does) and a scalar index."""
    S, T, C = 7, 2, 3
    rng = np.random.default_rng(0)
    buf = rng.normal(size=(2,) * len(at) + (rows, S, C)).astype(np.float32)
    new = rng.normal(size=(rows, T, C)).astype(np.float32)
    index = rng.integers(0, S, size=rows).astype(np.int32)
    index[0] = S - 1  # runs past the end: written at S - T
    for idx in (index, np.int32(2)):
        expected = buf.copy()
        for b in range(rows):
            start = min(int(np.broadcast_to(idx, (rows,))[b]), S - T)
            expected[at + (b, slice(start, start + T))] = new[b]
        got = jax.jit(write_entries, static_argnums=3)(jnp.asarray(buf), jnp.asarray(new),
                                                       jnp.asarray(idx), at)
        np.testing.assert_array_equal(np.asarray(got), expected)
