"""Symbolic shape and dtype inference over the flat graph, before any weight exists."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import sympy

from blockgraph.blocks.registry import Port
from blockgraph.blocks.types import Dim, Limit, ShapeError, TensorType, as_dim, dtype_kind, format_shape, symbol
from blockgraph.builder.graph import Endpoint, Graph, NodeInstance
from blockgraph.common.errors import Location, Problem, ProblemList, SpecError
from blockgraph.common.text import sizes_text


@dataclass(frozen=True)
class Bound:
    """A block's limit on a dimension that depends on named sizes, checked once they are known."""

    limit: Limit
    node: str
    location: Location


@dataclass
class TypedGraph:
    """The graph plus the inferred type of every spec input and node output, and the bounds on named sizes."""

    graph: Graph
    types: dict[Endpoint, TensorType]
    bounds: list[Bound] = field(default_factory=list)

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
    bounds: list[Bound] = []
    for inst in graph.nodes.values():
        inputs = _gather(inst, types, graph, problems)
        if inputs is None:
            continue
        try:
            limits = tuple(inst.entry.cls.limits(inst.params, **inputs))
        except Exception as exc:  # like the shape rule, user code when it comes from a plugin
            problems.add(block_bug(graph, inst, f"its limits rule crashed: {type(exc).__name__}: {exc}"))
            continue
        if not all(isinstance(limit, Limit) for limit in limits):
            message = "its limits rule returned something other than Limit objects"
            problems.add(block_bug(graph, inst, message, hint="limits() returns a tuple of Limit"))
            continue
        for limit in limits:
            bound = Bound(limit, inst.id, graph.locate((*inst.spec_path, "params", limit.param)))
            if isinstance(limit.size, int):
                if limit.size > limit.most:
                    problems.add(_exceeded(bound, limit.size))
            elif bound not in bounds:
                bounds.append(bound)
        try:
            result = inst.entry.cls.infer(inst.params, **inputs)
        except ShapeError as exc:
            at = exc.at or ("in",)  # a rule that names no param is about how the inputs fit: point at `in:`
            hint = _repeat_changes_shape(graph, inst, types) or exc.hint
            problems.add(Problem(exc.message, graph.locate((*inst.spec_path, *at)), hint=hint, node=inst.id))
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
    return TypedGraph(graph, types, bounds)


def check_bounds(typed: TypedGraph, sizes: dict[str, int]) -> None:
    """Raise a located `SpecError` for every block limit these sizes of the named dimensions exceed, and for every
    node whose output they leave without a position (a convolution's kernel longer than its padded input)."""
    subs = {symbol(name): size for name, size in sizes.items()}
    problems = ProblemList()
    for bound in typed.bounds:
        value = sympy.sympify(bound.limit.size).subs(subs)  # an expression: a number was checked at once
        if value.is_number and int(value) > bound.limit.most:
            problems.add(_exceeded(bound, int(value), f" ({bound.limit.size} at {sizes_text(sizes)})"))
    for inst in typed.graph.nodes.values():
        empty = next(_empty_sizes(typed, inst, subs), None)
        if empty is not None:
            dim, value = empty
            problems.add(
                Problem(
                    f"its output's dimension {dim} would be {value} at {sizes_text(sizes)}: the input is too short",
                    typed.graph.locate(inst.spec_path),
                    hint="give longer inputs with --dim, or smaller kernels, strides or patches",
                    node=inst.id,
                )
            )
    problems.raise_if_errors(SpecError)


def _empty_sizes(typed: TypedGraph, inst: NodeInstance, subs: dict[sympy.Symbol, int]) -> Iterator[tuple[Dim, int]]:
    """Each output dimension of the node that these sizes make smaller than 1, with its value."""
    for out in typed.output_types(inst):
        for dim in out.shape:
            if isinstance(dim, int):
                continue
            value = dim.subs(subs)
            if value.is_number and int(value) < 1:
                yield dim, int(value)


def largest(typed: TypedGraph, name: str) -> int | None:
    """The largest size of the named dimension `name` that every bound on it (alone) allows, if any bounds it."""
    dim = symbol(name)
    allowed = [b.limit.most for b in typed.bounds if b.limit.size == dim]
    return min(allowed) if allowed else None


def _exceeded(bound: Bound, value: int, where: str = "") -> Problem:
    limit = bound.limit
    return Problem(
        f"{limit.what} {value}{where} exceeds {limit.param} {limit.most}",
        bound.location,
        hint=f"raise {limit.param} to at least {value}, or use shorter inputs",
        node=bound.node,
    )


def _repeat_changes_shape(graph: Graph, inst: NodeInstance, types: dict[Endpoint, TensorType]) -> str | None:
    """Why copy k of a repeat cannot take copy k-1's output, when that is the trouble: the repeated block gives
    another shape than it takes, and no value of its params fits every copy (fixing one copy breaks the other)."""
    for group in graph.groups.values():
        copy, _, _ = inst.id.removeprefix(group.id + ".").partition(".")
        if group.kind != "repeat" or not inst.id.startswith(group.id + ".") or not copy.isdigit() or copy == "0":
            continue
        previous = f"{group.id}.{int(copy) - 1}"
        for endpoint in inst.bindings.values():
            if endpoint is not None and (endpoint.node == previous or endpoint.node.startswith(previous + ".")):
                given = types[endpoint].shape
                return (
                    f"each copy of `repeat: {group.count}` feeds the next, so a repeated block must give the shape it "
                    f"takes, and {group.id!r} does not (copy {previous} gives {format_shape(given)}): repeat a block "
                    "that keeps its shape, and change the shape in a node of its own before or after the repeat"
                )
    return None


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
