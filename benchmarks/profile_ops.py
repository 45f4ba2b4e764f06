"""Where a jitted call's time goes on XLA:CPU, by op kind: a `jax.profiler` trace of the
executable's thunks, each mapped to its HLO instruction and classified.

    python -m benchmarks.profile_ops [--figure train|prefill|decode] [--config bench] [--top 15]
                                     [--mtp]

Prints one JSON line per op kind (ms per call, share of the call, thunk count) and then the `--top`
costliest instructions with their source op names. Kinds: a fusion is `matmul` if it holds a
dot or convolution, else `gather`, `scatter`, `dynamic-slice` (dynamic-slice or
dynamic-update-slice), `reduce`, `sort`, `copy/transpose` (only copies, transposes, bitcasts),
`broadcast` (a broadcast of a constant or a scalar, e.g. zeros), or `elementwise`; an unfused
instruction is its opcode. Loops and branches (`CONTAINERS`) are not counted: their thunks
span their bodies', which are. The config runs without its MTP modules, as `vs_transformers`
measures it (`--mtp` keeps them).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile

import flax.linen as nn
import jax

from benchmarks.common import parse_config, positive_int, report
from dsv3_jax import DeepSeekV3, unstacked
from dsv3_jax.model import init_cache, init_variables
from dsv3_jax.training.step import cross_entropy

# instructions whose thunk runs other thunks (left out: their time is their bodies')
CONTAINERS = ("while", "conditional", "call")

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = [^=]*?\b([a-z][\w\-]*)\((.*)$")
_COMPUTATION = re.compile(r"^%?([\w.\-]+) .*\{\s*$")


def _computations(hlo: str) -> dict[str, list[tuple[str, str, str]]]:
    """computation name → [(instruction, opcode, rest of line)]."""
    out, current = {}, None
    for line in hlo.splitlines():
        if current is None:
            m = _COMPUTATION.match(line)  # an unindented header ending in "{"
            if m and not line.startswith(" "):
                current = out.setdefault(m.group(1).lstrip("%"), [])
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTRUCTION.match(line)
        if m:
            current.append(m.groups())
    return out


def _fusion_kind(body: list[tuple[str, str, str]]) -> str:
    ops = {op for _, op, _ in body} - {"parameter", "constant", "bitcast", "get-tuple-element",
                                       "tuple"}
    for kinds, name in ((("dot", "convolution"), "matmul"), (("gather",), "gather"),
                        (("scatter",), "scatter"),
                        (("dynamic-slice", "dynamic-update-slice"), "dynamic-slice"),
                        (("reduce", "reduce-window"), "reduce"), (("sort",), "sort")):
        if ops & set(kinds):
            return name
    if ops <= {"copy", "transpose", "reshape"}:
        return "copy/transpose"
    if ops <= {"broadcast", "iota"}:
        return "broadcast"
    return "elementwise"


def classify(hlo: str) -> dict[str, tuple[str, str]]:
    """HLO instruction name → (op kind, source op name from its metadata)."""
    comps = _computations(hlo)
    out = {}
    for body in comps.values():
        for name, op, rest in body:
            source = re.search(r'op_name="([^"]*)"', rest)
            source = source.group(1) if source else ""
            if op == "fusion":
                called = re.search(r"calls=%?([\w.\-]+)", rest)
                kind = _fusion_kind(comps.get(called.group(1), [])) if called else "fusion"
            else:
                kind = op
            out[name] = (kind, source)
    return out


def profile(fn, *args, repeats: int = 3):
    """({kind: (seconds per call, thunks per call)}, [(seconds per call, instruction, kind,
    source)] costliest first, seconds per call in thunks) of the jitted fn on args."""
    hlo = fn.lower(*args).compile().as_text()
    names = classify(hlo)
    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(repeats):
                jax.block_until_ready(fn(*args))
        path = glob.glob(f"{d}/**/perfetto_trace.json.gz", recursive=True)[0]
        with gzip.open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    per_op = collections.Counter()
    for e in events:
        name = e.get("name")
        # a loop or branch thunk spans the thunks of its body, which are counted themselves
        if e.get("ph") == "X" and name in names and names[name][0] not in CONTAINERS:
            per_op[name] += e.get("dur", 0) * 1e-6 / repeats
    kinds = collections.defaultdict(lambda: [0.0, 0])
    for name, seconds in per_op.items():
        kinds[names[name][0]][0] += seconds
        kinds[names[name][0]][1] += 1
    top = sorted(((s, n, *names[n]) for n, s in per_op.items()), reverse=True)
    return dict(kinds), top, sum(per_op.values())


def figure_call(figure: str, config, batch: int, seq_len: int, context: int):
    """(jitted fn, args) of one benchmark figure on freshly initialized weights."""
    net = DeepSeekV3(config)
    variables = jax.device_put(nn.unbox(init_variables(config, jax.random.key(0))))
    tokens = lambda b, t: jax.random.randint(jax.random.key(1), (b, t), 0, config.vocab_size)
    if figure == "train":
        def loss(params, x):
            out = net.apply({**variables, "params": params}, x)
            return cross_entropy(out.logits[:, :-1], x[:, 1:]).mean() + out.balance_loss
        return jax.jit(jax.value_and_grad(loss)), (variables["params"], tokens(batch, seq_len))
    prefill = jax.jit(lambda v, x: net.apply(v, x, cache=init_cache(config, x.shape[0],
                                                                    context + 1),
                                             cache_index=0, mtp=False).cache)
    if figure == "prefill":
        return prefill, (variables, tokens(batch, context))
    # the decode layout generate() steps in: per-layer weights and caches (dsv3_jax.unstacked),
    # the cache donated and written in place
    cache = unstacked.unstack_cache(prefill(variables, tokens(batch, context)))

    def step(v, t, cache):
        out = unstacked.forward(config, v, t, cache=cache, cache_index=context)
        return out.logits, out.cache

    return (_Threaded(jax.jit(step, donate_argnums=2), cache),
            (unstacked.unstack_variables(config, variables), tokens(batch, 1)))


class _Threaded:
    """A jitted step whose donated last argument is its previous call's second output (a decode
    cache, updated in place as `generate` does); called with the other arguments."""

    def __init__(self, fn, state):
        self.fn, self.state = fn, state

    def lower(self, *args):
        return self.fn.lower(*args, self.state)

    def __call__(self, *args):
        out, self.state = self.fn(*args, self.state)
        return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--figure", default="train", choices=("train", "prefill", "decode"))
    parser.add_argument("--config", default="bench")
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--seq_len", type=positive_int, default=256, help="train")
    parser.add_argument("--context", type=positive_int, default=1024, help="prefill, decode")
    parser.add_argument("--top", type=positive_int, default=15)
    parser.add_argument("--mtp", action="store_true",
                        help="keep the config's MTP modules (vs_transformers drops them)")
    args = parser.parse_args()
    config = parse_config(parser, "--config", args.config)
    if not args.mtp:
        config = config.replace(num_nextn_predict_layers=0)
    fn, call_args = figure_call(args.figure, config, args.batch, args.seq_len, args.context)
    kinds, top, total = profile(fn, *call_args)
    for kind, (seconds, count) in sorted(kinds.items(), key=lambda kv: -kv[1][0]):
        report(benchmark="profile_ops", figure=args.figure, config=args.config, kind=kind,
               ms=round(seconds * 1e3, 3), share=round(seconds / total, 4), thunks=count)
    for seconds, name, kind, source in top[:args.top]:
        print(f"{seconds * 1e3:9.3f} ms  {kind:15s} {name:32s} {source[-90:]}")


if __name__ == "__main__":
    main()
