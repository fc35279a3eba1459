"""The last step of validation: every node's block, params and wiring, checked one level at a time.

A level is the spec's `nodes:` or the nodes of a sub-graph. At each level every node's type is looked up (a
registered block, or a sub-graph of `blocks:`), its `repeat:` and params are substituted in the scope they are
written in (the spec's vars, or the sub-graph's own params) and validated by the block's `Params` model, and
its `in:` is bound to the level's inputs and nodes, port by port. A sub-graph is resolved once per distinct set
of params its uses give it, however many copies `repeat:` makes, so a block's params are validated once per
distinct value. Every independent mistake of a spec is found here in one pass, each at its own line.

`resolved_spec` writes the result back out as a spec of its own (`validate --resolved`).

What stays for the graph stage (builder.graph) is mechanical: copies, instance names, and the tensors each
port reads once sub-graph inputs are bound at each use.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx
from pydantic import TypeAdapter, ValidationError
from torch import nn

from blockgraph.blocks import REGISTRY, BlockEntry, BlockParams
from blockgraph.blocks.registry import weights_follow
from blockgraph.builder.expressions import Scope
from blockgraph.builder.located import pydantic_problems, resolve_variable, substitute_located
from blockgraph.builder.model import GraphModel
from blockgraph.builder.source import SourceMap
from blockgraph.builder.spec import GraphSpec, NodeSpec, Repeat, Spec
from blockgraph.builder.spec_files import FileAccess
from blockgraph.common.errors import Problem, ProblemList, SpecError, SpecPath


def unconnected(block: str, port: str) -> tuple[str, str]:
    """The message and hint for a required port left unconnected, at validation or once sub-graphs are bound."""
    return f"required input {port!r} of {block!r} is not connected", f"add it to `in`, e.g. in: {{{port}: <node>}}"


@dataclass(frozen=True)
class Use:
    """One node of a level, resolved: a block with validated params, or a sub-graph resolved for its params."""

    name: str
    path: SpecPath  # where the node is written
    type: str
    bindings: dict[str, str | None]  # port → ref as written ("x", "enc.memory"); None: skipped with null
    repeat: int | None  # None: a single node; N: a stack of N copies (`repeat: 1` still names copies node.0)
    share: str | None = None  # the node at this level whose module this one calls
    entry: BlockEntry | None = None
    params: BlockParams | None = None
    body: Level | None = None

    @property
    def ports(self) -> list[str]:
        """Its input ports, in the order a list `in:` binds them."""
        if self.body is not None:
            return list(self.body.inputs)
        return [p.name for p in self.entry.cls.in_ports] if self.entry is not None else []


@dataclass(frozen=True)
class Level:
    """The nodes of the spec or of a sub-graph, in an order where each node comes after those it reads."""

    inputs: tuple[str, ...]
    uses: dict[str, Use]  # in dependency order
    outputs: dict[str, tuple[str, SpecPath]]  # output name → (ref, where it is written); "output" when single
    single: bool
    base: SpecPath  # ("nodes",) or ("blocks", NAME, "nodes")


def resolve(
    spec: Spec,
    source: SourceMap,
    scope: Scope,
    files: FileAccess,
    spec_file: Path | None,
    problems: ProblemList,
    left_out: frozenset[SpecPath] = frozenset(),
) -> Level:
    """The spec's top level, every sub-graph beneath it resolved; what is wrong is added to `problems`.

    `left_out` are the parts validation already found wrong and took out of `spec` (`("nodes", "attn")`,
    `("inputs", "x")`, `("blocks", "enc")`, `("outputs",)`): what refers to them is not reported again."""
    resolver = _Resolver(spec, source, files, spec_file, problems, left_out)
    return resolver.level(spec.nodes, tuple(spec.inputs), spec.outputs, scope, ("nodes",), ("outputs",), "", [])


@functools.cache
def _reserved_names() -> frozenset[str]:
    """Attributes of the model and of the module containers that nodes are installed in (`training`, `items`)."""
    return frozenset(dir(GraphModel())) | frozenset(dir(nn.ModuleDict())) | frozenset(dir(nn.ModuleList()))


class _Resolver:
    def __init__(
        self,
        spec: Spec,
        source: SourceMap,
        files: FileAccess,
        spec_file: Path | None,
        problems: ProblemList,
        left_out: frozenset[SpecPath],
    ):
        self.spec = spec
        self.left_out = left_out
        self.source = source
        self.files = files
        self.folder = spec_file.parent if spec_file is not None else Path()
        self.from_file = spec_file is not None  # a spec given as a mapping has no file its paths are relative to
        self.problems = problems
        self._params: dict[tuple[str, str], BlockParams | None] = {}
        self._bodies: dict[tuple[str, str], Level | None] = {}

    def error(
        self, message: str, path: SpecPath, hint: str | None = None, node: str | None = None, key: bool = False
    ) -> None:
        self.problems.add(Problem(message, self.source.locate(path, key=key), hint=hint, node=node))

    def _quotable(self, names: list[str], prefix: SpecPath) -> list[str]:
        """Those of `names` (keys under `prefix`) that a hint may list: a reached base's are its text, never shown."""
        return [name for name in names if self.source.locate((*prefix, name), key=True).quoted]

    # --- a level --------------------------------------------------------------------------------------------------

    def level(
        self,
        nodes: dict[str, NodeSpec],
        inputs: tuple[str, ...],
        outputs: str | dict[str, str],
        scope: Scope,
        base: SpecPath,
        outputs_path: SpecPath,
        prefix: str,
        stack: list[str],
    ) -> Level:
        """Resolve the nodes of one level; `prefix` names its first instance in problems (`encoder.0.`)."""
        clashes = set(nodes) & set(inputs)
        for name in clashes:
            self.error(f"node {name!r} has the same name as an input", (*base, name), key=True, hint="rename the node")
        for name in sorted(set(nodes) & _reserved_names()):
            self.error(
                f"node name {name!r} is taken: torch.nn modules have an attribute {name!r}",
                (*base, name),
                key=True,
                hint="nodes become submodules, which cannot hide a Module attribute; rename the node",
            )
        order, looped = self._order(nodes, base, clashes, prefix)
        ports: dict[str, list[str] | None] = {name: [] for name in inputs}  # name → its output ports (inputs: none)
        # None: a node (or input) already reported wrong, which refs may name without a second report
        failed = {part[-1] for part in self.left_out if part[:-1] == base} | looped
        if base == ("nodes",):
            failed |= {part[1] for part in self.left_out if part[:1] == ("inputs",) and len(part) == 2}
        ports.update(dict.fromkeys(failed))
        uses: dict[str, Use] = {}
        for name in order:
            use = self._node(name, nodes[name], scope, (*base, name), prefix + name, stack, uses, ports)
            ports[name] = self._out_ports(use) if use is not None else None
            if use is not None:
                uses[name] = use
        single = isinstance(outputs, str)
        found = {}
        written = {} if outputs_path in self.left_out else {"output": outputs} if single else outputs
        for out, ref in written.items():
            path = outputs_path if single else (*outputs_path, out)
            if self._ref(ref, ports, path, base):
                found[out] = (ref, path)
        return Level(inputs, uses, found, single, base)

    def _order(
        self, nodes: dict[str, NodeSpec], base: SpecPath, clashes: set[str], prefix: str
    ) -> tuple[list[str], set[str]]:
        """The nodes in dependency order, and those on a cycle (each cycle reported): these come last, each
        still checked on its own, their refs to one another not judged."""
        deps = nx.DiGraph()
        deps.add_nodes_from(nodes)
        for name, node in nodes.items():
            for ref in _refs(node.inputs):
                # a ref to a name clash is already an error; as an edge it would only add a bogus cycle
                if (target := ref.split(".")[0]) in nodes and target not in clashes:
                    deps.add_edge(target, name, via="in")
            if node.share in nodes:
                deps.add_edge(node.share, name, via="share")
        position = {name: i for i, name in enumerate(nodes)}
        looped: set[str] = set()
        for component in sorted(nx.strongly_connected_components(deps), key=lambda c: min(position[n] for n in c)):
            one = next(iter(component))
            if len(component) > 1 or deps.has_edge(one, one):
                self._cycle(deps.subgraph(component), base, prefix)
                looped |= component
        deps.remove_nodes_from(looped)
        ordered = list(nx.lexicographical_topological_sort(deps, key=position.__getitem__))
        return ordered + [name for name in nodes if name in looped], looped

    def _cycle(self, deps: nx.DiGraph, base: SpecPath, prefix: str) -> None:
        cycle = nx.find_cycle(deps)
        names = [edge[0] for edge in cycle] + [cycle[0][0]]
        via = deps.edges[cycle[-1][:2]]["via"]  # point at the `in:` or `share:` that closes the loop
        self.error(
            f"the nodes form a cycle: {' → '.join(names)}" + (" (through share:)" if via == "share" else ""),
            (*base, cycle[-1][1], via),
            hint="a model is a directed acyclic graph; break the loop (use a recurrent block for recurrence)",
            node=prefix + cycle[-1][1],
        )

    def _ref(self, ref: str, ports: dict[str, list[str] | None], path: SpecPath, base: SpecPath) -> bool:
        """Whether `ref` names an input or a node of the level `base` (and one of its output ports)."""
        name, _, port = ref.partition(".")
        outs = ports.get(name, False)
        if outs is False and base == ("nodes",) and ("inputs",) in self.left_out:
            return False  # the spec's inputs failed as a whole: a name that is not a node may be one of them
        if outs is False:
            inputs = self.spec.inputs if base == ("nodes",) else self.spec.blocks[str(base[1])].inputs
            known = [
                *self._quotable([n for n in ports if n in inputs], (*base[:-1], "inputs")),
                *self._quotable([n for n in ports if n not in inputs], base),
            ]
            close = difflib.get_close_matches(name, known, n=1)
            self.error(
                f"{name!r} is not a node or input here" + (f" (in {ref!r})" if port else ""),
                path,
                hint=f"did you mean {close[0]!r}?" if close else f"known names: {', '.join(known)}" if known else None,
            )
            return False
        if outs is None:  # the node itself failed; that error is already reported
            return False
        if port and port not in outs:
            close = difflib.get_close_matches(port, outs, n=1)
            self.error(
                f"{name!r} has no output port {port!r}",
                path,
                hint=f"did you mean {name}.{close[0]}?"
                if close
                else f"its outputs: {', '.join(outs)}"
                if outs
                else f"{name!r} is an input with no ports: refer to it as {name!r}",
            )
            return False
        return True

    @staticmethod
    def _out_ports(use: Use) -> list[str]:
        if use.body is not None:
            return list(use.body.outputs)
        if use.params is None:
            return [p.name for p in use.entry.cls.out_ports]  # type: ignore[union-attr]
        return [p.name for p in use.entry.cls.outputs_for(use.params)]  # type: ignore[union-attr]

    # --- a node -----------------------------------------------------------------------------------------------

    def _node(
        self,
        name: str,
        node: NodeSpec,
        scope: Scope,
        path: SpecPath,
        node_id: str,
        stack: list[str],
        uses: dict[str, Use],
        ports: dict[str, list[str] | None],
    ) -> Use | None:
        if ("blocks", node.type) in self.left_out:  # a sub-graph already reported wrong
            return None
        subgraph = self.spec.blocks.get(node.type)
        entry = None if subgraph else self._entry(node.type, path, node_id)
        if subgraph is None and entry is None:
            return None
        in_ports = subgraph.inputs if subgraph else [p.name for p in entry.cls.in_ports]  # type: ignore[union-attr]
        bindings, wired = self._bind(node, in_ports, ports, path, node_id)
        repeat = self._repeat(node, scope, path)
        if subgraph and node.type in stack:
            self.error(f"sub-graph {node.type!r} uses itself: {' → '.join([*stack, node.type])}", (*path, "type"))
            return None
        if node.share is not None and (subgraph or node.repeat is not None):
            self.error("share: works on single block nodes, not on sub-graphs or repeats", (*path, "share"))
            return None
        first = f"{node_id}.0" if node.repeat is not None else node_id  # problems name the first copy
        if subgraph:
            body = self._subgraph(node, subgraph, scope, path, first, stack)
            return Use(name, path, node.type, bindings, repeat, body=body) if body is not None else None
        assert entry is not None
        if node.share is not None:
            if ports.get(node.share, []) is None:  # the owner is already reported: this node's params are left
                if node.params:
                    self._block_params(entry, node, scope, path, first)
                return None
            owner = self._owner(node, entry, path, node_id, uses)
            if owner is None:
                return None
            params = owner.params if not node.params else self._block_params(entry, node, scope, path, first)
            if node.params and params is not None and params != owner.params:
                self.error(
                    f"share: params differ from those of {node.share!r}",
                    (*path, "params"),
                    hint="omit params on a sharing node; it takes its owner's",
                    node=node_id,
                )
                return None
        else:
            params = self._block_params(entry, node, scope, path, first)
        if wired:
            self._check_required(entry, bindings, path, first)
        return Use(name, path, node.type, bindings, repeat, node.share, entry, params)

    def _entry(self, type_name: str, path: SpecPath, node_id: str) -> BlockEntry | None:
        if type_name in REGISTRY:
            return REGISTRY.get(type_name)
        known = REGISTRY.names() + list(self.spec.blocks)
        close = difflib.get_close_matches(type_name, known, n=3)
        self.error(
            f"unknown block type {type_name!r}",
            (*path, "type"),
            hint=f"did you mean {' or '.join(repr(c) for c in close)}?"
            if close
            else "run `blockgraph blocks` to list them; load a plugin's with `blockgraph --plugin FILE COMMAND ...`",
            node=node_id,
        )
        return None

    def _repeat(self, node: NodeSpec, scope: Scope, path: SpecPath) -> int | None:
        value = node.repeat
        failed: list[SpecPath] = []
        if isinstance(value, str):
            value = substitute_located(value, (*path, "repeat"), scope, self.source, self.problems, failed)
        if failed:  # already reported: one copy stands for the stack
            return 1
        if value is None:
            return None
        try:
            return _REPEAT.validate_python(value)
        except ValidationError:
            found = f"; found {value!r}" if self.source.locate((*path, "repeat")).quoted else ""
            self.error(f"repeat must be an integer from 1 to 10000{found}", (*path, "repeat"))
            return 1

    def _bind(
        self, node: NodeSpec, ports: list[str], known: dict[str, list[str] | None], path: SpecPath, node_id: str
    ) -> tuple[dict[str, str | None], bool]:
        """Port → ref (None: skipped), and whether every given ref is valid (if not, that is already reported)."""
        spec_in = node.inputs
        in_path = (*path, "in")
        if spec_in is None:
            return {}, True
        if isinstance(spec_in, str):
            spec_in = [spec_in]
        unknown_port = False
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
        valid = [ref is None or self._ref(ref, known, ref_path, path[:-1]) for _, ref, ref_path in pairs]
        # a misspelt port or a ref that failed is already reported: "required input not connected" would repeat it
        return {port: ref for port, ref, _ in pairs}, not unknown_port and all(valid)

    def _check_required(self, entry: BlockEntry, bindings: dict[str, str | None], path: SpecPath, node_id: str) -> None:
        for port in entry.cls.in_ports:
            if not port.optional and bindings.get(port.name) is None:
                message, hint = unconnected(entry.name, port.name)
                self.error(message, (*path, "in"), hint=hint, node=node_id)

    def _owner(
        self, node: NodeSpec, entry: BlockEntry, path: SpecPath, node_id: str, uses: dict[str, Use]
    ) -> Use | None:
        """The node named by `share:`: a block node of the same type at this level (resolved before this one)."""
        owner = uses.get(node.share)  # type: ignore[arg-type]
        if owner is None or owner.entry is None:
            close = difflib.get_close_matches(str(node.share), [n for n, u in uses.items() if u.entry], n=1)
            self.error(
                f"share: {node.share!r} is not a block node at this level",
                (*path, "share"),
                hint=f"did you mean {close[0]!r}?" if close else "share names another block node of the same nodes:",
                node=node_id,
            )
            return None
        if owner.entry.name != entry.name:
            self.error(
                f"share: {node.share!r} is a {owner.entry.name!r} block, this node a {entry.name!r}",
                (*path, "share"),
                hint="only nodes of the same block type can share a module",
                node=node_id,
            )
            return None
        return owner if owner.params is not None else None

    # --- params -----------------------------------------------------------------------------------------------

    def _block_params(
        self, entry: BlockEntry, node: NodeSpec, scope: Scope, path: SpecPath, node_id: str
    ) -> BlockParams | None:
        failed: list[SpecPath] = []
        raw = substitute_located(node.params, (*path, "params"), scope, self.source, self.problems, failed)
        if failed:  # a `${...}` failed: its raw text would only fail again here
            return None
        raw = self._file_paths(entry, raw, path, node_id)
        if raw is None:
            return None
        key = (entry.name, json.dumps(raw, sort_keys=True, default=repr))
        if key in self._params:
            return self._params[key]
        try:
            params: BlockParams | None = entry.cls.Params.model_validate(raw)
        except ValidationError as exc:
            for problem in pydantic_problems(exc, (*path, "params"), self.source, entry.cls.Params, raw):
                self.problems.add(Problem(problem.message, problem.location, problem.hint, node=node_id))
            params = None
        self._params[key] = params
        return params

    def _file_paths(self, entry: BlockEntry, raw: Any, path: SpecPath, node_id: str) -> Any:
        """File params (`json_schema_extra={"format": "path"}`) are relative to the file that writes them (as
        `extends:` is) and must stay in the spec's folder (see builder.spec_files); None when one is refused. A
        model rebuilt to receive saved weights never reads them, so their paths are left as written."""
        if weights_follow() or not isinstance(raw, dict):
            return raw
        resolved = dict(raw)
        for name in _path_params(entry):
            value = resolved.get(name)
            if isinstance(value, str):
                where = self.source.locate((*path, "params", name))
                written_in = Path(where.file).parent if where.file and self.from_file else self.folder
                try:
                    resolved[name] = str(self.files.resolve(value, written_in, where, f"{name}:"))
                except SpecError as exc:
                    for problem in exc.problems:
                        self.problems.add(Problem(problem.message, problem.location, problem.hint, node=node_id))
                    return None
        return resolved

    def _subgraph(
        self, node: NodeSpec, subgraph: GraphSpec, scope: Scope, path: SpecPath, first: str, stack: list[str]
    ) -> Level | None:
        """The sub-graph's nodes resolved for this use's params (once per distinct set of them)."""
        unknown = set(node.params) - set(subgraph.params)
        shown = self._quotable(list(subgraph.params), ("blocks", node.type, "params"))
        listed = f"its params: {', '.join(shown) or 'none'}" if shown or not subgraph.params else None
        for param in sorted(unknown):
            close = difflib.get_close_matches(param, shown, n=1)
            self.error(
                f"sub-graph {node.type!r} has no parameter {param!r}",
                (*path, "params", param),
                hint=f"did you mean {close[0]!r}?" if close else listed,
                node=first,
                key=True,
            )
        known = {name: value for name, value in node.params.items() if name in subgraph.params}
        failed: list[SpecPath] = []
        given = substitute_located(known, (*path, "params"), scope, self.source, self.problems, failed)
        if failed:  # the sub-graph would be resolved with the text of a `${...}` that failed
            return None
        key = (node.type, json.dumps(given, sort_keys=True, default=repr))
        if key in self._bodies:
            return self._bodies[key]
        # lexical scope: defaults and nodes see the sub-graph's own params (use-site values first) and the
        # spec's vars, never the caller's params, so a sub-graph means the same wherever it is used
        origin = ("blocks", node.type, "params")
        root = scope
        while root.parent is not None:
            root = root.parent
        inner = Scope(subgraph.params, parent=root, origin=origin, resolved=given)
        for name in subgraph.params:
            resolve_variable(inner, name, self.source, self.problems)
        outputs_path = ("blocks", node.type, "outputs")
        base = ("blocks", node.type, "nodes")
        body = self.level(
            subgraph.nodes, tuple(subgraph.inputs), subgraph.outputs, inner, base, outputs_path, first + ".",
            [*stack, node.type],
        )  # fmt: skip
        self._bodies[key] = body
        return body


