"""The import graph points one way (tests/../STYLE): model ← sharding (placement library) ←
training ← entry points. Read from the source with `ast`, function-level imports included, so
an import hidden inside a function to dodge a cycle counts like any other."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("dsv3_jax", "sharding")
# Command-line programs: they compose the layers below them and nothing imports them.
ENTRY_POINTS = {"train", "dsv3_jax.sample", "sharding.aot", "sharding.plan",
                "sharding.pipeline.simulate"}


def _modules() -> dict[str, str]:
    found = {"train": os.path.join(ROOT, "train.py")}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, name), ROOT)[:-3]
                    module = rel.replace(os.sep, ".").removesuffix(".__init__")
                    found[module] = os.path.join(folder, name)
    return found


MODULES = _modules()


def _imports(path: str) -> list[tuple[str, bool]]:
    """(project module imported, whether inside a function) for every import in a file."""
    tree = ast.parse(open(path).read())
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                names = [f"{child.module}.{a.name}" for a in child.names] + [child.module]
            for name in names:
                while name and name not in MODULES:
                    name = name.rpartition(".")[0]
                if name:
                    out.append((name, nested))
            visit(child, nested)

    visit(tree, False)
    return out


def _graph() -> dict[str, set[str]]:
    return {m: {t for t, _ in _imports(p) if t != m} - set(PACKAGES) for m, p in MODULES.items()}


def _layer(module: str) -> str:
    if module in ENTRY_POINTS:
        return "entry point"
    if module.startswith("dsv3_jax.training"):
        return "training"
    if module.startswith("sharding"):
        return "sharding"
    return "model"


def test_the_parser_sees_the_known_arrows():
    """The checks below would pass vacuously on a parser that found nothing."""
    graph = _graph()
    assert "dsv3_jax.training.placed_step" in graph["train"]
    assert "sharding.placement" in graph["dsv3_jax.training.placed_step"]
    assert "dsv3_jax.moe" in graph["sharding.expert_parallel"]
    assert {"dsv3_jax.config", "dsv3_jax.layers"} <= graph["dsv3_jax.moe"]


def test_arrows_point_down_only():
    allowed = {"model": {"model"}, "sharding": {"model", "sharding"},
               "training": {"model", "sharding", "training"},
               "entry point": {"model", "sharding", "training"}}
    wrong = [f"{m} ({_layer(m)}) imports {t} ({_layer(t)})"
             for m, targets in _graph().items() for t in targets
             if _layer(t) not in allowed[_layer(m)]]
    assert not wrong, wrong


def test_no_import_cycles():
    graph, state, cycles = _graph(), {}, []

    def walk(node, stack):
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                walk(target, stack + [target])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    assert not cycles, cycles


def test_no_function_level_imports_of_project_modules_outside_entry_points():
    """An import inside a function to reach a module is how a cycle hides."""
    hidden = [(m, t) for m, p in MODULES.items() if m not in ENTRY_POINTS
              for t, nested in _imports(p) if nested]
    assert not hidden, hidden
