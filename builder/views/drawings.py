"""The graph as Mermaid and Graphviz text: boxes for nodes (or folded groups), clusters, port-labelled edges."""

from __future__ import annotations

import re
from dataclasses import dataclass

from blockgraph.blocks.types import format_shape
from blockgraph.builder.graph import Graph
from blockgraph.builder.shapes import TypedGraph
from blockgraph.builder.views.numbers import count
from blockgraph.builder.views.units import fold

FONT = '"Helvetica"'  # one family for every label of the Graphviz drawing (clusters default to Times otherwise)


@dataclass
class _Drawing:
    """The (optionally collapsed) graph as labelled boxes, clusters and port-labelled edges."""

    inputs: list[tuple[str, str]]  # (input name, label)
    boxes: dict[str, str]  # unit key → label
    clusters: dict[str, str]  # group key → title, for groups still open at this depth
    edges: list[tuple[str, str, str]]  # (from, to, label); from/to are "in:NAME", unit keys or "out:NAME"
    outputs: list[str]


def _first_copy(node_id: str, graph: Graph) -> str:
    """The node's counterpart in the first copy of every repeat holding it (`decoder.3.attn` → `decoder.0.attn`)."""
    parts = node_id.split(".")
    for level in range(1, len(parts)):
        group = graph.groups.get(".".join(parts[:level]))
        if group is not None and group.kind == "repeat":
            parts[level] = "0"
    return ".".join(parts)


def _between_copies(a: str, b: str, graph: Graph) -> bool:
    """Whether nodes `a` and `b` lie in different copies of one repeat (the chaining of copy k into k+1)."""
    pa, pb = a.split("."), b.split(".")
    for level in range(1, min(len(pa), len(pb))):
        if pa[:level] != pb[:level]:
            return False
        group = graph.groups.get(".".join(pa[:level]))
        if group is not None and group.kind == "repeat" and pa[level] != pb[level]:
            return True
    return False


def _drawing(typed: TypedGraph, depth: int | None, params: dict[str, int] | None) -> _Drawing:
    """Without `depth`, each repeat is drawn once (its first copy, titled ×N); with it, every copy, folded below."""
    graph = typed.graph
    once = depth is None
    units = fold(graph, depth)
    owner = {inst.id: key for key, unit in units.items() for inst in unit.members}
    if once:
        owner = {node: _first_copy(node, graph) for node in owner}
        units = {key: unit for key, unit in units.items() if _first_copy(key, graph) == key}
    inputs = []
    for name, spec in graph.inputs.items():
        label = f"{name}\n{format_shape(spec.shape)} {spec.dtype}" + ("\n(optional)" if spec.optional else "")
        inputs.append((name, label))
    boxes = {}
    for key, unit in units.items():
        outs = ", ".join(format_shape(typed.types[ep].shape) for ep in unit.outputs)
        copies = graph.groups.get(key.rpartition(".")[0]) if once else None
        times = copies.count if copies is not None and copies.kind == "repeat" else 0
        lines = [key, unit.label + (f" ×{times}" if times else ""), outs]
        if params is not None:
            total = sum(params[inst.id] for inst in unit.members)
            if total:
                lines.append(f"{count(total)} params" + (" each" if times else ""))
        boxes[key] = "\n".join(line for line in lines if line)
    clusters = {}
    for key in units:
        parts = key.split(".")
        for level in range(1, len(parts)):
            prefix = ".".join(parts[:level])
            group = graph.groups.get(prefix)
            parent = graph.groups.get(".".join(parts[: level - 1]))
            if group is None or prefix in clusters:
                continue
            if once and ((parent is not None and parent.kind == "repeat") or key == f"{prefix}.0"):
                continue  # drawn once, a copy is its repeat's cluster, and a one-block copy a box of its own (×N)
            title = f"{prefix}: {group.type}"
            if group.kind == "repeat":
                title += f" ×{group.count}" + (" (one copy drawn)" if once and group.count > 1 else "")
            clusters[prefix] = title
    merged: dict[tuple[str, str], list[str]] = {}
    for inst in graph.nodes.values():
        target = owner[inst.id]
        for port, ep in inst.bindings.items():
            if ep is None:
                continue
            source = f"in:{ep.node}" if not ep.port else owner[ep.node]
            if source == target or (once and ep.port and _between_copies(ep.node, inst.id, graph)):
                continue
            label = port
            if ep.port and len(graph.nodes[ep.node].out_ports) > 1:
                label = f"{ep.port}→{port}"
            labels = merged.setdefault((source, target), [])
            if label not in labels:
                labels.append(label)
    for name, ep in graph.outputs.items():
        label = ep.port if len(graph.nodes[ep.node].out_ports) > 1 else ""
        merged.setdefault((owner[ep.node], f"out:{name}"), []).append(label)
    edges = [(s, t, ", ".join(x for x in labels if x)) for (s, t), labels in merged.items()]
    return _Drawing(inputs, boxes, clusters, edges, list(graph.outputs))


def _parent_cluster(key: str, clusters: dict[str, str]) -> str | None:
    parts = key.split(".")
    for level in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:level])
        if prefix in clusters:
            return prefix
    return None


