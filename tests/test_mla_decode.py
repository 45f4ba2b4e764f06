"""`mla_decode`: an MLA layer's absorbed decode step as one CPU kernel call. Its outputs equal
the formula in XLA ops (`mla_decode.reference`) and, inside the model, the XLA path's
(`mla.MLA` with the kernel switched off); the cache is written in place where the formula
writes it; bad operands are refused by name."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import ModelConfig, mla_decode, unstacked
from dsv3_jax.decode_step import DecodeStep
from dsv3_jax.model import DeepSeekV3, init_cache, init_variables
from dsv3_jax.rope import rope_tables, softmax_scale


def _operands(c: ModelConfig, B, T, S, norm, squeezed, key):
    """Random decode weights of config c (N(0, 1) / √fan-in), caches, positions and index."""
    N, H, R, A, C, D = (c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim,
                        c.v_head_dim, c.kv_lora_rank, c.hidden_size)
    Q = c.q_lora_rank or 0
    ks = iter(jax.random.split(key, 16))
    normal = lambda shape, fan: jax.random.normal(next(ks), shape) / np.sqrt(fan)
    scale = lambda n: 1 + 0.2 * jax.random.normal(next(ks), (n,))
    weights = mla_decode.Weights(
        norm=scale(D) if norm else None, x=normal((D, (Q or N * (H + R)) + C + R), D),
        q_norm=scale(Q) if Q else None, q_b=normal((Q, N * (H + R)), Q) if Q else None,
        kv_norm=scale(C), k=normal((N, H, C), H), v=normal((N, C, A), C),
        o=normal((N, A, D), N * A))
    x = 3 * jax.random.normal(next(ks), (B, T, D))
    cache = (S,) if squeezed else (B, S)
    c_kv, k_pe = jax.random.normal(next(ks), (*cache, C)), jax.random.normal(next(ks), (*cache, R))
    # per row: a first slot (one past the end - T: the window moved back), positions from it
    index = jax.random.randint(next(ks), (B,), 0, S + 3).at[0].set(S - 1)
    positions = jnp.minimum(index, S - T)[:, None] + jnp.arange(T)
    return x, weights, index, positions, c_kv, k_pe


CASES = {  # name: (config overrides, B, T, S, input norm, one-sequence cache [S, ·])
    "one_sequence": (dict(), 1, 1, 300, True, True),
    "no_q_compression": (dict(q_lora_rank=None), 3, 2, 90, False, False),
    # B·T·N·H·C ≥ 2¹⁶ multiply-adds: the per-head products split over the pool
    "many_heads": (dict(num_attention_heads=16, qk_nope_head_dim=32, kv_lora_rank=128,
                        v_head_dim=32), 2, 3, 700, True, False),
}


@pytest.mark.usefixtures("each_blas")
@pytest.mark.parametrize("case", CASES)
def test_kernel_equals_the_formula_and_writes_the_cache_in_place(case):
    """Random operands, under each BLAS: y equals `reference`'s to 5e-6 of its largest value
    (measured ≤ 1.5e-6: the kernel's sums in another order); the caches equal its caches (the
    new entries to 1e-6, measured ≤ 2.1e-7; every other slot unchanged, bit for bit); the
    gradient wrt x is the formula's, exactly (the kernel's derivatives are `reference`'s)."""
    overrides, B, T, S, norm, squeezed = CASES[case]
    c = ModelConfig.preset("tiny", **overrides)
    x, w, index, positions, c_kv, k_pe = _operands(c, B, T, S, norm, squeezed,
                                                   jax.random.key(0))
    cos, sin = rope_tables(positions, c)
    args = dict(eps=c.rms_norm_eps, scale=softmax_scale(c))
    assert mla_decode.pays(x, c_kv, k_pe, w)
    y, new_c, new_k = jax.jit(lambda *a: mla_decode.layer(*a, **args))(
        x, w, cos, sin, index, positions, c_kv, k_pe)
    y_r, c_r, k_r = mla_decode.reference(x, w, cos, sin, index, positions, c_kv, k_pe, **args)
    np.testing.assert_allclose(y, y_r, rtol=0, atol=5e-6 * float(jnp.abs(y_r).max()))
    for new, want, old in ((new_c, c_r, c_kv), (new_k, k_r, k_pe)):
        np.testing.assert_allclose(new, want, rtol=0, atol=1e-6 * float(jnp.abs(want).max()))
        written = np.asarray(want != old)
        np.testing.assert_array_equal(np.asarray(new)[~written], np.asarray(old)[~written])
        assert written.reshape(-1, want.shape[-1]).any(-1).sum() == B * T  # T slots per row
    probe = jax.random.normal(jax.random.key(1), y.shape)
    grad = lambda f: jax.grad(lambda x: (f(x, w, cos, sin, index, positions, c_kv, k_pe,
                                           **args)[0] * probe).sum())(x)
    np.testing.assert_array_equal(grad(mla_decode.layer), grad(mla_decode.reference))


