"""A DeepSeekMoE layer on a few tokens as one CPU kernel call: a decode step's MoE.

Dimension key: N tokens, D model, E routed experts, K experts per token, F expert hidden units,
S shared hidden units (n_shared_experts · moe_intermediate_size), L layers of a stack.

    layer(tokens [N, D], router [D, E], bias [E], gate, up [E, D, F], down [E, F, D], layer,
          shared_gate, shared_up [D, S], shared_down [S, D], config, norm [D] or None)
        -> (y [N, D]: shared(x) + Σ_k w_k · expert_k(x),  experts [N, K] int32,  scores [N, E])

with x the tokens through an RMSNorm of weight `norm` when one is given ([0]: none).

The routing is `moe.route`'s (sigmoid scores, the correction bias for selection only, the
top-2 sums of `n_group` groups keeping `topk_group`, the top K among them with the lower index
first on ties, the weights from the unbiased scores, normalized if `norm_topk_prob`, times
`routed_scaling_factor`); the experts are SwiGLUs, each assignment's hidden units scaled by its
weight before the down projection, as the grouped-GEMM path (`expert_compute.ragged_experts`)
does with the same sgemm calls. The expert kernels may be a layer's `[E, …]` arrays or the
whole `[L, E, …]` stacks, read in place at `layer`. With S = 0 there is no shared expert.

A decode step's MoE layer otherwise runs as ~30 XLA thunks (the router's top-k, sort,
scatter, gathers and reductions) around five kernel calls (`kernels/few_token_moe.cc` replaces
them all). `moe.MoE` takes this path for at most `MAX_TOKENS` float32 tokens where the CPU
kernels run and the routed experts would take the grouped-GEMM kernel (`pays`); its gradient
is that of the XLA path (`moe.few_token_layer`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax import cpu_kernels
from dsv3_jax.config import ModelConfig
from dsv3_jax.expert_compute import resolve_moe_impl

# Most tokens for which a MoE layer runs as one kernel call: decode batches and speculative
# verification, where the router's thunks cost as much as the experts' products.
MAX_TOKENS = 64


def pays(tokens: int, config: ModelConfig, *arrays) -> bool:
    """Whether a MoE layer of `tokens` tokens runs as the kernel here: 1 ≤ tokens ≤
    MAX_TOKENS, dropless without an FP8 recipe, `moe_impl` resolving to the grouped GEMMs, and
    the kernels running here on `arrays` (all float32, one CPU device)."""
    return (1 <= tokens <= MAX_TOKENS and config.fp8 == "none"
            and config.capacity_factor is None and resolve_moe_impl(config) == "ragged"
            and cpu_kernels.runs_here(*(a.dtype for a in arrays)))


def layer(tokens, router, bias, gate, up, down, layer_index, shared_gate, shared_up,
          shared_down, config: ModelConfig, norm=None):
    """The kernel call (module docstring); check `pays` first. With `norm` [D] the tokens are
    normalized first (`rms_norm` with the config's eps: the block's post-attention norm, in
    the same call); an empty `norm` ([0]) is none. Inference only: `moe` wraps it with the
    XLA path's gradient."""
    N, D = tokens.shape
    E, K = config.n_routed_experts, config.num_experts_per_tok
    if (router.shape != (D, E) or bias.shape != (E,) or gate.shape[-3:] != (E, D, gate.shape[-1])
            or up.shape != gate.shape or down.shape != gate.shape[:-2] + gate.shape[:-3:-1]
            or shared_gate.shape[0] != D or shared_up.shape != shared_gate.shape
            or shared_down.shape != shared_gate.shape[::-1]
            or (norm is not None and norm.shape not in ((D,), (0,)))):
        raise ValueError(f"few_token_moe.layer: tokens {tokens.shape}, router {router.shape}, "
                         f"bias {bias.shape}, gate/up/down {gate.shape}/{up.shape}/"
                         f"{down.shape}, shared {shared_gate.shape}/{shared_up.shape}/"
                         f"{shared_down.shape}, norm {None if norm is None else norm.shape}: "
                         "expected [N, D], [D, E], [E], [(L,) E, D, F] twice and [(L,) E, F, D], "
                         "[D, S] twice and [S, D], [D] or none")
    if not cpu_kernels.available():
        raise RuntimeError("the CPU kernels are unavailable (see the warning logged by "
                           "dsv3_jax.cpu_kernels): use moe.MoE's XLA path")
    call = jax.ffi.ffi_call(
        "dsv3_few_token_moe",
        (jax.ShapeDtypeStruct((N, D), jnp.float32), jax.ShapeDtypeStruct((N, K), jnp.int32),
         jax.ShapeDtypeStruct((N, E), jnp.float32)),
        vmap_method="sequential")
    f32 = lambda a: a.astype(jnp.float32)
    return call(f32(tokens), f32(router), f32(bias), f32(gate), f32(up), f32(down),
                jnp.asarray(layer_index, jnp.int32).reshape(()), f32(shared_gate),
                f32(shared_up), f32(shared_down),
                jnp.zeros((0,), jnp.float32) if norm is None else f32(norm),
                groups=np.int64(config.n_group),
                topk_group=np.int64(config.topk_group), top_k=np.int64(K),
                norm_topk_prob=bool(config.norm_topk_prob),
                scaling=np.float32(config.routed_scaling_factor),
                eps=np.float32(config.rms_norm_eps))