_REPEAT: TypeAdapter[int] = TypeAdapter(Repeat)


def _path_params(entry: BlockEntry) -> list[str]:
    """The block's params that name files (`json_schema_extra={"format": "path"}`)."""
    return [
        name
        for name, info in entry.cls.Params.model_fields.items()
        if isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get("format") == "path"
    ]


def resolved_spec(spec: Spec, top: Level, folder: Path) -> dict[str, Any]:
    """The spec as resolution read it, standalone: extends merged, no `${...}` left, every block's params written
    out in full, file params relative to `folder` (the spec's), and each sub-graph specialised for the params its
    uses give it (`layer`, `layer_2`, ...). Repeats and sub-graphs stay what they are, so that the document
    validates on its own and builds the very same model: the same modules, parameter names and shapes."""
    writer = _Writer(spec, folder)
    nodes = writer.nodes(top)
    data: dict[str, Any] = {"name": spec.name}
    if spec.description is not None:
        data["description"] = spec.description
    if spec.dims:
        data["dims"] = dict(spec.dims)
    data["inputs"] = {name: given.model_dump(exclude_defaults=True) for name, given in spec.inputs.items()}
    if writer.blocks:
        data["blocks"] = writer.blocks
    data["nodes"] = nodes
    data["outputs"] = _outputs(top)
    if spec.tie:
        data["tie"] = dict(spec.tie)
    return data


