"""Multi-head latent attention (MLA): full path for training/prefill, absorbed path for decode.

Dimension key: B batch · T query positions · S key positions · D model · N heads ·
H qk_nope head dim · R qk_rope head dim · A v head dim · Q q_lora_rank · C kv_lora_rank.

Query:  c_q = RMSNorm(x W_qa) [Q];  q_nope = c_q W_qb_nope [N,H];  q_pe = RoPE(c_q W_qb_pe) [N,R]
        (without q compression: q = x W_q directly).
Latent: c_kv = RMSNorm(x W_kva) [C];  k_pe = RoPE(x W_kpe) [R], one rope key shared by all heads.
Full:   k_nope = c_kv W_kvb_k [N,H];  v = c_kv W_kvb_v [N,A];
        score = [q_nope; q_pe]·[k_nope; k_pe] · scale (one H+R contraction per head);
        out = softmax(score) v W_o (normalized after the v product: `_masked_attend`), heads
        ahead of positions ([B, N, T, ·]) and the queries in causal chunks that skip the keys
        no query of the chunk can see (`causal_attention`; on one CPU device in float32 one
        fused kernel call each way, `dsv3_jax/fused_attention.py`).
Absorbed decode: the cache holds only c_kv and k_pe (C + R values per token). W_kvb_k is folded
into the query (q_nope W_kvb_k → [N,C]) and W_kvb_v is applied after attending over the latents:
the same numbers without ever materializing per-head keys or values. On one CPU device in
float32 a batched cache is attended in one kernel call (`dsv3_jax/latent_attention.py`).

The HF tensors `q_b_proj`, `kv_a_proj_with_mqa` and `kv_b_proj` are stored split (nope/pe, k/v)
so every contraction here is a plain einsum in the dimension key; `dsv3_jax.hf` splits and joins.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from dsv3_jax import cpu_kernels, fused_attention, latent_attention, mla_decode
from dsv3_jax.config import ModelConfig
from dsv3_jax.layers import (
    ABSORBED,
    Einsum,
    RMSNorm,
    Weight,
    dtype_of,
    normed_project,
    product,
    project,
)
from dsv3_jax.rope import apply_rope, rope_tables, softmax_scale

# Rows up to which per-row cache writes (one index per sequence) are unrolled slice updates;
# past it, one vmapped update (a scatter, which on XLA:CPU also transposes the stack to put
# rows first).
_UNROLLED_ROW_WRITES = 16


def write_entries(buf: jax.Array, new: jax.Array, index: jax.Array, at: tuple = ()) -> jax.Array:
    """buf [*at, B, S, ·] with new [B, T, ·] written at positions index .. index+T−1 of slot
    `at` (leading indices, e.g. a layer of a stack), in place: `index` a scalar, or [B] with
    one write per row. Like `dynamic_update_slice`, a window past the end is moved back."""
    new = new.astype(buf.dtype).reshape((1,) * len(at) + new.shape)
    if index.ndim == 0:
        return jax.lax.dynamic_update_slice(buf, new, (*at, 0, index, 0))
    rows = new.shape[len(at)]
    if rows <= _UNROLLED_ROW_WRITES:
        for b in range(rows):
            row = jax.lax.slice_in_dim(new, b, b + 1, axis=len(at))
            buf = jax.lax.dynamic_update_slice(buf, row, (*at, b, index[b], 0))
        return buf
    return jax.vmap(lambda b, n, i: jax.lax.dynamic_update_slice(b, n, (*at, i, 0)),
                    in_axes=(len(at), len(at), 0), out_axes=len(at))(buf, new, index)


# The variable collection of an MLA layer's decode kernels, made once by `absorbed_kernels` for
# a decode loop (`dsv3_jax.unstacked`) and used when present (without an FP8 recipe, which
# scales the stored kernels): the absorbed products' kernels with the heads first, "k" =
# kv_b_proj_k's [C, N, H] as [N, H, C] and "v" = kv_b_proj_v's [C, N, A] as [N, C, A]; and
# the projections that read the same input as one kernel each, "x" = [q_a | kv_a | k_pe]
# ([D, Q + C + R]; without q compression [q_nope | q_pe | kv_a | k_pe], [D, N·H + N·R + C + R])
# and "q_b" = [q_b_nope | q_b_pe] ([Q, N·H + N·R]): a decode step's projections are streams
# through their weights, and one call per input instead of two or three. (`layers.ABSORBED`:
# a dense layer's SwiGLU keeps its fused [gate | up] there too.)


def absorbed_kernels(attention_params: dict) -> dict:
    """The `ABSORBED` collection of one MLA layer from its params."""
    p = attention_params
    k, v = p["kv_b_proj_k"]["kernel"], p["kv_b_proj_v"]["kernel"]
    flat = lambda name: p[name]["kernel"].reshape(p[name]["kernel"].shape[0], -1)
    from_x = (("q_a_proj",) if "q_a_proj" in p else ("q_proj_nope", "q_proj_pe")) + (
        "kv_a_proj", "k_pe_proj")
    out = {"k": jnp.transpose(k, (1, 2, 0)), "v": jnp.transpose(v, (1, 0, 2)),
           "x": jnp.concatenate([flat(n) for n in from_x], axis=1)}
    if "q_a_proj" in p:
        out["q_b"] = jnp.concatenate([flat("q_b_proj_nope"), flat("q_b_proj_pe")], axis=1)
    return out


@flax.struct.dataclass
class LatentCache:
    """The decode cache of one MLA layer: normalized latents and rotated rope keys."""

    c_kv: jax.Array  # [B, S, C]
    k_pe: jax.Array  # [B, S, R]

    @classmethod
    def zeros(cls, config: ModelConfig, batch: int, length: int, dtype) -> LatentCache:
        return cls(jnp.zeros((batch, length, config.kv_lora_rank), dtype),
                   jnp.zeros((batch, length, config.qk_rope_head_dim), dtype))

    def write(self, c_kv: jax.Array, k_pe: jax.Array, index: jax.Array) -> LatentCache:
        """Writes [B, T, ·] new entries at positions index .. index+T-1.

        `index` is a scalar (every row at the same place: training, prefill) or [B] (one place
        per row: batched decoding of sequences of different lengths). Like
        `dynamic_update_slice`, a window running past the end is moved back to fit.
        """
        index = jnp.asarray(index)
        if self.c_kv.ndim == 2:  # one sequence, stored without its batch axis (`squeeze`)
            at = index.reshape(-1)[0]  # a scalar, or the one row's [1]
            put = lambda buf, new: jax.lax.dynamic_update_slice(buf, new[0].astype(buf.dtype),
                                                                (at, 0))
            return LatentCache(put(self.c_kv, c_kv), put(self.k_pe, k_pe))
        return LatentCache(write_entries(self.c_kv, c_kv, index),
                           write_entries(self.k_pe, k_pe, index))

    def view(self) -> LatentCache:
        """The cache attention reads ([B, S, ·]; `LayerCache.view`'s counterpart): itself, with
        the batch axis of a squeezed one-sequence cache."""
        if self.c_kv.ndim == 2:
            return LatentCache(self.c_kv[None], self.k_pe[None])
        return self

    def squeeze(self) -> LatentCache:
        """A one-sequence cache stored [S, ·]. On XLA:CPU a [1, S, ·] cache written in place and
        read by a product (whose size-1 batch axis XLA drops: a bitcast of the written buffer)
        was copied four times per step; stored [S, ·], the write, the products and the returned
        buffer are one buffer."""
        return LatentCache(self.c_kv[0], self.k_pe[0])


@flax.struct.dataclass
class LayerCache:
    """One layer's place in a stacked cache: the whole [L, B, S, ·] LatentCache and the layer's
    index in it. A layer scan carries the stack, so a decode step writes its new entries into
    it in place instead of slicing each layer's cache out and stacking it again."""

    stack: LatentCache  # [L, B, S, ·]
    layer: jax.Array  # scalar int32

    def write(self, c_kv: jax.Array, k_pe: jax.Array, index: jax.Array) -> LayerCache:
        """`LatentCache.write` into layer `self.layer` of the stack."""
        index, at = jnp.asarray(index), (self.layer,)
        return LayerCache(LatentCache(write_entries(self.stack.c_kv, c_kv, index, at),
                                      write_entries(self.stack.k_pe, k_pe, index, at)),
                          self.layer)

    def view(self) -> LatentCache:
        """This layer's LatentCache [B, S, ·]."""
        return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, self.layer, 0, False),
                            self.stack)


