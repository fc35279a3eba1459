"""Rich renderings for the terminal: the build summary, the architecture as a tree and a table, inspect's totals."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.console import Group as RichGroup
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from blockgraph.blocks.types import format_shape
from blockgraph.builder.analysis import Costs
from blockgraph.builder.model import GraphModel
from blockgraph.builder.shapes import TypedGraph
from blockgraph.builder.views.fitted import FittedTable, Flow
from blockgraph.builder.views.numbers import bytes_text, count, flops_text, plural
from blockgraph.builder.views.units import Unit, add, fold, shape_lookup, unit_numbers
from blockgraph.common.text import sizes_text


def build_summary(
    model: GraphModel,
    outputs: torch.Tensor | dict[str, torch.Tensor],
    *,
    device: str,
    dtype: torch.dtype,
    seconds: dict[str, float],
) -> RenderableType:
    """What `blockgraph build` prints: outputs and shapes, parameters, device, dtype and timings."""
    table = Table(title=f"[bold]{escape(model.spec_name)}[/] built", show_header=True, header_style="bold")
    table.add_column("output")
    table.add_column("shape")
    table.add_column("dtype")
    named: Iterable[tuple[str, torch.Tensor]] = outputs.items() if isinstance(outputs, dict) else [("output", outputs)]
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


def _shapes(shapes: Iterable[tuple]) -> str:
    return ", ".join(format_shape(s) for s in shapes)


def _concrete(symbolic: list[tuple], concrete: list[tuple] | None) -> Flow:
    """`[batch, seq, 64]`, and `= [2, 16, 64]` under it when sizes are known and differ; folded between shapes."""
    lines = [_pieces(symbolic)]
    if concrete is not None and concrete != symbolic:
        first, *rest = _pieces(concrete)
        lines.append([f"= {first}", *rest])
    return Flow(lines)


def _pieces(shapes: list[tuple]) -> list[str]:
    texts = [format_shape(s) for s in shapes]
    return [text + ("," if n + 1 < len(texts) else "") for n, text in enumerate(texts)]


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
            row.trainable, row.flops, row.activations = cost.trainable, cost.shown_flops, cost.activation_bytes
        parent.children[parts[-1]] = row
    views: dict[int, dict[str, Unit]] = {}
    for key, row in groups:  # a group's shapes: the tensors entering it and those it hands on
        level = key.count(".") + 1
        unit = (views.get(level) or views.setdefault(level, fold(graph, level)))[key]
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
            row.flops, row.activations = add(row.flops, child.flops), add(row.activations, child.activations)
    return row.params


def architecture_tree(
    typed: TypedGraph, params: dict[str, int], depth: int | None = None, costs: Costs | None = None
) -> RenderableType:
    """node → block → input shapes → output shapes → parameters (→ FLOPs, activations with `costs`), as a tree;
    `depth` collapses deeper levels into their group (`encoder  encoder_block ×6`), which sums its children."""
    return _FittedTree(_rows(typed, params, costs), depth, costs)


class _FittedTree:
    """A Rich tree whose labels break between their fields (name, block, shapes, numbers) and never inside one:
    at 80 columns Rich's own wrapping split `0 FLOPs` and `[batch, seq, 64]` over two lines."""

    INDENT = 4  # the width of one level of the tree's guides

    def __init__(self, root: _Row, depth: int | None, costs: Costs | None) -> None:
        self.root, self.depth, self.costs = root, depth, costs

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        root, costs, width = self.root, self.costs, options.max_width
        head = [(2, Text(root.name, "bold")), (2, Text(f"{count(root.params)} parameters"))]
        if costs is not None and costs.concrete:
            head.append((2, Text(f"{flops_text(root.flops)} FLOPs", "blue")))
        elif costs is not None and costs.flops_analytic is not None:  # no sizes: the formulas' expression
            head.append((2, Text(f"{_short(str(costs.flops_analytic), 60)} FLOPs", "blue")))
        tree = Tree(_fitted(head, width))

        def add(branch: Tree, row: _Row, level: int) -> None:
            for child in row.children.values():
                fields = [(2, Text(child.name, "bold cyan")), (2, Text(child.label, "magenta"))]
                if child.outputs:
                    shapes = [*_split_shapes(child.inputs), "→", *_split_shapes(child.outputs)]
                    fields += [(2 if n == 0 else 1, Text(shape, "green")) for n, shape in enumerate(shapes)]
                fields.append((2, Text(f"{child.params:,}" if child.params else "0", "yellow")))
                if costs is not None and costs.concrete:
                    fields.append((2, Text(f"{flops_text(child.flops)} FLOPs", "blue")))
                    fields.append((2, Text(bytes_text(child.activations), "dim")))
                sub = branch.add(_fitted(fields, width - self.INDENT * level))
                if child.children and (self.depth is None or level < self.depth):
                    add(sub, child, level + 1)

        add(tree, root, 1)
        yield tree