@pytest.mark.parametrize("overrides, B", [(dict(), 1), (dict(q_lora_rank=None), 2)])
def test_decode_steps_take_the_kernel_and_keep_the_xla_paths_numbers(monkeypatch, overrides, B):
    """`DecodeStep` on the per-layer layout: one kernel call per layer (in its jaxpr); over
    three steps after a prefill its logits equal those of the same step with the kernel
    switched off (`pays` False: `mla.MLA`'s XLA path) to 2e-6 of the largest, and so does the
    cache it leaves (measured ≤ 4.4e-7 and 2.7e-7)."""
    monkeypatch.setattr(unstacked, "split_pays", lambda: True)
    c = ModelConfig.preset("tiny", num_nextn_predict_layers=0, **overrides)
    variables = init_variables(c, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (B, 9), 0, c.vocab_size)
    prefill = DeepSeekV3(c).apply(variables, tokens[:, :6], cache=init_cache(c, B, 12),
                                  cache_index=0, mtp=False).cache

    def steps():
        step = DecodeStep(c, variables)
        cache, index, logits = step.cache(prefill), jnp.int32(6), []
        jaxpr = str(jax.make_jaxpr(step._step_fn)(step.weights, tokens[:, 6:7], cache, index))
        for t in range(6, 9):
            out, cache, index = step(tokens[:, t:t + 1], cache, index)
            logits.append(np.asarray(out))
        return logits, jax.tree.leaves(step.restore(cache)), jaxpr

    logits, cache, jaxpr = steps()
    assert jaxpr.count("dsv3_mla_decode") == c.num_hidden_layers
    monkeypatch.setattr(mla_decode, "pays", lambda *a: False)
    logits_x, cache_x, jaxpr_x = steps()
    assert "dsv3_mla_decode" not in jaxpr_x
    for a, b in zip(logits + cache, logits_x + cache_x, strict=True):
        b = np.asarray(b)
        np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=2e-6 * np.abs(b).max())


def test_when_the_kernel_runs_and_bad_operands():
    """`pays`: 1..MAX_ROWS float32 rows, T ≤ S; operands of the wrong shapes are refused by
    name."""
    c = ModelConfig.preset("tiny")
    x, w, index, positions, c_kv, k_pe = _operands(c, 2, 3, 16, True, False, jax.random.key(0))
    assert mla_decode.pays(x, c_kv, k_pe, w)
    assert not mla_decode.pays(x.astype(jnp.bfloat16), c_kv, k_pe, w)
    assert not mla_decode.pays(jnp.zeros((1, 17, c.hidden_size)), c_kv, k_pe, w)  # T > S
    assert not mla_decode.pays(jnp.zeros((mla_decode.MAX_ROWS + 1, 1, c.hidden_size)),
                               c_kv, k_pe, w)
    cos, sin = rope_tables(positions, c)
    call = lambda **k: mla_decode.layer(**{**dict(x=x, weights=w, cos=cos, sin=sin, index=index,
                                                  positions=positions, c_kv=c_kv, k_pe=k_pe),
                                           **k}, eps=1e-6, scale=0.1)
    with pytest.raises(ValueError, match=r"weights\.o \(4, 16, 32\) \(expected \(4, 16, 64\)\)"):
        call(weights=w._replace(o=w.o[..., :32]))
    with pytest.raises(ValueError, match=r"c_kv \(2, 16, 30\) \(expected \(2, 16, 32\)\)"):
        call(c_kv=c_kv[..., :30])
    with pytest.raises(ValueError, match=r"index \(3,\) \(expected a scalar or \(2,\)\)"):
        call(index=jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="a cache without its batch axis holds one sequence"):
        call(c_kv=c_kv[0], k_pe=k_pe[0])
