"""The graph as nested boxes for the HTML, SVG and PNG views: a layered layout computed here, without a renderer.

Every repeat and sub-graph is an item that holds its members (a repeat its copies, a copy its blocks) and can be
drawn collapsed (one box, `encoder ×6`) or expanded (its members laid out inside it). Each container (the model,
or an expanded group) lays its direct members out in layers: a member sits one layer below the lowest member
whose tensor it reads, layers are rows, each row ordered by where its members' inputs come from. An edge joins
two members of the container where the tensor crosses from one to the other (a tensor leaving a copy for the
next copy is an edge between the two copies). The HTML view's script repeats `place` in JavaScript when a
group is clicked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from blockgraph.blocks.types import format_shape
from blockgraph.builder.analysis import Costs
from blockgraph.builder.graph import Endpoint, Graph, NodeInstance
from blockgraph.builder.shapes import TypedGraph
from blockgraph.builder.views.numbers import bytes_text, count, flops_text
from blockgraph.builder.views.units import Unit, shape_lookup, unit_numbers

CHAR_W = 7.2  # a 12px monospace character: labels are sized without measuring any font
LINE_H = 15.0
BOX_PAD = 8.0
HEADER = 3 * LINE_H + BOX_PAD  # an expanded group's title (name, type, parameters) above its members
H_GAP = 24.0
V_GAP = 40.0  # room for an edge's label between two rows
PAD = 12.0


@dataclass
class Item:
    """One box: a block, a repeat or sub-graph (`group`), a model input or output."""

    key: str  # the node or group id; inputs and outputs are `in:NAME`, `out:NAME`
    kind: str  # "node", "group", "input" or "output"
    type: str  # block name, sub-graph type, or "input" / "output"
    lines: list[str]  # the visible label, the first line in bold
    shapes: str  # output shapes, symbolic
    parent: str  # container key; "" is the model
    order: int  # position in graph order
    repeat: int = 0  # copies of a repeat
    details: dict[str, str] = field(default_factory=dict)
    layer: int = 0
    width: float = 0.0  # collapsed size
    height: float = 0.0
    members: list[str] = field(default_factory=list)  # a group's direct members, graph order


@dataclass
class Edge:
    source: str
    target: str
    label: str
    container: str


@dataclass
class Scene:
    """Items (graph order), the members of each container and the edges each container draws."""

    name: str
    items: dict[str, Item]
    roots: list[str]
    edges: dict[str, list[Edge]]

    def members(self, container: str) -> list[str]:
        return self.roots if container == "" else self.items[container].members


@dataclass
class Box:
    x: float
    y: float
    width: float
    height: float
    column: int = 0  # place in its row: labels of neighbours' edges are staggered by it


def _group_of(graph: Graph, node_id: str) -> str:
    """The innermost repeat or sub-graph holding a node or group ("" for the model)."""
    parts = node_id.split(".")
    for level in range(len(parts) - 1, 0, -1):
        key = ".".join(parts[:level])
        if key in graph.groups:
            return key
    return ""


def _size(lines: list[str]) -> tuple[float, float]:
    width = max(len(line) for line in lines) * CHAR_W + 2 * BOX_PAD
    return max(width, 60.0), len(lines) * LINE_H + BOX_PAD


def _short(key: str, parent: str) -> str:
    """The name inside its container: `self_attn` in `encoder.3`, but `encoder.3` for a copy of `encoder`."""
    rest = key[len(parent) + 1 :] if parent else key
    return key.rsplit(".", 2)[-2] + "." + rest if rest.isdigit() and "." in key else rest


def _numbers(total: int, flops: int | None, memory: int | None) -> dict[str, str]:
    return {"parameters": f"{total:,} ({count(total)})", "FLOPs": flops_text(flops), "activations": bytes_text(memory)}


def scene(typed: TypedGraph, params: dict[str, int], costs: Costs | None) -> Scene:
    """The model as items and edges; sizes are the collapsed ones, layers set per container."""
    graph = typed.graph
    concrete = shape_lookup(typed, costs)

    def shape_text(ep: Endpoint) -> str:
        text = format_shape(typed.types[ep].shape)
        sizes = concrete(ep)
        return text if sizes is None or list(sizes) == list(typed.types[ep].shape) else f"{text} = {list(sizes)}"

    items: dict[str, Item] = {}
    roots: list[str] = []

    def add_item(item: Item) -> None:
        items[item.key] = item
        (roots if item.parent == "" else items[item.parent].members).append(item.key)

    for name, spec in graph.inputs.items():
        text = format_shape(spec.shape)
        add_item(Item(f"in:{name}", "input", "input", [name, f"{text} {spec.dtype}"], text, "", len(items)))
    members_of: dict[str, list[NodeInstance]] = {}
    for inst in graph.nodes.values():
        chain = []
        parent = _group_of(graph, inst.id)
        while parent:
            chain.append(parent)
            parent = _group_of(graph, parent)
        for key in reversed(chain):
            members_of.setdefault(key, []).append(inst)
            if key not in items:
                group = graph.groups[key]
                parent = _group_of(graph, key)
                title = _short(key, parent) + (f" ×{group.count}" if group.kind == "repeat" else "")
                copies = group.count if group.kind == "repeat" else 0
                add_item(Item(key, "group", group.type, [title, group.type], "", parent, len(items), copies))
        parent = _group_of(graph, inst.id)
        shapes = ", ".join(format_shape(t.shape) for t in typed.output_types(inst))
        cost = costs.nodes[inst.id] if costs is not None else None
        lines = [_short(inst.id, parent), inst.entry.name]
        if params[inst.id]:
            lines.append(f"{count(params[inst.id])} params")
        node = Item(inst.id, "node", inst.entry.name, lines, shapes, parent, len(items))
        settings = ", ".join(f"{k}={v}" for k, v in inst.params.model_dump(mode="json").items())
        node.details = {
            "type": inst.entry.name,
            "params": settings or "–",
            "outputs": ", ".join(shape_text(Endpoint(inst.id, p.name)) for p in inst.out_ports),
            **_numbers(params[inst.id], cost.shown_flops if cost else None, cost.activation_bytes if cost else None),
        }
        add_item(node)
    for name in graph.outputs:
        add_item(Item(f"out:{name}", "output", "output", [name], "", "", len(items)))

    def ancestors(key: str) -> list[str]:
        """The model (""), then the groups holding `key` from the outermost, then `key` itself."""
        chain = [key]
        while items[chain[-1]].parent:
            chain.append(items[chain[-1]].parent)
        return ["", *reversed(chain)]

    for key, insts in members_of.items():  # a group's numbers, and the tensors leaving it as its shapes
        item = items[key]
        total, _, flops, memory = unit_numbers(Unit(key, item.type, insts), params, costs)
        inside = {inst.id for inst in insts}
        leaving: list[Endpoint] = []
        for inst in graph.nodes.values():
            if inst.id in inside:
                continue
            for ep in inst.bindings.values():
                if ep is not None and ep.node in inside and ep not in leaving:
                    leaving.append(ep)
        leaving += [ep for ep in graph.outputs.values() if ep.node in inside and ep not in leaving]
        item.shapes = ", ".join(format_shape(typed.types[ep].shape) for ep in leaving)
        if total:
            item.lines.append(f"{count(total)} params")
        item.details = {
            "type": item.type + (f" ×{item.repeat}" if item.repeat else ""),
            "params": f"{len(insts)} blocks",
            "outputs": ", ".join(shape_text(ep) for ep in leaving),
            **_numbers(total, flops, memory),
        }
    edges: dict[str, list[Edge]] = {}
    merged: dict[tuple[str, str], Edge] = {}

    def connect(source_key: str, target_key: str, label: str) -> None:
        a, b = ancestors(source_key), ancestors(target_key)
        common = 0
        while common < min(len(a), len(b)) and a[common] == b[common]:
            common += 1
        if common >= min(len(a), len(b)):  # one holds the other (a group's input): nothing to draw between them
            return
        container, source, target = a[common - 1], a[common], b[common]
        edge = merged.get((source, target))
        if edge is None:
            edge = merged[source, target] = Edge(source, target, label, container)
            edges.setdefault(container, []).append(edge)
        elif label not in edge.label.split("; "):
            edge.label += "; " + label

    for inst in graph.nodes.values():
        for ep in inst.bindings.values():
            if ep is not None:
                connect(ep.node if ep.port else f"in:{ep.node}", inst.id, shape_text(ep))
    for name, ep in graph.outputs.items():
        connect(ep.node if ep.port else f"in:{ep.node}", f"out:{name}", shape_text(ep))
    for item in items.values():
        item.width, item.height = _size(item.lines)
    result = Scene(graph.name, items, roots, edges)
    for container in ["", *(k for k, i in items.items() if i.kind == "group")]:
        _layers(result, container)
    return result


def _layers(scene: Scene, container: str) -> None:
    """Each member one layer below the lowest earlier member it reads from (a back edge, if any, is ignored); a
    member reading nothing there (a model input) just above its first reader; outputs on the last row. Then the
    members are ordered row by row, each row by the mean position of what it reads (fewer crossing edges)."""
    members = scene.members(container)
    items = scene.items
    reads: dict[str, list[str]] = {key: [] for key in members}
    readers: dict[str, list[str]] = {key: [] for key in members}
    for edge in scene.edges.get(container, []):
        if items[edge.source].order < items[edge.target].order:
            reads[edge.target].append(edge.source)
            readers[edge.source].append(edge.target)
    for key in members:  # graph order: sources come first
        items[key].layer = max((items[s].layer + 1 for s in reads[key]), default=0)
    last = max((items[k].layer for k in members if items[k].kind != "output"), default=0)
    for key in members:
        if items[key].kind == "output":
            items[key].layer = max(items[key].layer, last + 1)
        elif not reads[key] and readers[key]:
            items[key].layer = max(min(items[r].layer for r in readers[key]) - 1, 0)
    position: dict[str, float] = {}
    ordered: list[str] = []
    for layer in sorted({items[k].layer for k in members}):
        row = [k for k in members if items[k].layer == layer]
        guess = {k: sum(position[s] for s in reads[k]) / len(reads[k]) if reads[k] else n for n, k in enumerate(row)}
        row.sort(key=lambda k: guess[k])
        position.update((k, float(n)) for n, k in enumerate(row))
        ordered += row
    members[:] = ordered


@dataclass
class Layout:
    """Where the visible items go: each relative to its container's origin, and each container's size."""

    boxes: dict[str, Box] = field(default_factory=dict)
    inner: dict[str, Box] = field(default_factory=dict)  # container ("" the model) → the size of its members' area


def place(scene: Scene, expanded: set[str], layout: Layout | None = None, container: str = "") -> Layout:
    """Lay out `container` (and the expanded groups inside it): rows of layers, each row centred; an expanded
    group is as large as its members' area plus its title."""
    layout = Layout() if layout is None else layout
    rows: dict[int, list[tuple[str, float, float]]] = {}
    for key in scene.members(container):
        item = scene.items[key]
        width, height = item.width, item.height
        if key in expanded:  # members are in row order (see _layers)
            inner = place(scene, expanded, layout, key).inner[key]
            width, height = max(width, inner.width), HEADER + inner.height
        rows.setdefault(item.layer, []).append((key, width, height))
    row_widths = {layer: sum(w for _, w, _ in row) + H_GAP * (len(row) - 1) for layer, row in rows.items()}
    total_width = max(row_widths.values(), default=0.0) + 2 * PAD
    y = PAD
    for layer in sorted(rows):
        x = (total_width - row_widths[layer]) / 2
        for column, (key, width, height) in enumerate(rows[layer]):
            layout.boxes[key] = Box(x, y, width, height, column)
            x += width + H_GAP
        y += max(h for _, _, h in rows[layer]) + V_GAP
    layout.inner[container] = Box(0.0, 0.0, total_width, y - V_GAP + PAD if rows else 2 * PAD)
    return layout


def initially_expanded(scene: Scene, depth: int | None) -> set[str]:
    """The groups above `depth` (`--depth 2` opens the top-level ones); none without it."""
    if depth is None:
        return set()
    return {k for k, i in scene.items.items() if i.kind == "group" and len(k.split(".")) < depth}


def edge_path(source: Box, target: Box) -> tuple[str, float, float]:
    """A curve from the source's bottom centre to the target's top centre, and where its label goes: in the gap
    below the source (edges leaving one tensor for several rows share it rather than crowd at their targets),
    higher or lower by the source's column so that neighbours' labels do not overlap."""
    x1, y1 = source.x + source.width / 2, source.y + source.height
    x2, y2 = target.x + target.width / 2, target.y
    bend = max((y2 - y1) / 2, 20.0)
    path = f"M{x1:.1f},{y1:.1f} C{x1:.1f},{y1 + bend:.1f} {x2:.1f},{y2 - bend:.1f} {x2:.1f},{y2:.1f}"
    drop = min(V_GAP / 2 + (6.0 if source.column % 2 else -6.0), (y2 - y1) / 2)
    x = x1 + (x2 - x1) * drop / (y2 - y1) if y2 > y1 else (x1 + x2) / 2
    return path, x, y1 + drop
