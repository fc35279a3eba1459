"""inspect's JSON format (documented in docs/inspect.md) and the resolved spec of `validate --resolved`."""

from __future__ import annotations

from typing import Any

from blockgraph.builder.analysis import Costs
from blockgraph.builder.graph import Endpoint, Graph
from blockgraph.builder.shapes import TypedGraph
from blockgraph.builder.views.units import Unit, shape_lookup, unit_numbers


def _jsonable(value: Any) -> Any:
    """An int stays an int; a symbolic expression (no sizes given) becomes its text."""
    return value if value is None or isinstance(value, int) else str(value)


def architecture_json(typed: TypedGraph, params: dict[str, int], costs: Costs | None = None) -> dict:
    """A stable, documented structure for other tools (see docs/inspect.md). Every key is always present;
    what needs sizes (concrete shapes, FLOPs, bytes) is null without them."""
    graph: Graph = typed.graph
    shape_of = shape_lookup(typed, costs)
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
                "active_parameters": cost.active if cost else None,
                "module": inst.module_id,
                "group": _innermost_group(graph, inst.id),
                "flops": cost.flops if cost else None,
                "flops_by_op": dict(cost.flops_by_op) if cost and cost.flops is not None else None,
                "flops_analytic": _jsonable(cost.flops_analytic) if cost else None,
                "activation_bytes": cost.activation_bytes if cost else None,
                "saved_bytes": cost.saved_bytes if cost else None,
                "error": cost.error if cost else None,
                "flops_error": cost.flops_error if cost else None,
            }
        )
    groups = []
    for group in graph.groups.values():
        members = [n for n in graph.nodes.values() if n.id.startswith(group.id + ".")]
        unit = Unit(group.id, group.type, members)
        total, trainable, flops, activations = unit_numbers(unit, params, costs)
        analytic = [costs.nodes[n.id].counted_analytic for n in members] if costs else [None]
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
            "active_parameters": None,
            "flops": None,
            "flops_per_token": None,
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
        "active_parameters": costs.active_parameters,
        "flops": costs.flops,
        "flops_per_token": costs.flops_per_token,
        "flops_analytic": _jsonable(costs.flops_analytic),
        "activation_bytes": costs.activation_bytes,
        "saved_activation_bytes": costs.saved_activation_bytes,
        "buffer_bytes": costs.buffer_bytes,
        "weight_bytes": costs.weight_bytes(),
        "training_bytes": costs.training_bytes(),
    }
