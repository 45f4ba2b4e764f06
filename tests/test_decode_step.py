"""`DecodeStep` (`dsv3_jax.decode_step`): a Python-driven decode loop over flat weight and cache
buffers gives the full forward's logits at every position, its `head` traced in, the cache it
leaves equal to the model's own decode steps' cache, on the split layout and on the stacks; bad
arguments are named."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import DeepSeekV3, ModelConfig, init_cache, init_variables, unstacked
from dsv3_jax.decode_step import DecodeStep
from dsv3_jax.sampling import greedy

TINY = ModelConfig.preset("tiny").replace(num_nextn_predict_layers=0)


@pytest.mark.parametrize("split, B", [(True, 1), (True, 2), (False, 2)])
def test_decode_step_equals_the_full_forward(monkeypatch, split, B):
    """Prompt of P tokens prefilled, then one token per call (the cache donated, the index
    carried on device): each call's logits equal the full forward's at that position, to fp32
    noise (2e-6 of the largest logit: the absorbed path's different order of sums, measured
    ≤ 4.7e-7); a greedy head gives their argmax; the restored cache equals the model's own
    absorbed steps' cache (the same formula; on the split layout one kernel call per
    attention layer, `mla_decode`: 1e-6). B = 1 on the split layout: caches
    without a batch axis."""
    monkeypatch.setattr(unstacked, "split_pays", lambda: split)
    c, P, T = TINY, 5, 4
    variables = init_variables(c, jax.random.key(0))
    net = DeepSeekV3(c)
    tokens = jax.random.randint(jax.random.key(1), (B, P + T), 0, c.vocab_size)
    full = np.asarray(net.apply(variables, tokens, mtp=False).logits)
    prefill = net.apply(variables, tokens[:, :P], cache=init_cache(c, B, P + T + 2),
                        cache_index=0, mtp=False).cache
    step = DecodeStep(c, variables)
    pick = DecodeStep(c, variables, head=lambda logits: greedy(logits[:, -1]))
    cache, chosen_cache = step.cache(prefill), pick.cache(prefill)
    # c_kv and k_pe per layer, or per stack (dense, MoE)
    assert len(cache) == (2 * c.num_hidden_layers if split else 4)
    index = jnp.int32(P)
    want_cache = prefill
    for t in range(P, P + T):
        logits, cache, next_index = step(tokens[:, t:t + 1], cache, index)
        chosen, chosen_cache, _ = pick(tokens[:, t:t + 1], chosen_cache, index)
        assert int(next_index) == t + 1
        scale = np.abs(full[:, t]).max()
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, t], rtol=0,
                                   atol=2e-6 * scale)
        np.testing.assert_array_equal(np.asarray(chosen), np.asarray(logits)[:, 0].argmax(-1))
        want_cache = net.apply(variables, tokens[:, t:t + 1], cache=want_cache,
                               cache_index=index, absorb=True, mtp=False).cache
        index = next_index
    # the copies only other paths read are not passed (`DecodeStep._plan`): the decode kernels'
    # fused copies replace the projections they fuse
    (plan,) = step._plans.values()
    assert 0 < len(plan[1]) < len(step.weights) if split else len(plan[1]) == len(step.weights)
    got = step.restore(cache)
    for key in ("dense", "moe"):
        for name in ("c_kv", "k_pe"):
            g, w = np.asarray(getattr(got[key], name)), np.asarray(getattr(want_cache[key], name))
            assert g.shape == w.shape
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-6 * np.abs(w).max(), err_msg=name)
    # the split layout's own caches are taken as they are
    assert len(step.cache(unstacked.unstack_cache(prefill))) == len(cache)


def test_decode_step_names_bad_arguments():
    """…and host (NumPy) weights are put on the device once, not copied on every call."""
    c = TINY
    variables = jax.tree.map(np.asarray, init_variables(c, jax.random.key(0)))
    step = DecodeStep(c, variables)
    assert all(isinstance(w, jax.Array) for w in step.weights)
    token = jnp.zeros((1, 1), jnp.int32)
    with pytest.raises(TypeError, match="DecodeStep.cache or the previous call"):
        step(token, [], jnp.int32(0))  # no cache made yet
    with pytest.raises(TypeError, match="model cache"):
        step.cache([jnp.zeros(3)])
    cache = step.cache(init_cache(c, 1, 8))
    with pytest.raises(ValueError, match=r"expected tokens \[B, T\]"):
        step(jnp.zeros((1,), jnp.int32), cache, jnp.int32(0))
    with pytest.raises(TypeError, match="DecodeStep.cache or the previous call"):
        step(token, cache[:-1], jnp.int32(0))
    with pytest.raises(TypeError, match="the buffers the step returned"):
        step.restore(cache[1:])
    other = c.replace(num_hidden_layers=c.num_hidden_layers + 1)
    with pytest.raises(ValueError, match="structure differs"):
        step.cache(init_cache(other, 1, 8))
