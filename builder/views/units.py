"""What a view shows as one item: a node, or a repeat / sub-graph folded below a depth, with its numbers summed.

The table, the JSON groups and the drawings all fold the graph the same way, from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from blockgraph.builder.analysis import Costs
from blockgraph.builder.graph import Endpoint, Graph, NodeInstance
from blockgraph.builder.model import GraphModel
from blockgraph.builder.shapes import TypedGraph


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


def add(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else a + b


@dataclass
class Unit:
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


def fold(graph: Graph, depth: int | None = None) -> dict[str, Unit]:
    """Nodes in graph order, those deeper than `depth` folded into the repeat / sub-graph that holds them."""
    units: dict[str, Unit] = {}
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
            unit = units[key] = Unit(key, label)
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


def unit_numbers(unit: Unit, params: dict[str, int], costs: Costs | None) -> tuple[int, int, int | None, int | None]:
    """(parameters, trainable, FLOPs, activation bytes) of a unit: the sums over its nodes."""
    total = sum(params[inst.id] for inst in unit.members)
    if costs is None:
        return total, total, None, None
    trainable = 0
    flops: int | None = 0
    activations: int | None = 0
    for inst in unit.members:
        cost = costs.nodes[inst.id]
        trainable += cost.trainable
        flops, activations = add(flops, cost.shown_flops), add(activations, cost.activation_bytes)
    return total, trainable, flops, activations


def shape_lookup(typed: TypedGraph, costs: Costs | None):
    """Endpoint → concrete shape (from the costs' per-node shapes), or None."""
    found: dict[Endpoint, tuple] = {}
    if costs is not None and costs.dims is not None:  # concrete
        dims = costs.dims
        for name, spec in typed.graph.inputs.items():  # every input's dimensions have sizes when costs do
            found[Endpoint(name)] = tuple(d if isinstance(d, int) else dims[d] for d in spec.shape)
        for inst in typed.graph.nodes.values():
            cost = costs.nodes[inst.id]
            for port, shape in zip(inst.out_ports, cost.output_shapes, strict=True):
                found[Endpoint(inst.id, port.name)] = shape
    return found.get
