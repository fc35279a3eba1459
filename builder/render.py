"""Rich renderings of problems, built models and architectures. Pure functions: data in, renderables out."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Group as RichGroup
from rich.console import RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from blocks.types import format_shape
from builder.analysis import Costs, analyse
from builder.graph import Endpoint, Graph, NodeInstance
from builder.model import GraphModel
from builder.shapes import TypedGraph


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
    trainable: int = 0
    flops: int | None = 0
    activations: int | None = 0


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


# --- numbers ----------------------------------------------------------------------------------------------------


def flops_text(n: int | None) -> str:
    """734804261732352 → 734.80T; None → –."""
    if n is None:
        return "–"
    for unit, size in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def bytes_text(n: int | None) -> str:
    """Binary units: 1536 → 1.50 KiB; None → –."""
    if n is None:
        return "–"
    for unit, size in (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _add(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else a + b


def _shapes(shapes: Iterable[tuple]) -> str:
    return ", ".join(format_shape(s) for s in shapes)


def _concrete(symbolic: list[tuple], concrete: list[tuple] | None) -> str:
    """`[batch, seq, 64]`, and `= [2, 16, 64]` under it when sizes are known and differ."""
    text = _shapes(symbolic)
    if concrete is not None and concrete != symbolic:
        text += "\n= " + _shapes(concrete)
    return text


# --- tree ---------------------------------------------------------------------------------------------------------


def _rows(typed: TypedGraph, params: dict[str, int], costs: Costs | None = None) -> _Row:
    graph = typed.graph
    root = _Row(graph.name, "model")
    groups: list[tuple[str, _Row]] = []
    for inst in graph.nodes.values():
        parts = inst.id.split(".")
        parent = root
        for depth in range(1, len(parts)):
            key = ".".join(parts[:depth])
            row = parent.children.get(parts[depth - 1])
            if row is None:
                group = graph.groups.get(key)
                label = (
                    f"{group.type} ×{group.count}"
                    if group and group.kind == "repeat"
                    else (group.type if group else "")
                )
                row = parent.children[parts[depth - 1]] = _Row(parts[depth - 1], label)
                groups.append((key, row))
            parent = row
        ins = ", ".join(f"{format_shape(t.shape)}" for t in typed.input_types(inst).values() if t is not None)
        outs = ", ".join(format_shape(t.shape) for t in typed.output_types(inst))
        row = _Row(parts[-1], inst.entry.name, ins, outs, params[inst.id])
        if costs is not None:
            cost = costs.nodes[inst.id]
            row.trainable, row.flops, row.activations = cost.trainable, cost.flops, cost.activation_bytes
        parent.children[parts[-1]] = row
    views: dict[int, dict[str, _Unit]] = {}
    for key, row in groups:  # a group's shapes: the tensors entering it and those it hands on
        level = key.count(".") + 1
        unit = (views.get(level) or views.setdefault(level, _units(graph, level)))[key]
        row.inputs = ", ".join(format_shape(typed.types[ep].shape) for ep in unit.inputs)
        row.outputs = ", ".join(format_shape(typed.types[ep].shape) for ep in unit.outputs)
    _sum(root)
    return root


def _sum(row: _Row) -> int:
    if row.children:
        row.params = sum(_sum(child) for child in row.children.values())
        row.trainable = sum(child.trainable for child in row.children.values())
        row.flops = row.activations = 0
        for child in row.children.values():
            row.flops, row.activations = _add(row.flops, child.flops), _add(row.activations, child.activations)
    return row.params


def architecture_tree(
    typed: TypedGraph, params: dict[str, int], depth: int | None = None, costs: Costs | None = None
) -> Tree:
    """node → block → input shapes → output shapes → parameters (→ FLOPs, activations with `costs`), as a tree;
    `depth` collapses deeper levels into their group (`encoder  encoder_block ×6`), which sums its children."""
    root = _rows(typed, params, costs)
    head = Text.assemble((root.name, "bold"), f"  {count(root.params)} parameters")
    if costs is not None and costs.concrete:
        head.append(f"  {flops_text(root.flops)} FLOPs", style="blue")
    tree = Tree(head)

    def add(branch: Tree, row: _Row, level: int) -> None:
        for child in row.children.values():
            text = Text.assemble((child.name, "bold cyan"), "  ", (child.label, "magenta"))
            if child.outputs:
                text.append(f"  {child.inputs} → {child.outputs}", style="green")
            text.append(f"  {child.params:,}" if child.params else "  0", style="yellow")
            if costs is not None and costs.concrete:
                text.append(f"  {flops_text(child.flops)} FLOPs", style="blue")
                text.append(f"  {bytes_text(child.activations)}", style="dim")
            sub = branch.add(text)
            if child.children and (depth is None or level < depth):
                add(sub, child, level + 1)

    add(tree, root, 1)
    return tree


# --- collapsed views: one unit per node, or per group below `depth` ---------------------------------------------


@dataclass
class _Unit:
    """What the table and the graph drawings show as one item: a node, or a collapsed repeat / sub-graph."""

    key: str
    label: str
    members: list[NodeInstance] = field(default_factory=list)
    inputs: list[Endpoint] = field(default_factory=list)  # tensors from outside feeding it
    outputs: list[Endpoint] = field(default_factory=list)  # its tensors read outside it (or model outputs)

    @property
    def group(self) -> bool:
        return len(self.members) != 1 or self.members[0].id != self.key


def _unit_key(node_id: str, depth: int | None) -> str:
    if depth is None:
        return node_id
    parts = node_id.split(".")
    return node_id if len(parts) <= depth else ".".join(parts[:depth])


def _units(graph: Graph, depth: int | None = None) -> dict[str, _Unit]:
    """Nodes in graph order, those deeper than `depth` folded into the repeat / sub-graph that holds them."""
    units: dict[str, _Unit] = {}
    owner: dict[str, str] = {}
    for inst in graph.nodes.values():
        key = _unit_key(inst.id, depth)
        unit = units.get(key)
        if unit is None:
            group = graph.groups.get(key)
            if group is None:
                label = inst.entry.name
            else:
                label = f"{group.type} ×{group.count}" if group.kind == "repeat" else group.type
            unit = units[key] = _Unit(key, label)
        unit.members.append(inst)
        owner[inst.id] = key
    used_outside: set[Endpoint] = set(graph.outputs.values())
    for key, unit in units.items():
        seen: set[Endpoint] = set()
        for inst in unit.members:
            for ep in inst.bindings.values():
                if ep is None or owner.get(ep.node) == key:
                    continue
                used_outside.add(ep)
                if ep not in seen or not unit.group:  # a block lists every port; a group each tensor once
                    seen.add(ep)
                    unit.inputs.append(ep)
    for unit in units.values():
        for inst in unit.members:
            eps = [Endpoint(inst.id, p.name) for p in inst.out_ports]
            unit.outputs += eps if not unit.group else [ep for ep in eps if ep in used_outside]
    return units


def _unit_numbers(unit: _Unit, params: dict[str, int], costs: Costs | None) -> tuple[int, int, int | None, int | None]:
    """(parameters, trainable, FLOPs, activation bytes) of a unit: the sums over its nodes."""
    total = sum(params[inst.id] for inst in unit.members)
    if costs is None:
        return total, total, None, None
    trainable, flops, activations = 0, 0, 0
    for inst in unit.members:
        cost = costs.nodes[inst.id]
        trainable += cost.trainable
        flops, activations = _add(flops, cost.flops), _add(activations, cost.activation_bytes)
    return total, trainable, flops, activations


def architecture_table(
    typed: TypedGraph, params: dict[str, int], depth: int | None = None, costs: Costs | None = None
) -> Table:
    """Every block instance as a row: node, block, input and output shapes, parameters; with `costs` also trainable
    parameters, forward FLOPs and activation memory. `depth` folds deeper nodes into one row per group."""
    units = _units(typed.graph, depth)
    types = typed.types
    concrete = costs is not None and costs.concrete
    table = Table(title=Text(typed.graph.name), header_style="bold")
    columns = [("node", "left"), ("block", "left"), ("inputs", "left"), ("outputs", "left"), ("params", "right")]
    if costs is not None:
        columns += [("trainable", "right"), ("FLOPs", "right"), ("activations", "right")]
    for column, justify in columns:  # on a narrow terminal: fold, never cut with an ellipsis
        table.add_column(column, justify=justify, overflow="fold")
    shape_of = _shape_lookup(typed, costs)
    sums = [0, 0, 0, 0]
    for unit in units.values():
        ins = [types[ep].shape for ep in unit.inputs]
        outs = [types[ep].shape for ep in unit.outputs]
        total, trainable, flops, activations = _unit_numbers(unit, params, costs)
        label = unit.label
        cells = [
            unit.key,
            label,
            _concrete(ins, [shape_of(ep) for ep in unit.inputs] if concrete else None),
            _concrete(outs, [shape_of(ep) for ep in unit.outputs] if concrete else None),
            f"{total:,}",
        ]
        if costs is not None:
            cells += [f"{trainable:,}", flops_text(flops), bytes_text(activations)]
        table.add_row(*(Text(c) for c in cells))  # Text: no markup or emoji parsing, 580 rows print fast
        sums = [sums[0] + total, sums[1] + trainable, _add(sums[2], flops), _add(sums[3], activations)]
    table.add_section()
    footer = ["total", "", "", "", f"{sums[0]:,}"]
    if costs is not None:
        footer += [f"{sums[1]:,}", flops_text(sums[2]), bytes_text(sums[3])]
    table.add_row(*footer)
    return table


def _shape_lookup(typed: TypedGraph, costs: Costs | None):
    """Endpoint → concrete shape (from the costs' per-node shapes), or None."""
    found: dict[Endpoint, tuple] = {}
    if costs is not None and costs.concrete:
        for name, spec in typed.graph.inputs.items():  # every input's dimensions have sizes when costs do
            found[Endpoint(name)] = tuple(d if isinstance(d, int) else costs.dims[d] for d in spec.shape)
        for inst in typed.graph.nodes.values():
            cost = costs.nodes[inst.id]
            for port, shape in zip(inst.out_ports, cost.output_shapes, strict=True):
                found[Endpoint(inst.id, port.name)] = shape
    return found.get


# --- JSON ---------------------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """An int stays an int; a symbolic expression (no sizes given) becomes its text."""
    return value if value is None or isinstance(value, int) else str(value)


def architecture_json(typed: TypedGraph, params: dict[str, int], costs: Costs | None = None) -> dict:
    """A stable, documented structure for other tools (see docs/inspect.md). Every key is always present;
    what needs sizes (concrete shapes, FLOPs, bytes) is null without them."""
    graph: Graph = typed.graph
    shape_of = _shape_lookup(typed, costs)
    nodes = []
    for inst in graph.nodes.values():
        cost = costs.nodes[inst.id] if costs is not None else None
        nodes.append(
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
                        "concrete_shape": _list(shape_of(ep)),
                    }
                    for port, ep in inst.bindings.items()
                    if ep is not None
                },
                "outputs": {
                    port.name: {
                        "shape": [str(d) for d in t.shape],
                        "dtype": str(t.dtype).removeprefix("torch."),
                        "concrete_shape": _list(shape_of(Endpoint(inst.id, port.name))),
                    }
                    for port, t in zip(inst.out_ports, typed.output_types(inst), strict=True)
                },
                "parameters": params[inst.id],
                "trainable_parameters": cost.trainable if cost else None,
                "module": inst.module_id,
                "group": _innermost_group(graph, inst.id),
                "flops": cost.flops if cost else None,
                "flops_by_op": dict(cost.flops_by_op) if cost and cost.flops is not None else None,
                "flops_analytic": _jsonable(cost.flops_analytic) if cost else None,
                "activation_bytes": cost.activation_bytes if cost else None,
                "saved_bytes": cost.saved_bytes if cost else None,
                "error": cost.error if cost else None,
            }
        )
    groups = []
    for group in graph.groups.values():
        members = [n for n in graph.nodes.values() if n.id.startswith(group.id + ".")]
        unit = _Unit(group.id, group.type, members)
        total, trainable, flops, activations = _unit_numbers(unit, params, costs)
        analytic = [costs.nodes[n.id].flops_analytic for n in members] if costs else [None]
        groups.append(
            {
                "id": group.id,
                "kind": group.kind,
                "type": group.type,
                "count": group.count,
                "nodes": len(members),
                "parameters": total,
                "trainable_parameters": trainable if costs else None,
                "flops": flops,
                "flops_analytic": None if any(a is None for a in analytic) else _jsonable(_sum_values(analytic)),
                "activation_bytes": activations,
            }
        )
    return {
        "format": "blockgraph.inspect/1",
        "name": graph.name,
        "inputs": {
            n: {
                "shape": [str(d) for d in s.shape],
                "dtype": s.dtype,
                "optional": s.optional,
                "concrete_shape": _list(shape_of(Endpoint(n))),
            }
            for n, s in graph.inputs.items()
        },
        "dims": dict(costs.dims) if costs and costs.dims is not None else None,
        "missing_dims": list(costs.missing_dims) if costs else [],
        "dtype": str(costs.dtype).removeprefix("torch.") if costs else None,
        "nodes": nodes,
        "groups": groups,
        "outputs": {n: str(ep) for n, ep in graph.outputs.items()},
        "total_parameters": sum(params.values()),
        "totals": _totals_json(costs, params),
    }


