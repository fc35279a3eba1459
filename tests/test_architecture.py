"""The layers of the code: common < blocks < builder < trainer < cli. No module imports one above its layer
(imports inside functions included), and no group of modules imports each other in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
from conftest import ROOT

LAYERS = ["common", "blocks", "builder", "trainer", "cli"]


def _modules() -> dict[str, Path]:
    found = {"cli": ROOT / "cli.py"}
    for package in LAYERS[:-1]:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The project modules `path` imports anywhere in it (top level, functions, `if TYPE_CHECKING:`)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            target = target.removeprefix("blockgraph.")
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> nx.DiGraph:
    modules = _modules()
    graph = nx.DiGraph()
    for name, path in modules.items():
        graph.add_node(name)
        for target in _imports(path, name, modules):
            graph.add_edge(name, target)
    return graph


def _layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


def test_no_module_imports_a_layer_above_its_own():
    upward = [(a, b) for a, b in _graph().edges if _layer(b) > _layer(a)]
    assert upward == [], f"imports that climb a layer: {upward}"


def test_no_import_cycles():
    graph = _graph()
    package_inits = {n for n in graph if (ROOT / n.replace(".", "/") / "__init__.py").exists()}
    # a package's __init__ re-exporting its modules is not a cycle of the code that uses them
    cycles = [c for c in nx.simple_cycles(graph.subgraph(set(graph) - package_inits))]
    assert cycles == [], f"import cycles: {cycles}"


def test_the_check_sees_the_imports_it_must():
    graph = _graph()
    assert graph.has_edge("cli", "trainer.commands") and graph.has_edge("builder.compile", "builder.graph")
    assert graph.has_edge("builder.persist", "builder.pipeline")  # an import at the top of the module
    assert graph.has_edge("trainer.commands", "trainer.rundir")  # an import inside a function


def test_node_names_never_shadow_what_the_built_model_adds():
    """builder.resolve names GraphModel's own attributes instead of importing it (that import would close a cycle
    through the typed graph); they must stay the same."""
    import torch

    from blockgraph.builder.model import GraphModel
    from blockgraph.builder.resolve import MODEL_ATTRIBUTES

    added = (set(dir(GraphModel)) | set(GraphModel.__annotations__)) - set(dir(torch.nn.Module))
    assert added == set(MODEL_ATTRIBUTES)
