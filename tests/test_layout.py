"""The package's shape (../shared/STYLE.md): imports point one way, down the layers below, with
no cycle, function-level imports included; norm layers and networks import no Lightning.

Read from the source with ``ast``, so that an import inside a function counts as one at the top.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "normbench"

# Top to bottom: a module imports only modules of the layers below its own.
LAYERS = [
    ["normbench.__main__"],
    ["normbench.main"],
    ["normbench.sweep"],
    ["normbench.backends"],
    ["normbench.runner"],
    ["normbench.workers", "normbench.run_output"],
    ["normbench.grid"],
    ["normbench.bench"],
    ["normbench.bench_sections", "normbench.bench_steps"],
    ["normbench.bench_tools"],
    ["normbench.report"],  # the package's __init__, the names it shows
    ["normbench.report.command"],
    ["normbench.report.figures", "normbench.report.verdicts", "normbench.report.why"],
    ["normbench.report.study3"],
    ["normbench.report.claims"],
    ["normbench.report.tables"],
    [
        "normbench.report.records",
        "normbench.report.reference",
        "normbench.report.inference",
        "normbench.report.plotting",
    ],
    ["normbench.pack"],
    ["normbench.cli"],
    ["normbench.budget", "normbench.checkpoints", "normbench.run_defaults", "normbench.norm_args"],
    ["normbench.recorder"],
    ["normbench.hparams"],
    ["normbench.layout"],
    ["normbench.callbacks", "normbench.predictions"],
    ["normbench.diagnostics.train_eval"],
    ["normbench.diagnostics.figures"],
    ["normbench.diagnostics.timing", "normbench.diagnostics"],
    ["normbench.module"],
    ["normbench.steps", "normbench.seeding"],
    ["normbench.experiments", "normbench.baseline"],
    ["normbench.devices"],
    ["normbench.data"],
    ["normbench.loaders"],
    ["normbench.orders"],
    ["normbench.datasets"],
    ["normbench.specs"],
    ["normbench.nets", "normbench.packed_runs"],
    ["normbench.norms"],  # the norm library, its own modules below its __init__ (acyclic, checked apart)
    ["normbench.results"],
    ["normbench.options"],
    ["normbench.errors"],
    ["normbench"],  # the package's __init__: its version
]
# Plain torch, no Lightning (STYLE rule 2).
PLAIN = ("normbench.nets", "normbench.packed_runs", "normbench.norms", "normbench.loaders")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache  # read once per session: the parametrized tests below share it
def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """The normbench modules ``path`` imports anywhere in it, and every other package's top name."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # from normbench import bench: the submodule bench
            found.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known)
    return found


@cache
def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: {i for i in imports(p, known) if i in known and i != m} for m, p in mods.items()}


def layer_of(module: str) -> int:
    for depth, layer in enumerate(LAYERS):
        if module in layer or any(module.startswith(f"{name}.") for name in layer if name == "normbench.norms"):
            return depth
    raise AssertionError(f"{module} is in no layer of tests/test_layout.py: add it where it belongs")


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the import graph as a list of modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    assert find_cycle(graph()) is None, " -> ".join(find_cycle(graph()))


def test_the_cycle_finder_finds_a_function_level_cycle(tmp_path):
    # The check above can fail: an import inside a function closes a cycle the top level lacks.
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    import a\n")
    edges = {m: {i for i in imports(tmp_path / f"{m}.py", {"a", "b"}) if i in {"a", "b"}} for m in ("a", "b")}
    assert find_cycle(edges) == ["a", "b", "a"]


@pytest.mark.parametrize("module", sorted(modules()))
def test_each_module_imports_only_the_layers_below_it(module):
    edges = graph()
    below = layer_of(module)
    for target in sorted(edges[module]):
        if module.startswith("normbench.norms") and target.startswith("normbench.norms"):
            continue  # inside the norm library, acyclic by the test above
        assert layer_of(target) > below, f"{module} imports {target}, which is not below it (STYLE.md's layout)"


@pytest.mark.parametrize("module", [m for m in sorted(modules()) if m.startswith(PLAIN)])
def test_norms_networks_and_loaders_are_plain_torch(module):
    found = imports(modules()[module], set(modules()))
    assert not {i for i in found if i.split(".")[0] in ("lightning", "pytorch_lightning", "torchmetrics")}, module
