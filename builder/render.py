"""Rich renderings of problems, built models and architectures. Pure functions: data in, renderables out."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from rich.console import Group as RichGroup
from rich.console import RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from blocks.types import format_shape
from builder.compile import GraphModel
from builder.errors import Problem
from builder.graph import Graph
from builder.shapes import TypedGraph


def problems(items: Iterable[Problem]) -> RenderableType:
    """Each problem as `file:line:col  path`, the message, and a hint, errors in red and warnings in yellow."""
    parts = []
    for p in items:
        colour = "red" if p.severity == "error" else "yellow"
        head = Text.assemble((f"{p.severity}: ", f"bold {colour}"), (p.message, "bold"))
        where = Text(f"  at {p.location}" if str(p.location) else " ", style="cyan")
        if p.node:
            where.append(f"  node {p.node}", style="magenta")
        parts += [head, where] if where.plain.strip() else [head]
        if p.hint:
            parts.append(Text(f"  hint: {p.hint}", style="green"))
    return RichGroup(*parts)


def count(n: int) -> str:
    """1234567 → 1.23M."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def build_summary(
    model: GraphModel, outputs: object, *, device: str, dtype: torch.dtype, seconds: dict[str, float]
) -> RenderableType:
    """What `blockgraph build` prints: outputs and shapes, parameters, device, dtype and timings."""
    table = Table(title=f"[bold]{escape(model.spec_name)}[/] built", show_header=True, header_style="bold")
    table.add_column("output")
    table.add_column("shape")
    table.add_column("dtype")
    named = outputs.items() if isinstance(outputs, dict) else [("output", outputs)]
    for name, tensor in named:
        table.add_row(name, str(list(tensor.shape)), str(tensor.dtype).removeprefix("torch."))
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    facts.add_row("parameters", f"{total:,} ({count(total)}), {trainable:,} trainable")
    facts.add_row("device", device)
    facts.add_row("dtype", str(dtype).removeprefix("torch."))
    facts.add_row("time", ", ".join(f"{stage} {sec * 1000:.1f} ms" for stage, sec in seconds.items()))
    return RichGroup(table, facts)


@dataclass
class _Row:
    """One line of the architecture: a block, or a group (repeat / sub-graph) summing its children."""

    name: str
    label: str
    inputs: str = ""
    outputs: str = ""
    params: int = 0
    children: dict[str, _Row] = field(default_factory=dict)


def node_params(model: GraphModel) -> dict[str, int]:
    """Parameters per node, each tensor counted once (tied weights belong to the first node that has them)."""
    seen: set[int] = set()
    counts = {}
    for node_id, inst in model.typed_graph.graph.nodes.items():
        total = 0
        for p in model.get_submodule(inst.module_id).parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        counts[node_id] = total
    return counts


def _rows(typed: TypedGraph, params: dict[str, int]) -> _Row:
    graph = typed.graph
    root = _Row(graph.name, "model")
    for inst in graph.nodes.values():
        parts = inst.id.split(".")
        parent = root
        for depth in range(1, len(parts)):
            key = ".".join(parts[:depth])
            group = graph.groups.get(key)
            label = (
                f"{group.type} ×{group.count}" if group and group.kind == "repeat" else (group.type if group else "")
            )
            parent = parent.children.setdefault(parts[depth - 1], _Row(parts[depth - 1], label))
        ins = ", ".join(f"{format_shape(t.shape)}" for t in typed.input_types(inst).values() if t is not None)
        outs = ", ".join(format_shape(t.shape) for t in typed.output_types(inst))
        parent.children[parts[-1]] = _Row(parts[-1], inst.entry.name, ins, outs, params[inst.id])
    _sum(root)
    return root


def _sum(row: _Row) -> int:
    if row.children:
        row.params = sum(_sum(child) for child in row.children.values())
    return row.params