def _nest(drawing: _Drawing) -> dict[str | None, list[tuple[str, str]]]:
    """Cluster (None = top level) → its items in graph order, each ("cluster" | "box", key)."""
    children: dict[str | None, list[tuple[str, str]]] = {}
    placed: set[str] = set()
    for key in drawing.boxes:
        chain = []
        cluster = _parent_cluster(key, drawing.clusters)
        while cluster is not None:
            chain.append(cluster)
            cluster = _parent_cluster(cluster, drawing.clusters)
        parent = None
        for cluster in reversed(chain):
            if cluster not in placed:
                placed.add(cluster)
                children.setdefault(parent, []).append(("cluster", cluster))
            parent = cluster
        children.setdefault(parent, []).append(("box", key))
    return children


class _Ids:
    """Safe, unique identifiers ([A-Za-z][A-Za-z0-9_]*) for Mermaid."""

    def __init__(self) -> None:
        self.ids: dict[str, str] = {}
        self.taken: set[str] = set()

    def __call__(self, prefix: str, key: str) -> str:
        name = f"{prefix}:{key}"
        if name not in self.ids:
            base = prefix + "_" + re.sub(r"[^A-Za-z0-9_]", "_", key)
            ident, n = base, 1
            while ident in self.taken:
                n += 1
                ident = f"{base}_{n}"
            self.taken.add(ident)
            self.ids[name] = ident
        return self.ids[name]


def _mermaid_text(text: str) -> str:
    """A label inside double quotes: entity codes for quotes and markup, <br/> for new lines."""
    escaped = (
        text.replace("&", "#amp;")
        .replace('"', "#quot;")
        .replace("<", "#lt;")
        .replace(">", "#gt;")
        .replace("|", "#124;")
    )
    return escaped.replace("\n", "<br/>")


def architecture_mermaid(typed: TypedGraph, params: dict[str, int] | None = None, depth: int | None = None) -> str:
    """A Mermaid `flowchart TD` of the graph (folded below `depth`): boxes labelled with node, block and output
    shape, inputs as parallelograms, outputs as stadiums, open groups as subgraphs, edges labelled by port."""
    drawing = _drawing(typed, depth, params)
    ids = _Ids()

    def ref(end: str) -> str:
        if end.startswith("in:"):
            return ids("i", end[3:])
        if end.startswith("out:"):
            return ids("r", end[4:])
        return ids("n", end)

    lines = ["flowchart TD", f"  %% {typed.graph.name.replace(chr(10), ' ')}: blockgraph inspect --format mermaid"]
    for name, label in drawing.inputs:
        lines.append(f'  {ids("i", name)}[/"{_mermaid_text(label)}"/]')
    children = _nest(drawing)

    def emit(cluster: str | None, indent: str) -> None:
        for kind, key in children.get(cluster, []):
            if kind == "cluster":
                lines.append(f'{indent}subgraph {ids("s", key)} ["{_mermaid_text(drawing.clusters[key])}"]')
                emit(key, indent + "  ")
                lines.append(f"{indent}end")
            else:
                lines.append(f'{indent}{ids("n", key)}["{_mermaid_text(drawing.boxes[key])}"]')

    emit(None, "  ")
    for name in drawing.outputs:
        lines.append(f'  {ids("r", name)}(["{_mermaid_text(name)}"])')
    for source, target, label in drawing.edges:
        arrow = f' -->|"{_mermaid_text(label)}"| ' if label else " --> "
        lines.append(f"  {ref(source)}{arrow}{ref(target)}")
    return "\n".join(lines) + "\n"


def _dot_string(text: str) -> str:
    """A double-quoted Graphviz string; new lines become centred line breaks."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def architecture_dot(typed: TypedGraph, params: dict[str, int] | None = None, depth: int | None = None) -> str:
    """A Graphviz `digraph` of the graph (folded below `depth`): boxes labelled with node, block and output
    shape, open groups as clusters, edges labelled by port. Render with `dot -Tsvg`."""
    drawing = _drawing(typed, depth, params)

    ref = _dot_string  # node ids are dotted paths; inputs and outputs are "in:NAME", "out:NAME" (ids have no ":")

    lines = [
        f"digraph {_dot_string(typed.graph.name)} {{",
        "  rankdir=TB;",
        f"  graph [fontname={FONT}, fontsize=11];",  # cluster titles: the same family as boxes and edges
        f"  node [shape=box, style=rounded, fontname={FONT}, fontsize=11];",
        f"  edge [fontname={FONT}, fontsize=9];",
    ]
    for name, label in drawing.inputs:
        lines.append(f"  {ref('in:' + name)} [shape=parallelogram, label={_dot_string(label)}];")
    children = _nest(drawing)

    def emit(cluster: str | None, indent: str) -> None:
        for kind, key in children.get(cluster, []):
            if kind == "cluster":
                lines.append(f"{indent}subgraph {_dot_string('cluster_' + key)} {{")
                lines.append(f"{indent}  label={_dot_string(drawing.clusters[key])};")
                lines.append(f"{indent}  style=dashed;")
                emit(key, indent + "  ")
                lines.append(f"{indent}}}")
            else:
                lines.append(f"{indent}{ref(key)} [label={_dot_string(drawing.boxes[key])}];")

    emit(None, "  ")
    for name in drawing.outputs:
        lines.append(f"  {ref('out:' + name)} [shape=oval, label={_dot_string(name)}];")
    for source, target, label in drawing.edges:
        attrs = f" [label={_dot_string(label)}]" if label else ""
        lines.append(f"  {ref(source)} -> {ref(target)}{attrs};")
    lines.append("}")
    return "\n".join(lines) + "\n"
