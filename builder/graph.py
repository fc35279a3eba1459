"""Validated spec → one flat DAG of block instances: every repeat copied, every sub-graph use expanded.

Validation (builder.resolve) has checked each level's types, params and refs; what is left is mechanical:
instance names (`encoder.3.attn`), the tensor each port reads once the inputs of each sub-graph use are bound,
and the few checks that depend on those bindings (a required port fed by an unconnected sub-graph input or an
optional input). The `Graph` is everything later stages need, and nothing of the spec itself: the instances,
the ties, the default sizes of dimensions, the resolved variables, the standalone spec to save, and the
source map that locates a problem in the files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import networkx as nx

from blockgraph.blocks import BlockEntry, BlockParams, Port
from blockgraph.builder.resolve import Level, Use, unconnected
from blockgraph.builder.source import SourceMap
from blockgraph.builder.spec import InputSpec, RolesSpec
from blockgraph.builder.validate import ValidSpec
from blockgraph.common.errors import Location, Problem, ProblemList, SpecError, SpecPath

MAX_EXPANDED = 100_000  # block instances and sub-graph instances in one expanded graph


@dataclass(frozen=True)
class Endpoint:
    """A tensor in the flat graph: a spec input (port "") or one output port of a node."""

    node: str
    port: str = ""

    def __str__(self) -> str:
        return f"{self.node}.{self.port}" if self.port else self.node


UNBOUND = Endpoint("<unconnected>")  # a sub-graph input or list entry given nothing (None when called: optional only)


@dataclass
class NodeInstance:
    """One block module in the flat graph; `id` is its dotted module path (`encoder.3.attn`)."""

    id: str
    entry: BlockEntry
    params: BlockParams
    bindings: dict[str, Endpoint | None]
    spec_path: SpecPath
    module_id: str = ""  # the module this node calls: its own (= id) or, with `share:`, another node's

    def __post_init__(self) -> None:
        self.module_id = self.module_id or self.id

    @property
    def out_ports(self) -> tuple[Port, ...]:
        return self.entry.cls.outputs_for(self.params)


@dataclass(frozen=True)
class Group:
    """A repeat stack or a sub-graph instance, for collapsing in `inspect`."""

    id: str
    kind: Literal["repeat", "subgraph"]
    type: str
    count: int = 1


@dataclass
class Graph:
    """The assembled model: inputs, block instances in execution order, outputs, and what they were built from."""

    name: str
    inputs: dict[str, InputSpec]
    nodes: dict[str, NodeInstance]
    outputs: dict[str, Endpoint]
    single_output: bool
    dag: nx.DiGraph
    source: SourceMap  # locates a spec path in the files
    groups: dict[str, Group] = field(default_factory=dict)
    ties: dict[str, str] = field(default_factory=dict)  # parameter → the parameter whose tensor it shares
    dims: dict[str, int] = field(default_factory=dict)  # default sizes of named dimensions (`dims:`)
    vars: dict[str, Any] = field(default_factory=dict)  # the spec's variables, resolved
    roles: RolesSpec = field(default_factory=RolesSpec)  # what training makes of the outputs (`roles:`)
    standalone: dict[str, Any] = field(default_factory=dict)  # the spec, loadable on its own (what `save` writes)
    warnings: list[Problem] = field(default_factory=list)

    def locate(self, path: SpecPath) -> Location:
        return self.source.locate(path)


def assemble(valid: ValidSpec) -> Graph:
    """Expand and wire every node; the problems only bindings reveal are reported together."""
    spec = valid.spec
    assembler = _Assembler(valid.source, spec.inputs)
    env: dict[str, Endpoint] = {name: Endpoint(name) for name in spec.inputs}
    local = assembler.expand(valid.top, "", env)
    outputs: dict[str, Endpoint] = {}
    for name, (ref, path) in valid.top.outputs.items():
        endpoint = _endpoint(ref, local)
        if endpoint is UNBOUND:  # a sub-graph passing through one of its inputs, left unconnected
            assembler.error(f"output {name!r} ({ref}) has no value: it comes from an input that is not connected", path)
        elif not endpoint.port and spec.inputs[endpoint.node].optional:
            assembler.error(
                f"output {name!r} is {endpoint.node!r}, an optional input: the model would return None for it",
                path,
                hint=f"make {endpoint.node!r} required, or output a node",
            )
        else:
            outputs[name] = endpoint
    assembler.problems.raise_if_errors()
    graph = Graph(
        spec.name,
        dict(spec.inputs),
        {},
        outputs,
        valid.top.single,
        nx.DiGraph(),
        valid.source,
        assembler.groups,
        ties=dict(spec.tie),
        dims=dict(spec.dims),
        vars=dict(spec.vars),
        roles=spec.roles,
        standalone=valid.standalone,
    )
    _build_dag(graph, assembler.nodes)
    graph.warnings = [*valid.warnings, *_unused(graph)]
    return graph


class _Assembler:
    def __init__(self, source: SourceMap, inputs: dict[str, InputSpec]):
        self.source = source
        self.inputs = inputs
        self.problems = ProblemList()
        self.nodes: dict[str, NodeInstance] = {}
        self.groups: dict[str, Group] = {}
        self.expanded = 0

    def error(self, message: str, path: SpecPath, hint: str | None = None, node: str | None = None) -> None:
        self.problems.add(Problem(message, self.source.locate(path), hint=hint, node=node))

    def expand(self, level: Level, prefix: str, env: dict[str, Endpoint]) -> dict[str, dict[str, Endpoint]]:
        """Instances of one level's nodes (in dependency order); returns each local name's outputs by port."""
        local: dict[str, dict[str, Endpoint]] = {name: {"": ep} for name, ep in env.items()}
        for name, use in level.uses.items():
            local[name] = self._copies(use, prefix, local)
        return local

    def _copies(self, use: Use, prefix: str, local: dict[str, dict[str, Endpoint]]) -> dict[str, Endpoint]:
        """The node, or its `repeat:` copies, each bound by its own ports (copies that differ may name them
        otherwise), each one's first output feeding the next one's first input, and an output named like an input
        feeding that input of the later copies (a running total, such as a stack's auxiliary loss)."""
        node_id = prefix + use.name
        stacked = use.repeat is not None  # `repeat: 1` still names copies `node.0`, so keys don't move with N
        if stacked:
            kinds = dict.fromkeys(use.copy(copy).type for copy in range(use.repeat or 1))  # copies may differ
            self.groups[node_id] = Group(node_id, "repeat", " | ".join(kinds), use.repeat or 1)
        outs: dict[str, Endpoint] = {}
        carried: dict[str, Endpoint] = {}  # each output name's latest tensor, for a later copy's input of that name
        for copy in range(use.repeat or 1):
            copy_id = f"{node_id}.{copy}" if stacked else node_id
            current = use.copy(copy)
            ports = current.ports
            written = current.bindings.items()
            bindings = {port: UNBOUND if ref is None else _endpoint(ref, local) for port, ref in written}
            bindings |= {port: carried[port] for port in ports[1:] if port in carried}
            if copy and ports:
                bindings[ports[0]] = next(iter(outs.values()))
            self._count(current, copy_id)
            if current.body is not None:
                outs = self._subgraph(current, copy_id, bindings)
            else:
                outs = self._block(current, copy_id, prefix, bindings)
            carried |= outs
        return outs

    def _count(self, use: Use, node_id: str) -> None:
        """Stop an expansion that multiplies out of reach: repeats of sub-graphs of repeats of ..."""
        self.expanded += 1
        if self.expanded > MAX_EXPANDED:
            self.error(
                f"the graph expands to more than {MAX_EXPANDED:,} blocks and sub-graphs",
                (*use.path, "repeat" if use.repeat is not None else "type"),
                hint="repeat: counts multiply when sub-graphs are nested",
                node=node_id,
            )
            raise SpecError(self.problems.errors)

    def _block(self, use: Use, node_id: str, prefix: str, bindings: dict[str, Endpoint]) -> dict[str, Endpoint]:
        assert use.entry is not None and use.params is not None  # validation refused the spec otherwise
        wired = {port: None if bound is UNBOUND else bound for port, bound in bindings.items()}
        for port in use.entry.cls.in_ports:
            bound = wired.get(port.name)
            if port.optional or port.name not in bindings:  # an absent required port is validation's to report
                continue
            if bound is None:
                message, hint = unconnected(use.entry.name, port.name)
                self.error(message, (*use.path, "in"), hint=hint, node=node_id)
            elif not bound.port and bound.node in self.inputs and self.inputs[bound.node].optional:
                self.error(
                    f"required input {port.name!r} of {use.entry.name!r} is fed by {bound.node!r}, an optional input",
                    (*use.path, "in"),
                    hint=f"make {bound.node!r} required, or feed this port from a node that is always there",
                    node=node_id,
                )
        module_id = self.nodes[prefix + use.share].module_id if use.share is not None else ""
        instance = NodeInstance(node_id, use.entry, use.params, wired, use.path, module_id)
        self.nodes[node_id] = instance
        return {port.name: Endpoint(node_id, port.name) for port in instance.out_ports}

    def _subgraph(self, use: Use, instance_id: str, bindings: dict[str, Endpoint]) -> dict[str, Endpoint]:
        assert use.body is not None
        self.groups[instance_id] = Group(instance_id, "subgraph", use.type)
        env = {name: bindings.get(name, UNBOUND) for name in use.body.inputs}
        inner = self.expand(use.body, instance_id + ".", env)
        return {port: _endpoint(ref, inner) for port, (ref, _) in use.body.outputs.items()}


def _endpoint(ref: str, local: dict[str, dict[str, Endpoint]]) -> Endpoint:
    """The tensor a (validated) ref names: a node's port, its first output, or an input of the level."""
    name, _, port = ref.partition(".")
    outs = local[name]
    return outs[port] if port else next(iter(outs.values()))


def _build_dag(graph: Graph, instances: dict[str, NodeInstance]) -> None:
    dag = graph.dag
    for name in graph.inputs:
        dag.add_node(name, kind="input")
    for inst in instances.values():
        graph.nodes[inst.id] = inst
        dag.add_node(inst.id, kind="block")
        for port, endpoint in inst.bindings.items():
            if endpoint is not None:
                dag.add_edge(endpoint.node, inst.id, port=port)


def _unused(graph: Graph) -> list[Problem]:
    """Nodes and inputs that no output depends on."""
    needed: set[str] = set()
    for endpoint in graph.outputs.values():
        needed |= nx.ancestors(graph.dag, endpoint.node) | {endpoint.node}
    warnings = []
    for inst in graph.nodes.values():
        if inst.id not in needed:
            warnings.append(
                Problem(
                    f"node {inst.id!r} does not contribute to any output",
                    graph.locate(inst.spec_path),
                    hint="remove it or connect it to an output",
                    severity="warning",
                    node=inst.id,
                )
            )
    for name in graph.inputs:
        if name not in needed:
            warnings.append(Problem(f"input {name!r} is not used", graph.locate(("inputs", name)), severity="warning"))
    return warnings
