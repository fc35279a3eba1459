"""Symbolic shape and dtype inference over the flat graph, before any weight exists."""

from __future__ import annotations

from dataclasses import dataclass

from blocks.registry import Port
from blocks.types import ShapeError, TensorType, as_dim, dtype_kind
from builder.graph import Endpoint, Graph, NodeInstance
from common.errors import Problem, ProblemList, SpecError


@dataclass
class TypedGraph:
    """The graph plus the inferred type of every spec input and node output."""

    graph: Graph
    types: dict[Endpoint, TensorType]

    def input_types(self, inst: NodeInstance) -> dict[str, TensorType | None]:
        return {port: None if ep is None else self.types[ep] for port, ep in inst.bindings.items()}

    def output_types(self, inst: NodeInstance) -> tuple[TensorType, ...]:
        return tuple(self.types[Endpoint(inst.id, p.name)] for p in inst.out_ports)


def infer_shapes(graph: Graph) -> TypedGraph:
    """Run every block's shape rule in execution order; report all failures, each with its node and line."""
    problems = ProblemList()
    types: dict[Endpoint, TensorType] = {
        Endpoint(name): TensorType(tuple(as_dim(d) for d in spec.shape), spec.torch_dtype, source=name)
        for name, spec in graph.inputs.items()
    }
    for inst in graph.nodes.values():
        inputs = _gather(inst, types, graph, problems)
        if inputs is None:
            continue
        try:
            result = inst.entry.cls.infer(inst.params, **inputs)
        except ShapeError as exc:
            at = exc.at or ("in",)  # a rule that names no param is about how the inputs fit: point at `in:`
            problems.add(Problem(exc.message, graph.locate((*inst.spec_path, *at)), hint=exc.hint, node=inst.id))
            continue
        except Exception as exc:  # a shape rule is user code when it comes from a plugin
            problems.add(block_bug(graph, inst, f"its shape rule crashed: {type(exc).__name__}: {exc}"))
            continue
        outs = result if isinstance(result, tuple) else (result,)
        ports = inst.out_ports
        if len(outs) != len(ports) or not all(isinstance(t, TensorType) for t in outs):
            message = f"its shape rule returned {len(outs)} value(s) for {len(ports)} output port(s)"
            problems.add(block_bug(graph, inst, message, hint="infer() returns one TensorType per out_port"))
            continue
        for port, out in zip(ports, outs, strict=True):
            label = inst.id if len(ports) == 1 else f"{inst.id}.{port.name}"
            types[Endpoint(inst.id, port.name)] = TensorType(out.shape, out.dtype, label)
    problems.raise_if_errors(SpecError)
    return TypedGraph(graph, types)


def block_bug(graph: Graph, inst: NodeInstance, message: str, hint: str | None = None) -> Problem:
    """A problem in a block's own code (often a plugin's), named with its source, located at the node using it."""
    return Problem(
        f"block {inst.entry.name!r} (from {inst.entry.source}): {message}",
        graph.locate(inst.spec_path),
        hint=hint or "this is a bug in the block, not in the spec",
        node=inst.id,
    )


def _gather(
    inst: NodeInstance, types: dict[Endpoint, TensorType], graph: Graph, problems: ProblemList
) -> dict[str, TensorType | None] | None:
    """The input types of one node, checked against its ports; None when an upstream node already failed."""
    inputs: dict[str, TensorType | None] = {}
    ok = True
    for port in inst.entry.cls.in_ports:
        endpoint = inst.bindings.get(port.name)
        if endpoint is None:
            inputs[port.name] = None
            continue
        tensor = types.get(endpoint)
        if tensor is None:
            return None
        message = _port_mismatch(port, tensor)
        if message:
            problems.add(Problem(message, graph.locate((*inst.spec_path, "in")), node=inst.id))
            ok = False
        inputs[port.name] = tensor
    return inputs if ok else None


def _port_mismatch(port: Port, tensor: TensorType) -> str | None:
    ranks = port.ranks
    if ranks is not None and tensor.rank not in ranks:
        wanted = " or ".join(str(r) for r in ranks)
        return f"input {port.name!r} expects a rank-{wanted} tensor, but {tensor.described()} has rank {tensor.rank}"
    if port.dtype != "any" and dtype_kind(tensor.dtype) != port.dtype:
        article = "an" if port.dtype == "int" else "a"
        return f"input {port.name!r} expects {article} {port.dtype} tensor, not {tensor.described()}"
    return None