def architecture_tree(typed: TypedGraph, params: dict[str, int], depth: int | None = None) -> Tree:
    """node → block → input shapes → output shapes → parameters, as a tree; `depth` collapses deeper levels."""
    root = _rows(typed, params)
    tree = Tree(Text.assemble((root.name, "bold"), f"  {count(root.params)} parameters"))

    def add(branch: Tree, row: _Row, level: int) -> None:
        for child in row.children.values():
            text = Text.assemble((child.name, "bold cyan"), "  ", (child.label, "magenta"))
            if child.outputs:
                text.append(f"  {child.inputs} → {child.outputs}", style="green")
            text.append(f"  {child.params:,}" if child.params else "  0", style="yellow")
            sub = branch.add(text)
            if child.children and (depth is None or level < depth):
                add(sub, child, level + 1)

    add(tree, root, 1)
    return tree


def architecture_table(typed: TypedGraph, params: dict[str, int]) -> Table:
    """Every block instance as a row: node, block, input and output shapes, parameters."""
    table = Table(title=typed.graph.name, header_style="bold")
    for column, justify in (
        ("node", "left"),
        ("block", "left"),
        ("inputs", "left"),
        ("outputs", "left"),
        ("params", "right"),
    ):
        table.add_column(column, justify=justify)
    for inst in typed.graph.nodes.values():
        ins = ", ".join(format_shape(t.shape) for t in typed.input_types(inst).values() if t is not None)
        outs = ", ".join(format_shape(t.shape) for t in typed.output_types(inst))
        table.add_row(inst.id, inst.entry.name, ins, outs, f"{params[inst.id]:,}")
    table.add_section()
    table.add_row("total", "", "", "", f"{sum(params.values()):,}")
    return table


def architecture_json(typed: TypedGraph, params: dict[str, int]) -> dict:
    """A stable, documented structure for other tools (see docs/inspect.md)."""
    graph: Graph = typed.graph
    return {
        "format": "blockgraph.inspect/1",
        "name": graph.name,
        "inputs": {
            n: {"shape": [str(d) for d in s.shape], "dtype": s.dtype, "optional": s.optional}
            for n, s in graph.inputs.items()
        },
        "nodes": [
            {
                "id": inst.id,
                "block": inst.entry.name,
                "source": inst.entry.source,
                "params": inst.params.model_dump(mode="json"),
                "inputs": {
                    port: {
                        "from": str(ep),
                        "shape": [str(d) for d in typed.types[ep].shape],
                        "dtype": str(typed.types[ep].dtype).removeprefix("torch."),
                    }
                    for port, ep in inst.bindings.items()
                    if ep is not None
                },
                "outputs": {
                    port.name: {"shape": [str(d) for d in t.shape], "dtype": str(t.dtype).removeprefix("torch.")}
                    for port, t in zip(inst.out_ports, typed.output_types(inst), strict=True)
                },
                "parameters": params[inst.id],
            }
            for inst in graph.nodes.values()
        ],
        "outputs": {n: str(ep) for n, ep in graph.outputs.items()},
        "total_parameters": sum(params.values()),
    }


def resolved_spec(graph: Graph) -> dict:
    """The spec as the builder sees it: variables substituted, extends merged, sub-graphs and repeats expanded.

    A flat, readable view (node ids are module paths such as `encoder.0.attn`), not a spec to load back.
    """
    nodes = {}
    for inst in graph.nodes.values():
        node: dict = {"type": inst.entry.name, "params": inst.params.model_dump(mode="json")}
        node["in"] = {port: str(ep) for port, ep in inst.bindings.items() if ep is not None}
        if inst.module_id != inst.id:
            node["share"] = inst.module_id
        nodes[inst.id] = node
    spec = graph.valid.spec if graph.valid else None
    return {
        "name": graph.name,
        "inputs": {n: s.model_dump(exclude_defaults=True) for n, s in graph.inputs.items()},
        "nodes": nodes,
        "outputs": str(graph.outputs["output"])
        if graph.single_output
        else {n: str(e) for n, e in graph.outputs.items()},
        **({"tie": dict(spec.tie)} if spec and spec.tie else {}),
    }