def _list(shape: tuple | None) -> list[int] | None:
    return None if shape is None else list(shape)


def _sum_values(values: list) -> Any:
    total = values[0]
    for v in values[1:]:
        total = total + v
    return total


def _innermost_group(graph: Graph, node_id: str) -> str | None:
    parts = node_id.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        key = ".".join(parts[:depth])
        if key in graph.groups:
            return key
    return None


def _totals_json(costs: Costs | None, params: dict[str, int]) -> dict:
    if costs is None:
        return {
            "parameters": sum(params.values()),
            "trainable_parameters": None,
            "flops": None,
            "flops_analytic": None,
            "activation_bytes": None,
            "saved_activation_bytes": None,
            "buffer_bytes": None,
            "weight_bytes": None,
            "training_bytes": None,
        }
    return {
        "parameters": costs.parameters,
        "trainable_parameters": costs.trainable,
        "flops": costs.flops,
        "flops_analytic": _jsonable(costs.flops_analytic),
        "activation_bytes": costs.activation_bytes,
        "saved_activation_bytes": costs.saved_activation_bytes,
        "buffer_bytes": costs.buffer_bytes,
        "weight_bytes": costs.weight_bytes(),
        "training_bytes": costs.training_bytes(),
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
    return {
        "name": graph.name,
        "inputs": {n: s.model_dump(exclude_defaults=True) for n, s in graph.inputs.items()},
        "nodes": nodes,
        "outputs": str(graph.outputs["output"])
        if graph.single_output
        else {n: str(e) for n, e in graph.outputs.items()},
        **({"tie": dict(graph.ties)} if graph.ties else {}),
    }


# --- totals -------------------------------------------------------------------------------------------------------


def _sizes_text(dims: dict[str, int]) -> str:
    return ", ".join(f"{name}={size}" for name, size in dims.items())


def inspect_totals(typed: TypedGraph, costs: Costs) -> RenderableType:
    """Parameters, forward FLOPs (torch and analytic), weight memory per dtype and the training-memory estimate."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    total = costs.parameters
    grid.add_row(
        "total",
        f"{total:,} parameters ({count(total)}), {costs.trainable:,} trainable, {len(typed.graph.nodes)} blocks",
    )
    analytic = costs.flops_analytic
    if not costs.concrete:
        missing = ", ".join(costs.missing_dims)
        hint = " ".join(f"--dim {d}=N" for d in costs.missing_dims)
        grid.add_row("FLOPs", Text(f"need sizes for {missing}: {hint}, or dims: in the spec", style="yellow"))
        if analytic is not None:
            grid.add_row("", Text(f"analytic: {_short(str(analytic))}", style="dim"))
    else:
        flops = costs.flops
        at = Text(f" at {_sizes_text(costs.dims)}", style="dim")
        if flops is not None:
            line = Text.assemble(f"{flops_text(flops)} forward", at)
            if analytic == flops:
                line.append("  (torch's count; the analytic formulas agree)", style="green")
            elif analytic is not None:
                line.append(f"  (torch's count; analytic {flops_text(analytic)})", style="yellow")
            else:
                unknown = sorted({n.block for n in costs.nodes.values() if n.flops_analytic is None})
                line.append(f"  (torch's count; no formula for {', '.join(unknown)})", style="dim")
        elif analytic is not None:
            line = Text.assemble(
                f"{flops_text(analytic)} forward", at, ("  (analytic; torch's count is incomplete)", "yellow")
            )
        else:
            line = Text.assemble("– forward", at, ("  (neither torch nor a formula covers every node)", "yellow"))
        grid.add_row("FLOPs", line)
        total_flops = flops if flops is not None else analytic
        if total_flops is not None:
            grid.add_row(
                "", Text(f"≈ {flops_text(3 * total_flops)} per training step (backward ≈ 2 × forward)", style="dim")
            )
        failed = costs.unmeasured
        if failed:
            first = failed[0]
            grid.add_row(
                "",
                Text(
                    f"torch could not run {len(failed)} node(s) on meta, e.g. {first.id}: {first.error}", style="yellow"
                ),
            )
    weights = " · ".join(f"{name} {bytes_text(size)}" for name, size in costs.weight_bytes().items())
    grid.add_row("weights", weights)
    if costs.concrete:
        dtype = str(costs.dtype).removeprefix("torch.")
        grid.add_row(
            "activations",
            f"{bytes_text(costs.activation_bytes)} of node outputs ({dtype}), "
            f"{bytes_text(costs.saved_activation_bytes)} saved for backward",
        )
        training = costs.training_bytes()
        if training is not None:
            parts = [("weights", "weights"), ("gradients", "gradients"), ("Adam", "optimizer")]
            if training["master_weights"]:
                parts.append(("float32 master", "master_weights"))
            parts.append(("activations", "activations"))
            breakdown = " + ".join(f"{label} {bytes_text(training[key])}" for label, key in parts)
            grid.add_row("training", f"≈ {bytes_text(training['total'])} = {breakdown}")
            grid.add_row("", Text(training_assumptions(costs), style="dim"))
    return grid


def training_assumptions(costs: Costs) -> str:
    dtype = str(costs.dtype).removeprefix("torch.")
    master = "" if costs.dtype == torch.float32 else ", a float32 master copy of the weights"
    sizes = _sizes_text(costs.dims) if costs.dims else "the given sizes"
    failed = len(costs.unmeasured)
    unmeasured = f"; {failed} node(s) that could not run on meta count their outputs instead" if failed else ""
    return (
        f"assumes: Adam (two float32 moments per trainable parameter{master}), weights and gradients in {dtype}, "
        f"everything autograd saves for backward at {sizes} (no activation checkpointing; attention as its math "
        f"kernel stores it, flash kernels keep less{unmeasured}), no allocator overhead or temporary buffers"
    )


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- graph drawings: Mermaid and Graphviz -------------------------------------------------------------------------


@dataclass
class _Drawing:
    """The (optionally collapsed) graph as labelled boxes, clusters and port-labelled edges."""

    inputs: list[tuple[str, str]]  # (input name, label)
    boxes: dict[str, str]  # unit key → label
    clusters: dict[str, str]  # group key → title, for groups still open at this depth
    edges: list[tuple[str, str, str]]  # (from, to, label); from/to are "in:NAME", unit keys or "out:NAME"
    outputs: list[str]


def _drawing(typed: TypedGraph, depth: int | None, params: dict[str, int] | None) -> _Drawing:
    graph = typed.graph
    units = _units(graph, depth)
    owner = {inst.id: key for key, unit in units.items() for inst in unit.members}
    inputs = []
    for name, spec in graph.inputs.items():
        label = f"{name}\n{format_shape(spec.shape)} {spec.dtype}" + ("\n(optional)" if spec.optional else "")
        inputs.append((name, label))
    boxes = {}
    for key, unit in units.items():
        outs = ", ".join(format_shape(typed.types[ep].shape) for ep in unit.outputs)
        lines = [key, unit.label, outs]
        if params is not None:
            total = sum(params[inst.id] for inst in unit.members)
            if total:
                lines.append(f"{count(total)} params")
        boxes[key] = "\n".join(line for line in lines if line)
    clusters = {}
    for key in units:
        parts = key.split(".")
        for level in range(1, len(parts)):
            prefix = ".".join(parts[:level])
            group = graph.groups.get(prefix)
            if group is not None and prefix not in clusters:
                clusters[prefix] = f"{prefix}: {group.type}" + (f" ×{group.count}" if group.kind == "repeat" else "")
    merged: dict[tuple[str, str], list[str]] = {}
    for inst in graph.nodes.values():
        target = owner[inst.id]
        for port, ep in inst.bindings.items():
            if ep is None:
                continue
            source = f"in:{ep.node}" if not ep.port else owner[ep.node]
            if source == target:
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
        '  node [shape=box, style=rounded, fontname="Helvetica", fontsize=11];',
        '  edge [fontname="Helvetica", fontsize=9];',
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


# --- the whole `inspect` ------------------------------------------------------------------------------------------

INSPECT_FORMATS = ("tree", "table", "json", "mermaid", "dot")


def inspect_report(
    typed: TypedGraph,
    model: GraphModel,
    *,
    depth: int | None = None,
    fmt: str = "tree",
    dims: dict[str, int] | None = None,
    dtype: torch.dtype | None = None,
) -> RenderableType | str:
    """Everything `blockgraph inspect` prints, for a (meta) model: a Rich renderable for tree and table, text
    (to print as is, without Rich markup or wrapping) for json, mermaid and dot.

    `dims` override the spec's `dims:`; `dtype` is the floating dtype memory is counted in (default float32).
    """
    fmt = getattr(fmt, "value", fmt)
    if fmt not in INSPECT_FORMATS:
        raise ValueError(f"format {fmt!r}: use one of {', '.join(INSPECT_FORMATS)}")
    params = node_params(model)
    if fmt in ("mermaid", "dot"):
        draw = architecture_mermaid if fmt == "mermaid" else architecture_dot
        return draw(typed, params, depth)
    costs = analyse(typed, model, dims, dtype=dtype)
    if fmt == "json":
        return json.dumps(architecture_json(typed, params, costs), indent=2, ensure_ascii=False)
    if fmt == "table":
        body: RenderableType = architecture_table(typed, params, depth, costs)
    else:
        body = architecture_tree(typed, params, depth, costs)
    return RichGroup(body, inspect_totals(typed, costs))
