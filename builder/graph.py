"""Validated spec → one flat DAG of block instances (sub-graphs and repeats expanded), checked for wiring."""

from __future__ import annotations

import difflib
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import networkx as nx
from pydantic import ValidationError
from torch import nn

from blocks import REGISTRY, BlockEntry, BlockParams, Port
from blocks.registry import weights_follow
from builder.expressions import Scope
from builder.spec import GraphSpec, InputSpec, NodeSpec
from builder.validate import ValidSpec, pydantic_problems, resolve_variable, substitute_located
from common.errors import Location, Problem, ProblemList, SpecError, SpecPath

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
    """The assembled model: inputs, block instances in execution order, outputs."""

    name: str
    inputs: dict[str, InputSpec]
    nodes: dict[str, NodeInstance]
    outputs: dict[str, Endpoint]
    single_output: bool
    dag: nx.DiGraph
    groups: dict[str, Group] = field(default_factory=dict)
    warnings: list[Problem] = field(default_factory=list)
    valid: ValidSpec | None = None

    def locate(self, path: SpecPath) -> Location:
        return self.valid.source.locate(path) if self.valid else Location(path=path)


def assemble(valid: ValidSpec) -> Graph:
    """Expand and wire every node; all wiring problems are reported together."""
    spec = valid.spec
    assembler = _Assembler(valid)
    env: dict[str, Endpoint | None] = {name: Endpoint(name) for name in spec.inputs}
    local = assembler.expand_level(spec.nodes, "", env, valid.scope, ("nodes",), [])
    problems = assembler.problems
    outputs: dict[str, Endpoint] = {}
    single = isinstance(spec.outputs, str)
    for name, ref in ({"output": spec.outputs} if single else spec.outputs).items():
        path = ("outputs",) if single else ("outputs", name)
        endpoint = assembler.resolve(ref, local, path)
        if endpoint is UNBOUND:  # a sub-graph passing through one of its inputs, left unconnected
            assembler.error(f"output {name!r} ({ref}) has no value: it comes from an input that is not connected", path)
        elif endpoint is not None and not endpoint.port and spec.inputs[endpoint.node].optional:
            assembler.error(
                f"output {name!r} is {endpoint.node!r}, an optional input: the model would return None for it",
                path,
                hint=f"make {endpoint.node!r} required, or output a node",
            )
        elif endpoint is not None:
            outputs[name] = endpoint
    for target, source in spec.tie.items():
        if source in spec.tie:  # compile ties one at a time: a chain would leave `target` on a stale tensor
            assembler.error(
                f"tie {target} → {source}, but {source} is itself tied to {spec.tie[source]}",
                ("tie", target),
                hint=f"tie {target} to {spec.tie[source]} directly",
            )
    for name in spec.blocks:
        if name in REGISTRY:
            problems.add(
                Problem(
                    f"sub-graph {name!r} has the name of a registered block; nodes of type {name!r} use the sub-graph",
                    valid.source.locate(("blocks", name), key=True),
                    hint="rename the sub-graph to avoid the confusion",
                    severity="warning",
                )
            )
    problems.raise_if_errors()
    graph = Graph(spec.name, dict(spec.inputs), {}, outputs, single, nx.DiGraph(), assembler.groups, valid=valid)
    _build_dag(graph, assembler.nodes)
    graph.warnings = [*_unused(graph, valid), *problems.warnings]
    return graph