def _fitted(fields: list[tuple[int, Text]], width: int) -> Text:
    """Each field after its gap of spaces, or on a new line when it would pass `width`."""
    text, used = Text(), 0
    for gap, part in fields:
        if used and used + gap + part.cell_len > width:
            text.append("\n")
            used = 0
        elif used:
            text.append(" " * gap)
            used += gap
        text.append_text(part)
        used += part.cell_len
    return text


def _split_shapes(shapes: str) -> list[str]:
    """`[a, b], [c]` → `[a, b],` `[c]`: the places a line of shapes may break."""
    return [piece + "]," for piece in shapes.split("], ")[:-1]] + shapes.split("], ")[-1:]


def architecture_table(
    typed: TypedGraph, params: dict[str, int], depth: int | None = None, costs: Costs | None = None
) -> Table:
    """Every block instance as a row: node, block, input and output shapes, parameters; with `costs` also trainable
    parameters, forward FLOPs and activation memory. `depth` folds deeper nodes into one row per group."""
    units = fold(typed.graph, depth)
    types = typed.types
    concrete = costs is not None and costs.concrete
    numbers = ["params", "trainable", "FLOPs", "activations"] if costs is not None else ["params"]
    # on a narrow terminal the numbers move under the shapes, rather than any name or number breaking
    table = FittedTable(
        title=Text(typed.graph.name), header_style="bold", groups=[["block", "inputs", "outputs"], numbers]
    )
    for column in ("node", "block", "inputs", "outputs", *numbers):
        shapes = column in ("inputs", "outputs")
        table.add_column(
            column, justify="left" if shapes or column in ("node", "block") else "right", no_wrap=not shapes
        )
    shape_of = shape_lookup(typed, costs)
    sums: tuple[int, int, int | None, int | None] = (0, 0, 0, 0)
    for unit in units.values():
        ins = [types[ep].shape for ep in unit.inputs]
        outs = [types[ep].shape for ep in unit.outputs]
        total, trainable, flops, activations = unit_numbers(unit, params, costs)
        label = unit.label
        cells: list[str | Flow] = [
            unit.key,
            label,
            _concrete(ins, [shape_of(ep) for ep in unit.inputs] if concrete else None),
            _concrete(outs, [shape_of(ep) for ep in unit.outputs] if concrete else None),
            f"{total:,}",
        ]
        if costs is not None:
            cells += [f"{trainable:,}", flops_text(flops), bytes_text(activations)]
        table.add_row(*(c if isinstance(c, Flow) else Text(c) for c in cells))  # Text: no markup parsing
        sums = (sums[0] + total, sums[1] + trainable, add(sums[2], flops), add(sums[3], activations))
    table.add_section()
    footer = ["total", "", "", "", f"{sums[0]:,}"]
    if costs is not None:
        footer += [f"{sums[1]:,}", flops_text(sums[2]), bytes_text(sums[3])]
    table.add_row(*footer)
    return table


