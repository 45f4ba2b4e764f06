"""A decode step for loops driven from Python: one jitted call per token, its arguments flat.

`generate` runs its whole loop inside one jitted function. A server that decodes token by
token (streaming, interleaving requests, stopping on outside events) calls a jitted step from
Python instead, and JAX flattens every pytree such a call takes and builds every pytree it
returns. For the decode layout (`dsv3_jax.unstacked`) these are the per-layer weights in
nested dicts (139 buffers at the bench config) and the per-layer caches in tuples of
dataclasses (12): on the 2-core CPU, warm batch-1 bench steps took 1,072 / 1,005 / 1,029 µs
called with those pytrees and 982 / 912 / 948 µs called with the same buffers as flat lists
(`DecodeStep`), three alternated pairs.

`DecodeStep` splits the weights once (`unstacked.for_decoding`'s choice: the per-layer layout
on XLA:CPU, the stacks elsewhere) and keeps them as one list; the cache travels between calls
as a list of buffers, donated and written in place:

    step = DecodeStep(config, variables, head=lambda logits: greedy(logits[:, -1:]))
    cache = step.cache(prefill_output.cache)     # init_cache's layout → the step's buffers
    for _ in range(n):
        token, cache, index = step(token, cache, index)   # tokens [B, T] at index, index + 1, …
    full = step.restore(cache)                   # the buffers → init_cache's layout

Each call returns `head(logits)` (default: the logits [B, T, V]), the cache's buffers and the
next index (index + T), so that the index stays on the device.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.extend.core import Literal

from dsv3_jax import unstacked
from dsv3_jax.config import ModelConfig
from dsv3_jax.model import default_positions


class DecodeStep:
    """A jitted absorbed-cache step over flat weight and cache buffers (module docstring)."""

    def __init__(self, config: ModelConfig, variables: dict,
                 head: Callable[[jax.Array], jax.Array] | None = None):
        self.config, self.split = config, unstacked.split_pays()
        weights = unstacked.decoding_weights(config, variables, self.split)  # one copy, once
        self.weights, self._weights_def = jax.tree.flatten(weights)
        self.weights = jax.device_put(self.weights)  # host arrays (NumPy) copied once, not per call
        self._cache_def = None
        forward = unstacked.decoding_forward(config, self.split)
        head = head or (lambda logits: logits)

        def step(weights, tokens, cache, index):
            B, T = tokens.shape
            out = forward(jax.tree.unflatten(self._weights_def, weights), tokens,
                          default_positions(B, T, index), jax.tree.unflatten(self._cache_def,
                                                                            cache), index)
            return head(out.logits), jax.tree.leaves(out.cache), index + T

        self._step_fn, self._plans = step, {}
        self._split_cache = jax.jit(lambda c: unstacked.decoding_cache(c, self.split))
        self._restore = jax.jit(lambda leaves: unstacked.restack_cache(
            jax.tree.unflatten(self._cache_def, leaves)))

    def cache(self, cache: dict) -> list[jax.Array]:
        """The step's cache buffers from `init_cache`'s layout (a prefill's `out.cache`; copied,
        the argument stays valid) or from `unstacked.unstack_cache`'s (taken as they are)."""
        if not isinstance(cache, dict) or not {"dense", "moe"} <= cache.keys():
            raise TypeError(f"DecodeStep.cache takes a model cache (init_cache's layout or "
                            f"unstack_cache's): got {type(cache).__name__}")
        if not any(isinstance(cache[key], tuple) for key in ("dense", "moe")):
            cache = self._split_cache(cache)
        elif not self.split:
            cache = unstacked.restack_cache(cache)
        leaves, treedef = jax.tree.flatten(cache)
        if self._cache_def is not None and treedef != self._cache_def:
            raise ValueError("DecodeStep.cache: this cache's structure differs from the one the "
                             "step was traced for (another config's cache?)")
        self._cache_def = treedef
        return list(leaves)

    def __call__(self, tokens: jax.Array, cache: list[jax.Array], index):
        """(head(logits), the cache's buffers after writing tokens [B, T] at positions index …
        index + T − 1, index + T). `index` is a scalar or [B] (one place per row); the cache
        argument is donated: use the returned buffers."""
        if self._cache_def is None or not isinstance(cache, list) \
                or len(cache) != self._cache_def.num_leaves:
            raise TypeError("DecodeStep: pass the buffers DecodeStep.cache or the previous call "
                            "returned (a list)")
        if not hasattr(tokens, "shape"):
            tokens = jnp.asarray(tokens, jnp.int32)
        key = (tokens.shape, cache[0].shape, cache[0].dtype, getattr(index, "shape", ()))
        plan = self._plans.get(key) or self._plan(key, tokens, cache, index)
        return plan[0](plan[1], tokens, cache, index)

    def _plan(self, key, tokens, cache, index):
        """(jitted step, the weight buffers it reads) for one signature: the step traced once to
        find the buffers its computation reads (the split layout also holds copies that only
        other paths read: 44 of the bench config's 139 at batch 1); the others are not passed,
        and stand in the traced function as zeros nothing reads, so XLA drops them. Fewer
        arguments, less dispatch: warm batch-1 bench steps 955 / 906 / 924 → 933 / 882 / 903 µs."""
        if len(tokens.shape) != 2 or len(getattr(index, "shape", ())) > 1:
            raise ValueError(f"DecodeStep: tokens {tokens.shape} and index "
                             f"{getattr(index, 'shape', ())}: expected tokens [B, T] and a "
                             "scalar or [B] index")
        jaxpr = jax.make_jaxpr(self._step_fn)(self.weights, tokens, cache, index).jaxpr
        read = {v for eqn in jaxpr.eqns for v in eqn.invars if not isinstance(v, Literal)}
        read |= {v for v in jaxpr.outvars if not isinstance(v, Literal)}
        kept = [v in read for v in jaxpr.invars[:len(self.weights)]]

        def step(weights, tokens, cache, index):
            given = iter(weights)
            every = [next(given) if k else jnp.zeros(w.shape, w.dtype)
                     for k, w in zip(kept, self.weights)]
            return self._step_fn(every, tokens, cache, index)

        plan = (jax.jit(step, donate_argnums=2),
                [w for w, k in zip(self.weights, kept) if k])
        self._plans[key] = plan
        return plan

    def restore(self, cache: list[jax.Array]) -> dict:
        """The cache in `init_cache`'s layout (what `DeepSeekV3.apply` takes) from the step's
        buffers."""
        if self._cache_def is None or len(cache) != self._cache_def.num_leaves:
            raise TypeError("DecodeStep.restore: pass the buffers the step returned")
        return self._restore(list(cache))