class MLA(nn.Module):
    """Multi-head latent attention. See the module docstring for the algebra."""

    config: ModelConfig

    def setup(self):
        c = self.config
        D, N, H, R, A, C = (c.hidden_size, c.num_attention_heads, c.qk_nope_head_dim,
                            c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank)
        if c.q_lora_rank is None:
            self.q_proj_nope = Einsum((D, N, H), ("embed", "heads", "qk_nope"), c)
            self.q_proj_pe = Einsum((D, N, R), ("embed", "heads", "qk_rope"), c)
        else:
            Q = c.q_lora_rank
            self.q_a_proj = Einsum((D, Q), ("embed", "q_lora"), c)
            self.q_a_layernorm = RMSNorm(Q, c, axis_name="q_lora")
            self.q_b_proj_nope = Einsum((Q, N, H), ("q_lora", "heads", "qk_nope"), c)
            self.q_b_proj_pe = Einsum((Q, N, R), ("q_lora", "heads", "qk_rope"), c)
        self.kv_a_proj = Einsum((D, C), ("embed", "kv_lora"), c)
        self.k_pe_proj = Einsum((D, R), ("embed", "qk_rope"), c)
        self.kv_a_layernorm = RMSNorm(C, c, axis_name="kv_lora")
        self.kv_b_proj_k = Einsum((C, N, H), ("kv_lora", "heads", "qk_nope"), c)
        self.kv_b_proj_v = Einsum((C, N, A), ("kv_lora", "heads", "v_head"), c)
        self.o_proj = Einsum((N, A, D), ("heads", "v_head", "embed"), c)

    def _query(self, x, positions, projected=None):
        """(q_nope [B, N, T, H], q_pe [B, T, N, R]): q_nope's heads ahead of positions, so
        every attention product is a dot with (B, N) leading and its result needs no
        transpose; q_pe as the projection and the rotation leave it. `projected`: x's
        projections through the decode layout's fused kernel (`_from_x`)."""
        c = self.config
        N, H, R = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim
        if projected is not None:
            if c.q_lora_rank is None:
                q = projected["q"]
            else:
                q = normed_project(projected["q_a"], self.q_a_layernorm,
                                   self.get_variable(ABSORBED, "q_b"), c)
            B, T = q.shape[:2]
            q_nope = jnp.swapaxes(q[..., :N * H].reshape(B, T, N, H), 1, 2)
            q_pe = q[..., N * H:].reshape(B, T, N, R)
        elif c.q_lora_rank is None:
            q_nope = self.q_proj_nope("BTD,DNH->BNTH", x)
            q_pe = self.q_proj_pe("BTD,DNR->BTNR", x)
        else:
            c_q = self.q_a_layernorm(self.q_a_proj("BTD,DQ->BTQ", x))
            q_nope = self.q_b_proj_nope("BTQ,QNH->BNTH", c_q)
            q_pe = self.q_b_proj_pe("BTQ,QNR->BTNR", c_q)
        q_nope = nn.with_logical_constraint(q_nope, ("batch", "heads", "length", "qk_nope"))
        return q_nope, apply_rope(q_pe, positions, c)

    def _latent(self, x, positions, projected=None):
        if projected is not None:
            c_kv, k_pe = projected["kv_a"], projected["k_pe"]
        else:
            c_kv, k_pe = self.kv_a_proj("BSD,DC->BSC", x), self.k_pe_proj("BSD,DR->BSR", x)
        return self.kv_a_layernorm(c_kv), apply_rope(k_pe, positions, self.config)

    def _from_x(self, x, norm):
        """x's projections through the decode layout's fused kernel (`ABSORBED` "x"), x
        through `norm` first (when given), split by name ({"q_a" or "q", "kv_a", "k_pe"});
        None where there is no fused kernel."""
        c = self.config
        if c.fp8 != "none" or not self.has_variable(ABSORBED, "x"):
            return None
        out = normed_project(x, norm, self.get_variable(ABSORBED, "x"), c)
        N = c.num_attention_heads
        q = c.q_lora_rank or N * (c.qk_nope_head_dim + c.qk_rope_head_dim)
        sizes = {"q_a" if c.q_lora_rank else "q": q, "kv_a": c.kv_lora_rank,
                 "k_pe": c.qk_rope_head_dim}
        parts, at = {}, 0
        for name, size in sizes.items():
            parts[name], at = out[..., at:at + size], at + size
        return parts

    def _decode_kernel(self, x, positions, cache, cache_index, norm):
        """(output, updated cache) of the absorbed path as one kernel call (`mla_decode`),
        from the decode layout's kernels; None where it does not run (an FP8 recipe, no
        decode layout, a stacked cache's LayerCache, not `mla_decode.pays`)."""
        c = self.config
        names = ("x", "k", "v") + (("q_b",) if c.q_lora_rank else ())
        if (c.fp8 != "none" or not isinstance(cache, LatentCache)
                or not all(self.has_variable(ABSORBED, n) for n in names)):
            return None
        absorbed = {n: self.get_variable(ABSORBED, n) for n in names}
        weights = mla_decode.Weights(
            norm=None if norm is None else norm.weight, x=absorbed["x"],
            q_norm=self.q_a_layernorm.weight if c.q_lora_rank else None,
            q_b=absorbed.get("q_b"), kv_norm=self.kv_a_layernorm.weight, k=absorbed["k"],
            v=absorbed["v"], o=self.o_proj.weight().kernel)
        if not mla_decode.pays(x, cache.c_kv, cache.k_pe, weights):
            return None
        cos, sin = rope_tables(positions, c)
        y, c_kv, k_pe = mla_decode.layer(x, weights, cos, sin, cache_index, positions,
                                         cache.c_kv, cache.k_pe, eps=c.rms_norm_eps,
                                         scale=softmax_scale(c))
        return y.astype(dtype_of(c.dtype)), LatentCache(c_kv, k_pe)

    def __call__(self, x, positions, cache: LatentCache | None = None, cache_index=None,
                 absorb: bool = False, norm: RMSNorm | None = None):
        """Attends causally.

        Args:
          x: [B, T, D] inputs, through `norm` first when given (the block's input norm: the
            decode layout's fused projection applies it inside its kernel call);
            positions: [B, T] their absolute positions.
          cache: None for training (attend within x). Otherwise this layer's LatentCache (or
            its LayerCache place in a stacked one), into which the new latents are written at
            `cache_index` (a scalar, or [B]: per row).
          absorb: with a cache, attend over the whole cache through the absorbed path
            (decode, speculative verification); without, attend within x only (prefill at 0).
        Returns:
          ([B, T, D] output, updated cache or None).
        """
        dtype = dtype_of(self.config.dtype)
        if cache is not None and absorb:
            fused = self._decode_kernel(x, positions, cache, cache_index, norm)
            if fused is not None:
                return fused
        projected = self._from_x(x, norm) if cache is not None and absorb else None
        if projected is None and norm is not None:
            x = norm(x)
        q_nope, q_pe = self._query(x, positions, projected)
        c_kv, k_pe = self._latent(x, positions, projected)
        if cache is not None:
            cache = cache.write(c_kv, k_pe, cache_index)
        if cache is not None and absorb:
            view = cache.view()
            # the decode layout's copies of kv_b's kernels with heads first (`ABSORBED`): as
            # stored, each absorbed product transposed its kernel on every step
            if self.config.fp8 == "none" and self.has_variable(ABSORBED, "k"):
                k, v = (Weight(self.get_variable(ABSORBED, n)) for n in ("k", "v"))
                k_eqn, v_eqn = "BNTH,NHC->BNTC", "BNTC,NCA->BNTA"
            else:
                k, v = self.kv_b_proj_k.weight(), self.kv_b_proj_v.weight()
                k_eqn, v_eqn = "BNTH,CNH->BNTC", "BNTC,CNA->BNTA"
            q_latent = project(k_eqn, q_nope, k, self.config)
            q_pe = jnp.swapaxes(q_pe, 1, 2)  # [B, N, T, R], as q_latent
            if cpu_kernels.runs_here(view.c_kv.dtype, q_latent.dtype, q_pe.dtype):
                # one CPU kernel call: both score products, the masked softmax, the values. A
                # one-sequence cache stored without its batch axis (`LatentCache.squeeze`) goes
                # in as stored: read through its [None] view, XLA:CPU copied it every step
                read = cache if isinstance(cache, LatentCache) else view
                out_latent = latent_attention.attend(
                    read.c_kv, read.k_pe, q_latent, q_pe, positions,
                    softmax_scale(self.config)).astype(dtype)
            else:
                key_pos = jnp.arange(view.c_kv.shape[1])[None, None, :]  # slot s: position s
                mask = key_pos <= positions[:, :, None]  # [B, T, S]
                # the cache as the left operand ([S, C] · [C, N·T]): it is read in its stored
                # layout, where [N·T, C] · [S, C]ᵀ makes XLA:CPU copy it transposed every step
                scores = jnp.transpose(product("BSC,BNTC->BSNT", view.c_kv, q_latent, dtype)
                                       + product("BSR,BNTR->BSNT", view.k_pe, q_pe, dtype),
                                       (0, 2, 3, 1))
                out_latent = _masked_attend(scores, mask, "BNTS,BSC->BNTC", view.c_kv,
                                            self.config)
            out = project(v_eqn, out_latent, v, self.config)
        else:
            k_nope = self.kv_b_proj_k("BSC,CNH->BNSH", c_kv)
            v = self.kv_b_proj_v("BSC,CNA->BNSA", c_kv)
            out = causal_attention(q_nope, q_pe, k_nope, k_pe, v, positions, self.config)
        out = nn.with_logical_constraint(out, ("batch", "heads", "length", "v_head"))
        return self.o_proj("BNTA,NAD->BTD", out), cache