def inspect_totals(typed: TypedGraph, costs: Costs) -> RenderableType:
    """Parameters, forward FLOPs (torch and analytic), weight memory per dtype and the training-memory estimate."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    total = costs.parameters
    grid.add_row(
        "total",
        f"{total:,} parameters ({count(total)}), {costs.trainable:,} trainable, "
        f"{plural(len(typed.graph.nodes), 'block')}",
    )
    active = costs.active_parameters
    if active != total:  # a mixture of experts: a token goes through some of the weights only
        per_token = costs.flops_per_token
        work = f"; {flops_text(per_token)} forward FLOPs per token" if per_token is not None else ""
        grid.add_row("active", f"{active:,} parameters per token ({count(active)} of {count(total)}){work}")
    analytic = costs.flops_analytic
    if costs.dims is None:  # not concrete
        missing = ", ".join(costs.missing_dims)
        hint = " ".join(f"--dim {d}=N" for d in costs.missing_dims)
        grid.add_row("FLOPs", Text(f"need sizes for {missing}: {hint}, or dims: in the spec", style="yellow"))
        if analytic is not None:
            grid.add_row("", Text(f"analytic: {_short(str(analytic))}", style="dim"))
    else:
        flops = costs.flops
        at = Text(f" at {sizes_text(costs.dims)}", style="dim")
        if flops is not None:
            line = Text.assemble(f"{flops_text(flops)} forward", at)
            if analytic == flops:
                line.append("  (torch's count; the analytic formulas agree)", style="green")
            elif analytic is not None:
                line.append(f"  (torch's count; analytic {flops_text(analytic)})", style="yellow")
            else:
                unknown = sorted({n.block for n in costs.nodes.values() if n.counted_analytic is None})
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
            grid.add_row(
                "",
                Text(
                    f"2 FLOPs per multiply-add: {flops_text(total_flops // 2)} multiply-adds (MACs), the figure papers "
                    "often quote as FLOPs",
                    style="dim",
                ),
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
    broken = [n for n in costs.nodes.values() if n.flops_error is not None]
    if broken:
        first = broken[0]
        message = (
            f"the FLOPs formula of {len(broken)} node(s) failed, e.g. {first.id} ({first.block}): {first.flops_error}"
        )
        grid.add_row("", Text(message, style="yellow"))
    weights = " · ".join(f"{name} {bytes_text(size)}" for name, size in costs.weight_bytes().items())
    dtype = str(costs.dtype).removeprefix("torch.")
    buffers = f"buffers {bytes_text(costs.buffer_bytes)} more ({dtype})" if costs.buffer_bytes else "no buffers"
    grid.add_row("weights", f"parameters {weights}; {buffers}")
    if costs.concrete:
        grid.add_row(
            "activations",
            f"{bytes_text(costs.activation_bytes)} of node outputs ({dtype}), "
            f"{bytes_text(costs.saved_activation_bytes)} saved for backward",
        )
        training = costs.training_bytes()
        if training is not None:
            sizes = {"parameters": training["weights"] - costs.buffer_bytes}
            if costs.buffer_bytes:
                sizes["buffers"] = costs.buffer_bytes
            sizes |= {"gradients": training["gradients"], "Adam": training["optimizer"]}
            if training["master_weights"]:
                sizes["float32 master"] = training["master_weights"]
            sizes["activations"] = training["activations"]
            breakdown = " + ".join(f"{label} {bytes_text(size)}" for label, size in sizes.items())
            grid.add_row("training", f"≈ {bytes_text(training['total'])} = {breakdown}")
            grid.add_row("", Text(training_assumptions(costs), style="dim"))
    return grid


def training_assumptions(costs: Costs) -> str:
    dtype = str(costs.dtype).removeprefix("torch.")
    master = "" if costs.dtype == torch.float32 else ", a float32 master copy of the weights"
    sizes = sizes_text(costs.dims) if costs.dims else "the given sizes"
    failed = len(costs.unmeasured)
    unmeasured = f"; {failed} node(s) that could not run on meta count their outputs instead" if failed else ""
    return (
        f"assumes: Adam (two float32 moments per trainable parameter{master}), weights and gradients in {dtype}, "
        f"everything autograd saves for backward at {sizes} (no activation checkpointing; attention as its math "
        f"kernel stores it, flash kernels keep less{unmeasured}), no allocator overhead or temporary buffers"
    )


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