class _Assembler:
    def __init__(self, valid: ValidSpec):
        self.valid = valid
        self.source = valid.source
        self.problems = ProblemList()
        self.nodes: dict[str, NodeInstance] = {}
        self.groups: dict[str, Group] = {}
        self._params_cache: dict[tuple[str, str], BlockParams] = {}
        self.expanded = 0

    def error(
        self, message: str, path: SpecPath, hint: str | None = None, node: str | None = None, key: bool = False
    ) -> None:
        self.problems.add(Problem(message, self.source.locate(path, key=key), hint=hint, node=node))

    def expand_level(
        self,
        nodes: dict[str, NodeSpec],
        prefix: str,
        env: dict[str, Endpoint | None],
        scope: Scope,
        base: SpecPath,
        stack: list[str],
    ) -> dict[str, dict[str, Endpoint | None]]:
        """Expand the nodes of one level in dependency order; returns each local node's outputs by port."""
        clashes = set(nodes) & set(env)
        for name in clashes:
            self.error(f"node {name!r} has the same name as an input", (*base, name), key=True, hint="rename the node")
        for name in sorted(set(nodes) & _reserved_names()):
            self.error(
                f"node name {name!r} is taken: torch.nn modules have an attribute {name!r}",
                (*base, name),
                key=True,
                hint="nodes become submodules, which cannot hide a Module attribute; rename the node",
            )
        order = self._local_order(nodes, base, clashes)
        local: dict[str, dict[str, Endpoint | None]] = {name: {"": ep} for name, ep in env.items()}
        for name in order:
            local[name] = self._expand_node(name, nodes[name], prefix, local, scope, (*base, name), stack)
        return local

    def _local_order(self, nodes: dict[str, NodeSpec], base: SpecPath, clashes: set[str]) -> list[str]:
        deps = nx.DiGraph()
        deps.add_nodes_from(nodes)
        for name, node in nodes.items():
            for ref in _refs(node.inputs):
                # a ref to a name clash is already an error; as an edge it would only add a bogus cycle
                if (target := ref.split(".")[0]) in nodes and target not in clashes:
                    deps.add_edge(target, name, via="in")
            if node.share in nodes:
                deps.add_edge(node.share, name, via="share")
        try:
            cycle = nx.find_cycle(deps)
        except nx.NetworkXNoCycle:
            position = {name: i for i, name in enumerate(nodes)}
            return list(nx.lexicographical_topological_sort(deps, key=position.__getitem__))
        names = [edge[0] for edge in cycle] + [cycle[0][0]]
        via = deps.edges[cycle[-1][:2]]["via"]  # point at the `in:` or `share:` that closes the loop
        self.error(
            f"the nodes form a cycle: {' → '.join(names)}" + (" (through share:)" if via == "share" else ""),
            (*base, cycle[-1][1], via),
            hint="a model is a directed acyclic graph; break the loop (use a recurrent block for recurrence)",
            node=cycle[-1][1],
        )
        raise SpecError(self.problems.errors)

    def resolve(self, ref: str, local: dict[str, dict[str, Endpoint | None]], path: SpecPath) -> Endpoint | None:
        name, _, port = ref.partition(".")
        outs = local.get(name)
        if outs is None:
            close = difflib.get_close_matches(name, list(local), n=1)
            self.error(
                f"{name!r} is not a node or input here" + (f" (in {ref!r})" if port else ""),
                path,
                hint=f"did you mean {close[0]!r}?" if close else f"known names: {', '.join(local)}",
            )
            return None
        if not outs:  # the node itself failed to expand; that error is already reported
            return None
        if not port:
            return next(iter(outs.values()))
        if port not in outs:
            close = difflib.get_close_matches(port, [p for p in outs if p], n=1)
            self.error(
                f"{name!r} has no output port {port!r}",
                path,
                hint=f"did you mean {name}.{close[0]}?"
                if close
                else f"its outputs: {', '.join(p for p in outs if p)}"
                if any(outs)
                else f"{name!r} is an input with no ports: refer to it as {name!r}",
            )
            return None
        return outs[port]

    def _expand_node(
        self,
        name: str,
        node: NodeSpec,
        prefix: str,
        local: dict[str, dict[str, Endpoint | None]],
        scope: Scope,
        path: SpecPath,
        stack: list[str],
    ) -> dict[str, Endpoint | None]:
        node_id = prefix + name
        subgraph = self.valid.spec.blocks.get(node.type)
        entry = None if subgraph else self._entry(node.type, path, node_id)
        if subgraph is None and entry is None:
            return {}
        ports = subgraph.inputs if subgraph else [p.name for p in entry.cls.in_ports]
        bindings, wired = self._bind(node, ports, local, path, node_id)
        repeat = self._repeat(node, scope, path)
        if subgraph and node.type in stack:
            self.error(f"sub-graph {node.type!r} uses itself: {' → '.join([*stack, node.type])}", (*path, "type"))
            return {}
        if node.share is not None and (subgraph or node.repeat is not None):
            self.error("share: works on single block nodes, not on sub-graphs or repeats", (*path, "share"))
            return {}
        stacked = node.repeat is not None  # `repeat: 1` still names copies `node.0`, so keys don't move with N
        if stacked:
            self.groups[node_id] = Group(node_id, "repeat", node.type, repeat)
        outs: dict[str, Endpoint | None] = {}
        for copy in range(repeat):
            copy_id = f"{node_id}.{copy}" if stacked else node_id
            self._count(node, path, copy_id)
            if subgraph:
                outs = self._expand_subgraph(node, subgraph, copy_id, bindings, scope, path, stack)
            else:
                outs = self._add_block(entry, node, copy_id, bindings, scope, path, wired)
            if not outs:  # this copy failed (already reported): the next ones would only fail the same way
                break
            if copy + 1 < repeat and ports:
                bindings = {**bindings, ports[0]: next(iter(outs.values()))}
        return outs

    def _count(self, node: NodeSpec, path: SpecPath, node_id: str) -> None:
        """Stop an expansion that multiplies out of reach: repeats of sub-graphs of repeats of ..."""
        self.expanded += 1
        if self.expanded > MAX_EXPANDED:
            self.error(
                f"the graph expands to more than {MAX_EXPANDED:,} blocks and sub-graphs",
                (*path, "repeat" if node.repeat is not None else "type"),
                hint="repeat: counts multiply when sub-graphs are nested",
                node=node_id,
            )
            raise SpecError(self.problems.errors)

    def _entry(self, type_name: str, path: SpecPath, node_id: str) -> BlockEntry | None:
        if type_name in REGISTRY:
            return REGISTRY.get(type_name)
        known = REGISTRY.names() + list(self.valid.spec.blocks)
        close = difflib.get_close_matches(type_name, known, n=3)
        self.error(
            f"unknown block type {type_name!r}",
            (*path, "type"),
            hint=f"did you mean {' or '.join(repr(c) for c in close)}?"
            if close
            else "run `blockgraph blocks` to list them; a plugin's blocks need --plugin FILE_OR_MODULE",
            node=node_id,
        )
        return None

    def _repeat(self, node: NodeSpec, scope: Scope, path: SpecPath) -> int:
        value = node.repeat
        if isinstance(value, str):
            value = substitute_located(value, (*path, "repeat"), scope, self.source, self.problems)
        if value is None:
            return 1
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 10_000:
            self.error(f"repeat must be an integer from 1 to 10000; found {value!r}", (*path, "repeat"))
            return 1
        return value

    def _bind(
        self,
        node: NodeSpec,
        ports: list[str],
        local: dict[str, dict[str, Endpoint | None]],
        path: SpecPath,
        node_id: str,
    ) -> tuple[dict[str, Endpoint | None], bool]:
        """Port → endpoint, and whether every given ref resolved (if not, that is already reported)."""
        spec_in = node.inputs
        in_path = (*path, "in")
        unknown_port = False
        if spec_in is None:
            return {}, True
        if isinstance(spec_in, str):
            spec_in = [spec_in]
        if isinstance(spec_in, list):
            if len(spec_in) > len(ports):
                self.error(
                    f"{len(spec_in)} inputs given but {node.type!r} takes {len(ports)}: {', '.join(ports)}",
                    in_path,
                    node=node_id,
                )
            pairs = [(port, ref, (*in_path, i)) for i, (port, ref) in enumerate(zip(ports, spec_in, strict=False))]
        else:
            pairs = []
            for port, ref in spec_in.items():
                if port not in ports:
                    unknown_port = True
                    close = difflib.get_close_matches(port, ports, n=1)
                    self.error(
                        f"{node.type!r} has no input port {port!r}",
                        (*in_path, port),
                        hint=f"did you mean {close[0]!r}?" if close else f"its inputs: {', '.join(ports)}",
                        node=node_id,
                        key=True,
                    )
                    continue
                pairs.append((port, ref, (*in_path, port)))
        bindings = {
            port: UNBOUND if ref is None else self.resolve(ref, local, ref_path) for port, ref, ref_path in pairs
        }
        # a misspelt port or a ref that failed is already reported: "required input not connected" would repeat it
        wired = not unknown_port and all(bindings[port] is not None for port, ref, _ in pairs if ref is not None)
        return bindings, wired

    def _add_block(
        self,
        entry: BlockEntry,
        node: NodeSpec,
        node_id: str,
        bindings: dict[str, Endpoint | None],
        scope: Scope,
        path: SpecPath,
        wired: bool,
    ) -> dict[str, Endpoint | None]:
        params = self._params(entry, node, scope, path, node_id)
        inputs = self.valid.spec.inputs
        bindings = {port: None if bound is UNBOUND else bound for port, bound in bindings.items()}
        for port in entry.cls.in_ports if wired else ():
            bound = bindings.get(port.name)
            if not port.optional and bound is not None and not bound.port and inputs[bound.node].optional:
                self.error(
                    f"required input {port.name!r} of {entry.name!r} is fed by {bound.node!r}, an optional input",
                    (*path, "in"),
                    hint=f"make {bound.node!r} required, or feed this port from a node that is always there",
                    node=node_id,
                )
            if not port.optional and bound is None:
                self.error(
                    f"required input {port.name!r} of {entry.name!r} is not connected",
                    (*path, "in"),
                    hint=f"add it to `in`, e.g. in: {{{port.name}: <node>}}",
                    node=node_id,
                )
        if params is None:
            return {port.name: Endpoint(node_id, port.name) for port in entry.cls.out_ports}
        instance = NodeInstance(node_id, entry, params, bindings, path)
        if node.share is not None:
            instance = self._shared(instance, node)
            if instance is None:
                return {}
        self.nodes[node_id] = instance
        return {port.name: Endpoint(node_id, port.name) for port in instance.out_ports}

    def _owner(self, node_id: str, share: str) -> NodeInstance | None:
        """The node named by `share:`, at the same level as `node_id`."""
        prefix = node_id.rpartition(".")[0]
        return self.nodes.get(f"{prefix}.{share}" if prefix else share)

    def _no_owner(self, node: NodeSpec, node_id: str, path: SpecPath) -> None:
        prefix = node_id.rpartition(".")[0]
        level = [n.rpartition(".")[2] for n in self.nodes if n.rpartition(".")[0] == prefix]
        close = difflib.get_close_matches(str(node.share), level, n=1)
        self.error(
            f"share: {node.share!r} is not a block node at this level",
            (*path, "share"),
            hint=f"did you mean {close[0]!r}?" if close else "share names another block node of the same nodes:",
            node=node_id,
        )

    def _shared(self, instance: NodeInstance, node: NodeSpec) -> NodeInstance | None:
        """Point a `share:` node at its owner's module; same block type and params, or an error."""
        owner = self._owner(instance.id, node.share)
        path = (*instance.spec_path, "share")
        if owner is None:
            self._no_owner(node, instance.id, instance.spec_path)
        elif owner.entry.name != instance.entry.name:
            self.error(
                f"share: {node.share!r} is a {owner.entry.name!r} block, this node a {instance.entry.name!r}",
                path,
                hint="only nodes of the same block type can share a module",
                node=instance.id,
            )
        elif node.params and instance.params != owner.params:
            self.error(
                f"share: params differ from those of {node.share!r}",
                (*instance.spec_path, "params"),
                hint="omit params on a sharing node; it takes its owner's",
                node=instance.id,
            )
        else:
            return NodeInstance(
                instance.id, owner.entry, owner.params, instance.bindings, instance.spec_path, owner.module_id
            )
        return None

    def _params(
        self, entry: BlockEntry, node: NodeSpec, scope: Scope, path: SpecPath, node_id: str
    ) -> BlockParams | None:
        if node.share is not None and not node.params:
            owner = self._owner(node_id, node.share)
            if owner is None:
                self._no_owner(node, node_id, path)
                return None
            return owner.params
        reported = len(self.problems.errors)
        raw = substitute_located(node.params, (*path, "params"), scope, self.source, self.problems)
        if len(self.problems.errors) > reported:  # a `${...}` failed: its raw text would only fail again here
            return None
        raw = self._resolve_paths(entry, raw, path, node_id)
        if raw is None:
            return None
        key = (entry.name, json.dumps(raw, sort_keys=True, default=repr))
        cached = self._params_cache.get(key)
        if cached is not None:
            return cached
        try:
            params = entry.cls.Params.model_validate(raw)
        except ValidationError as exc:
            for problem in pydantic_problems(exc, (*path, "params"), self.source, entry.cls.Params, raw):
                self.problems.add(Problem(problem.message, problem.location, problem.hint, node=node_id))
            return None
        self._params_cache[key] = params
        return params

    def _resolve_paths(self, entry: BlockEntry, raw: Any, path: SpecPath, node_id: str) -> Any:
        """File params (`json_schema_extra={"format": "path"}`) are relative to the spec's folder and must stay in
        it (see builder.spec_files); None when one is refused. A model rebuilt to receive saved weights never
        reads them, so their paths are left as written."""
        if weights_follow() or not isinstance(raw, dict):
            return raw
        base = self.valid.file.parent if self.valid.file else Path()
        resolved = dict(raw)
        for name, info in entry.cls.Params.model_fields.items():
            extra = info.json_schema_extra
            value = resolved.get(name)
            if isinstance(extra, dict) and extra.get("format") == "path" and isinstance(value, str):
                where = self.source.locate((*path, "params", name))
                try:
                    resolved[name] = str(self.valid.files.resolve(value, base, where, f"{name}:"))
                except SpecError as exc:
                    for problem in exc.problems:
                        self.problems.add(Problem(problem.message, problem.location, problem.hint, node=node_id))
                    return None
        return resolved

    def _expand_subgraph(
        self,
        node: NodeSpec,
        subgraph: GraphSpec,
        instance_id: str,
        bindings: dict[str, Endpoint | None],
        scope: Scope,
        path: SpecPath,
        stack: list[str],
    ) -> dict[str, Endpoint | None]:
        self.groups[instance_id] = Group(instance_id, "subgraph", node.type)
        unknown = set(node.params) - set(subgraph.params)
        for param in sorted(unknown):
            close = difflib.get_close_matches(param, list(subgraph.params), n=1)
            self.error(
                f"sub-graph {node.type!r} has no parameter {param!r}",
                (*path, "params", param),
                hint=f"did you mean {close[0]!r}?" if close else f"its params: {', '.join(subgraph.params) or 'none'}",
                node=instance_id,
                key=True,
            )
        known = {name: value for name, value in node.params.items() if name in subgraph.params}
        given = substitute_located(known, (*path, "params"), scope, self.source, self.problems)
        # lexical scope: defaults and nodes see the sub-graph's own params (use-site values first) and the
        # spec's vars, never the caller's params, so a sub-graph means the same wherever it is used
        origin = ("blocks", node.type, "params")
        inner_scope = Scope(subgraph.params, parent=self.valid.scope, origin=origin, resolved=given)
        for name in subgraph.params:
            resolve_variable(inner_scope, name, self.source, self.problems)
        env = {name: bindings.get(name, UNBOUND) for name in subgraph.inputs}
        base = ("blocks", node.type, "nodes")
        inner = self.expand_level(subgraph.nodes, instance_id + ".", env, inner_scope, base, [*stack, node.type])
        outputs = {"output": subgraph.outputs} if isinstance(subgraph.outputs, str) else subgraph.outputs
        return {
            port: self.resolve(
                ref,
                inner,
                ("blocks", node.type, "outputs")
                if isinstance(subgraph.outputs, str)
                else ("blocks", node.type, "outputs", port),
            )
            for port, ref in outputs.items()
        }


@functools.cache
def _reserved_names() -> frozenset[str]:
    """Attributes of the model and of the module containers that nodes are installed in (`training`, `items`)."""
    from builder.compile import GraphModel  # compile imports this module

    return frozenset(dir(GraphModel())) | frozenset(dir(nn.ModuleDict())) | frozenset(dir(nn.ModuleList()))


def _refs(spec_in: Any) -> list[str]:
    if spec_in is None:
        return []
    if isinstance(spec_in, str):
        return [spec_in]
    values = spec_in if isinstance(spec_in, list) else list(spec_in.values())
    return [v for v in values if v is not None]


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


def _unused(graph: Graph, valid: ValidSpec) -> list[Problem]:
    """Nodes and inputs that no output depends on, and variables nothing refers to."""
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
    for name in valid.scope.raw:
        if name not in valid.scope.used:
            warnings.append(
                Problem(f"variable {name!r} is never used", graph.locate(("vars", name)), severity="warning")
            )
    return warnings
