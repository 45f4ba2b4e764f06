"""The tiny model with moe_impl="ragged" under expert parallelism (sorted rows, the CPU twin of
ragged_all_to_all, ragged_dot experts) against the single-device model (blocks): logits and
every gradient, with balanced routing and with routing that overflows the receive buffer."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import DeepSeekV3, ModelConfig
from sharding import mesh as mesh_lib
from sharding import placement, ragged_expert_parallel

# E 16 (4 groups of 4), K 4; 1 dense + 1 MoE layer + the MTP module's MoE layer
CONFIG = ModelConfig.preset("tiny", num_hidden_layers=2)


def _step(config):
    """value_and_grad of a loss every output feeds: logits and MTP logits against fixed random
    probes, plus the balance loss."""
    model = DeepSeekV3(config)
    probes = jax.random.normal(jax.random.key(7), (2, 8, 16, config.vocab_size))

    def loss_fn(params, variables, tokens):
        out = model.apply({**variables, "params": params}, tokens[:, :-1])
        loss = ((out.logits * probes[0]).mean() + (out.mtp_logits[0] * probes[1]).mean()
                + 0.01 * out.balance_loss)
        return loss, (out.logits, out.expert_counts)

    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))


def _worst(ref, got) -> float:
    return max(float(np.abs(np.asarray(b) - np.asarray(a)).max() / np.abs(np.asarray(a)).max())
               for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("mesh_config", [dict(data=2, expert=4), dict(expert=8)])
def test_ragged_expert_parallel_model_equals_single_device(mesh_config):
    """8 sequences x 16 tokens = 16 tokens per device, A = 64 assignments, buffer 2·64 = 128
    rows (ep_buffer_factor 2). Balanced (the init's zero bias): one round, no overflow.
    Skewed (+10 bias on experts 0-3, group 0, in both MoE layers): every token uses exactly
    experts 0-3, so expert 0 receives all tokens and 12 experts none; they sit on shard 0
    (expert 4) or shards 0-1 (expert 8), which receive 4 x 64 = 256 rows from the 4 senders
    of their group (8 senders x 32 rows for expert 8): 2 rounds per MoE layer execution.
    Both equal the single-device model: max |Δ| / max |ref| ≤ 1e-5 over logits, loss and
    every gradient leaf; the expert counts are equal."""
    tokens = jax.random.randint(jax.random.key(1), (8, 17), 0, CONFIG.vocab_size)
    variables = nn.unbox(DeepSeekV3(CONFIG).init(jax.random.key(0), tokens[:, :-1]))
    skew = jnp.zeros_like(variables["moe_bias"]["e_score_correction_bias"]).at[:, :4].set(10.0)
    cases = {"balanced": variables,
             "skewed": {**variables, "moe_bias": {"e_score_correction_bias": skew}}}
    mesh = mesh_lib.make_mesh(mesh_config)
    single, sharded = _step(CONFIG), _step(CONFIG.replace(moe_impl="ragged"))
    with placement.use_mesh(mesh, "fsdp"):
        abstract = jax.eval_shape(placement.model_init_fn(CONFIG, 8), jax.random.key(0))
        shardings = placement.tree_shardings(abstract, mesh, "fsdp")
        placed = jax.device_put(variables, shardings)
        compiled = sharded.lower(placed["params"], placed, tokens).compile()
    assert "all-to-all" in compiled.as_text()
    for name, v in cases.items():
        (loss, (logits, counts)), grads = single(v["params"], v, tokens)
        v_s = jax.device_put(v, shardings)
        ragged_expert_parallel.clear_overflow_events()
        (loss_s, (logits_s, counts_s)), grads_s = compiled(v_s["params"], v_s, tokens)
        jax.effects_barrier()
        events = ragged_expert_parallel.overflow_events()
        np.testing.assert_array_equal(counts_s, counts)
        errors = (_worst(logits, logits_s), _worst(loss, loss_s), _worst(grads, grads_s))
        print(f"\n{mesh_config} {name}: logits {errors[0]:.2e} loss {errors[1]:.2e} "
              f"grads {errors[2]:.2e}, overflow events {len(events)}")
        assert max(errors) <= 1e-5, (name, errors)
        if name == "balanced":
            assert events == [], events
        else:
            assert int(counts[:, 0].min()) == 8 * 16 and int((counts[:, 4:] == 0).all())
            assert events and all(e == dict(max_rows=256, buffer_rows=128, rounds=2)
                                  for e in events), events