class _Writer:
    """Levels back into spec mappings; each resolved sub-graph body becomes one entry of `blocks:`."""

    def __init__(self, spec: Spec, folder: Path):
        self.spec = spec
        self.folder = folder
        self.blocks: dict[str, dict[str, Any]] = {}
        self._names: dict[int, str] = {}  # id of a resolved sub-graph body → its name under blocks:

    def nodes(self, level: Level) -> dict[str, Any]:
        return {name: self._node(use) for name, use in level.uses.items()}

    def _node(self, use: Use) -> dict[str, Any]:
        node: dict[str, Any] = {"type": self._subgraph(use) if use.body is not None else use.type}
        if use.params is not None and use.share is None:  # a sharing node takes its owner's params
            node["params"] = self._params(use)
        bindings = {port: ref for port, ref in use.bindings.items() if ref is not None}  # skipped: unconnected
        if bindings:
            node["in"] = bindings
        if use.repeat is not None:
            node["repeat"] = use.repeat
        if use.share is not None:
            node["share"] = use.share
        written = self.spec.nodes if use.path[0] == "nodes" else self.spec.blocks[str(use.path[1])].nodes
        if written[use.name].doc is not None:
            node["doc"] = written[use.name].doc
        return node

    def _params(self, use: Use) -> dict[str, Any]:
        assert use.params is not None and use.entry is not None
        params = use.params.model_dump(mode="json")
        for name in _path_params(use.entry):
            if isinstance(params.get(name), str):
                params[name] = os.path.relpath(params[name], self.folder)
        return params

    def _subgraph(self, use: Use) -> str:
        """The name under blocks: of the sub-graph as resolved for this use's params, written once."""
        assert use.body is not None
        if id(use.body) not in self._names:
            taken = {*self.spec.blocks, *REGISTRY.names()}
            name, count = use.type, 1  # the first keeps the sub-graph's name
            while name in self._names.values() or (name != use.type and name in taken):
                count += 1
                name = f"{use.type}_{count}"
            self._names[id(use.body)] = name
            graph = {"inputs": list(use.body.inputs), "nodes": self.nodes(use.body), "outputs": _outputs(use.body)}
            doc = self.spec.blocks[use.type].doc
            if doc is not None:
                graph["doc"] = doc
            self.blocks[name] = graph
        return self._names[id(use.body)]


def _outputs(level: Level) -> str | dict[str, str]:
    if level.single:
        return next(ref for ref, _ in level.outputs.values())
    return {name: ref for name, (ref, _) in level.outputs.items()}


def _refs(spec_in: Any) -> list[str]:
    if spec_in is None:
        return []
    if isinstance(spec_in, str):
        return [spec_in]
    values = spec_in if isinstance(spec_in, list) else list(spec_in.values())
    return [v for v in values if v is not None]