ATTENTION_CHUNK = 128  # query positions per causal chunk (at least; at most 16 chunks)


def causal_attention(q_nope: jax.Array, q_pe: jax.Array, k_nope: jax.Array, k_pe: jax.Array,
                     v: jax.Array, positions: jax.Array, config: ModelConfig) -> jax.Array:
    """softmax((q_nope·k_nope + q_pe·k_pe) · scale, causal) v within one sequence: q_nope,
    k_nope [B, N, T, H], q_pe [B, T, N, R], k_pe [B, T, R] (one rope key for all heads),
    v [B, N, T, A], positions [B, T]; query t sees key s when s ≤ t and
    positions[s] ≤ positions[t]. Returns [B, N, T, A].

    On one CPU device in float32 this is one fused kernel call each way
    (`dsv3_jax/fused_attention.py`). Otherwise one qk contraction of H + R per head (the rope
    key broadcast to the heads), the queries in chunks of c = max(128, ceil(T/16)) positions,
    chunk i attending to keys [0, (i+1)·c) only: the keys after a chunk can never be visible
    to it, so nothing is dropped, and at T = 1024 the scores cost 36/64 of the full T × T
    (exact softmax per chunk: each chunk sees all of its keys at once).
    """
    dtype = dtype_of(config.dtype)
    if cpu_kernels.runs_here(q_nope.dtype, q_pe.dtype, k_nope.dtype, k_pe.dtype, v.dtype):
        return fused_attention.attend(q_nope, q_pe, k_nope, k_pe, v, positions,
                                      softmax_scale(config)).astype(dtype)
    B, N, T, _ = k_nope.shape
    q = jnp.concatenate([q_nope, jnp.swapaxes(q_pe, 1, 2).astype(q_nope.dtype)], axis=-1)
    k = jnp.concatenate([k_nope, jnp.broadcast_to(k_pe[:, None].astype(k_nope.dtype),
                                                  (B, N, T, k_pe.shape[-1]))], axis=-1)
    chunk = max(ATTENTION_CHUNK, -(-T // 16))
    outs = []
    for start in range(0, T, chunk):
        end = min(start + chunk, T)
        scores = product("BNTK,BNSK->BNTS", q[:, :, start:end], k[:, :, :end], dtype)
        mask = fused_attention.visible(positions, start, end)  # [B, t, s]
        outs.append(_masked_attend(scores, mask, "BNTS,BNSA->BNTA", v[:, :, :end], config))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)


def _masked_attend(scores, mask, eqn: str, values, config: ModelConfig):
    """softmax over S of scores [B, N, T, S] · scale (fp32, mask [B, T, S]) applied to values by
    `eqn`, normalized after the product: exp(s − max) · values / Σ exp(s − max). The division
    then runs over the [B, N, T, ·] output, not the [B, N, T, S] probabilities, and needs no
    broadcast row sums (a `[8, 8, 256, 64]` causal attention fwd+bwd in isolation: 37-43 →
    27-30 ms on 2 CPU cores). The max is a constant to the gradient, as in `jax.nn.softmax`:
    the result does not depend on it."""
    dtype = dtype_of(config.dtype)
    scores = scores.astype(jnp.float32) * softmax_scale(config)
    scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
    weights = jnp.exp(scores - jax.lax.stop_gradient(scores.max(-1, keepdims=True)))
    out = product(eqn, weights, values, dtype, out_dtype=jnp.float32)
    return (out / weights.sum(-1, keepdims=True)).astype(dtype)
