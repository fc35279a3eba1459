"""The last step of validation: every node's block, params and wiring, checked one level at a time.

A level is the spec's `nodes:` or the nodes of a sub-graph. At each level every node's type is looked up (a
registered block, or a sub-graph of `blocks:`), its `repeat:` and params are substituted in the scope they are
written in (the spec's vars, or the sub-graph's own params) and validated by the block's `Params` model, and
its `in:` is bound to the level's inputs and nodes, port by port. A sub-graph is resolved once per distinct set
of params its uses give it, however many copies `repeat:` makes, so a block's params are validated once per
distinct value. Every independent mistake of a spec is found here in one pass, each at its own line.

A block's params are validated in builder.block_params; builder.resolved writes the result back out as a spec
of its own (`validate --resolved`).

What stays for the graph stage (builder.graph) is mechanical: copies, instance names, and the tensors each
port reads once sub-graph inputs are bound at each use.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx
from pydantic import TypeAdapter, ValidationError
from torch import nn

from blockgraph.blocks import REGISTRY, BlockEntry, BlockParams
from blockgraph.builder.block_params import ParamsValidator
from blockgraph.builder.expressions import Scope, mentions
from blockgraph.builder.located import resolve_variable, substitute_located
from blockgraph.builder.source import SourceMap
from blockgraph.builder.spec import NAME_RE, GraphSpec, NodeSpec, Repeat, Spec
from blockgraph.builder.spec_files import FileAccess
from blockgraph.common.errors import Problem, ProblemList, SpecPath


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
    variants: tuple[Use, ...] = ()  # a stack whose copies differ (`${copy}`): each copy's own, else ()

    def copy(self, index: int) -> Use:
        """What copy `index` of a stack is (the node itself unless its copies differ)."""
        return self.variants[index] if self.variants else self

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
    params = ParamsValidator(source, files, spec_file, problems)
    return _Resolver(spec, source, problems, left_out, params).level(_Place(spec), scope)


COPY = "copy"  # the variable a repeated node's type and params read: the copy's index, 0 to N - 1
MAX_COPIES = 100_000  # copies resolved one by one (`${copy}`) in a spec: as many as its graph may hold
MODEL_ATTRIBUTES = frozenset({"code", "spec_name", "typed_graph", "spec"})  # what builder.model's GraphModel adds
# (named here, not imported: the model's type names the typed graph, which is built from this module's output)


@functools.cache
def _reserved_names() -> frozenset[str]:
    """Attributes of the model and of the module containers that nodes are installed in (`training`, `items`)."""
    containers = frozenset(dir(nn.ModuleDict())) | frozenset(dir(nn.ModuleList()))
    return frozenset(dir(nn.Module())) | MODEL_ATTRIBUTES | containers


@dataclass(frozen=True)
class _Place:
    """A level being resolved: its graph (the spec or a sub-graph), where that is written, and for which use."""

    graph: Spec | GraphSpec
    under: SpecPath = ()  # ("blocks", NAME) for a sub-graph
    prefix: str = ""  # names the level's first instance in problems (`encoder.0.`)
    stack: tuple[str, ...] = ()  # the sub-graphs being resolved, outermost first: a use of one of them loops

    @property
    def base(self) -> SpecPath:
        return (*self.under, "nodes")


@dataclass(frozen=True)
class _Readable:
    """What a ref reads under one name of a level: an input (no ports) or a node's output ports. A name already
    reported wrong is `reported`: refs to it are not judged again. A name not in the level has no `_Readable`."""

    ports: tuple[str, ...] = ()
    reported: bool = False


_REPORTED = _Readable(reported=True)


class _Resolver:
    def __init__(
        self,
        spec: Spec,
        source: SourceMap,
        problems: ProblemList,
        left_out: frozenset[SpecPath],
        params: ParamsValidator,
    ):
        self.spec = spec
        self.left_out = left_out
        self.source = source
        self.problems = problems
        self.params = params
        self._bodies: dict[tuple[str, str], Level | None] = {}
        self._copies_left = MAX_COPIES  # nested sub-graphs multiply them: counted before each is resolved

    def error(
        self, message: str, path: SpecPath, hint: str | None = None, node: str | None = None, key: bool = False
    ) -> None:
        self.problems.add(Problem(message, self.source.locate(path, key=key), hint=hint, node=node))

    def _quotable(self, names: list[str], prefix: SpecPath) -> list[str]:
        """Those of `names` (keys under `prefix`) that a hint may list: a reached base's are its text, never shown."""
        return [name for name in names if self.source.locate((*prefix, name), key=True).quoted]

    # --- a level --------------------------------------------------------------------------------------------------

    def level(self, place: _Place, scope: Scope) -> Level:
        """Resolve the nodes of one level, their params substituted in `scope`."""
        nodes, inputs, base = place.graph.nodes, tuple(place.graph.inputs), place.base
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
        order, looped = self._order(nodes, base, clashes, place.prefix)
        names = dict.fromkeys(inputs, _Readable())
        failed = {part[-1] for part in self.left_out if part[:-1] == base and isinstance(part[-1], str)} | looped
        if not place.under:
            failed |= {
                part[1]
                for part in self.left_out
                if part[:1] == ("inputs",) and len(part) == 2 and isinstance(part[1], str)
            }
        names.update(dict.fromkeys(failed, _REPORTED))
        uses: dict[str, Use] = {}
        for name in order:
            use = self._node(place, name, scope, names, uses)
            names[name] = _Readable(self._out_ports(use)) if use is not None else _REPORTED
            if use is not None:
                uses[name] = use
        outputs, outputs_path = place.graph.outputs, (*place.under, "outputs")
        single = isinstance(outputs, str)
        found = {}
        written = {} if outputs_path in self.left_out else {"output": outputs} if single else outputs
        for out, ref in written.items():
            path = outputs_path if single else (*outputs_path, out)
            if self._ref(ref, names, path, place):
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

    def _ref(self, ref: str, names: dict[str, _Readable], path: SpecPath, place: _Place) -> bool:
        """Whether `ref` names an input or a node of the level (and one of its output ports)."""
        name, _, port = ref.partition(".")
        read = names.get(name)
        if read is None and not place.under and ("inputs",) in self.left_out:
            return False  # the spec's inputs failed as a whole: a name that is not a node may be one of them
        if read is None:
            inputs = place.graph.inputs
            known = [
                *self._quotable([n for n in names if n in inputs], (*place.under, "inputs")),
                *self._quotable([n for n in names if n not in inputs], place.base),
            ]
            close = difflib.get_close_matches(name, known, n=1)
            self.error(
                f"{name!r} is not a node or input here" + (f" (in {ref!r})" if port else ""),
                path,
                hint=f"did you mean {close[0]!r}?" if close else f"known names: {', '.join(known)}" if known else None,
            )
            return False
        if read.reported:  # that error is already reported
            return False
        if port and port not in read.ports:
            close = difflib.get_close_matches(port, read.ports, n=1)
            self.error(
                f"{name!r} has no output port {port!r}",
                path,
                hint=f"did you mean {name}.{close[0]}?"
                if close
                else f"its outputs: {', '.join(read.ports)}"
                if read.ports
                else f"{name!r} is an input with no ports: refer to it as {name!r}",
            )
            return False
        return True

    @staticmethod
    def _out_ports(use: Use) -> tuple[str, ...]:
        """What a ref reads: the ports of the node, or of a stack's last copy."""
        use = use.copy((use.repeat or 1) - 1)
        if use.body is not None:
            return tuple(use.body.outputs)
        if use.params is None:
            return tuple(p.name for p in use.entry.cls.out_ports)  # type: ignore[union-attr]
        return tuple(p.name for p in use.entry.cls.outputs_for(use.params))  # type: ignore[union-attr]

    # --- a node -----------------------------------------------------------------------------------------------

    def _node(
        self, place: _Place, name: str, scope: Scope, names: dict[str, _Readable], uses: dict[str, Use]
    ) -> Use | None:
        """The node `name` of the level resolved, its refs judged against `names`; None when it is wrong."""
        node = place.graph.nodes[name]
        if node.repeat is not None and (mentions(node.type, COPY) or mentions(node.params, COPY)):
            return self._copies(place, name, node, scope, names, uses)
        typed = self._typed(node, scope, (*place.base, name))
        return self._use(place, name, typed, scope, names, uses) if typed is not None else None

    def _typed(self, node: NodeSpec, scope: Scope, path: SpecPath) -> NodeSpec | None:
        """The node with its `type` substituted, when it is a `${...}`; None when that fails (reported)."""
        if "${" not in node.type:
            return node
        before = len(self.problems.errors)
        kind = substitute_located(node.type, (*path, "type"), scope, self.source, self.problems)
        if len(self.problems.errors) > before:
            return None
        if not isinstance(kind, str) or not re.fullmatch(NAME_RE, kind):
            self.error(f"type {node.type!r} gives {kind!r}, not a block or sub-graph name", (*path, "type"))
            return None
        return node.model_copy(update={"type": kind})

    def _copies(
        self,
        place: _Place,
        name: str,
        node: NodeSpec,
        scope: Scope,
        names: dict[str, _Readable],
        uses: dict[str, Use],
    ) -> Use | None:
        """A stack whose type or params read `${copy}`: each copy resolved with its index (identical copies once);
        the first copy that is wrong is reported, not the same mistake once per copy."""
        path = (*place.base, name)
        count = self._repeat(node, scope, path) or 1
        if count > self._copies_left:
            if self._copies_left >= 0:  # once: the stacks that follow are left unresolved
                self.error(
                    f"stacks whose copies differ resolve to more than {MAX_COPIES:,} copies one by one",
                    (*path, "repeat"),
                    hint="repeat: counts multiply when sub-graphs are nested",
                    node=place.prefix + name,
                )
            self._copies_left = -1
            return None
        self._copies_left -= count
        found: dict[tuple[str, int, str], Use] = {}
        variants = []
        for index in range(count):
            inner = Scope({}, parent=scope, origin=path, resolved={COPY: index})
            typed = self._typed(node, inner, path)
            use = self._use(place, name, typed, inner, names, uses, index) if typed is not None else None
            if use is None:
                return None
            params = use.params.model_dump_json() if use.params is not None else ""
            variants.append(found.setdefault((use.type, id(use.body), params), use))
        if len(found) == 1:
            return variants[0]
        return dataclasses.replace(variants[0], variants=tuple(variants))

    def _use(
        self,
        place: _Place,
        name: str,
        node: NodeSpec,
        scope: Scope,
        names: dict[str, _Readable],
        uses: dict[str, Use],
        index: int = 0,
    ) -> Use | None:
        """The node resolved as written (or as copy `index` of a stack whose copies differ)."""
        path, node_id = (*place.base, name), place.prefix + name
        if ("blocks", node.type) in self.left_out:  # a sub-graph already reported wrong
            return None
        first = f"{node_id}.{index}" if node.repeat is not None else node_id  # problems name the first copy
        subgraph = self.spec.blocks.get(node.type)
        entry = None if subgraph else self._entry(node.type, path, first)
        if subgraph is None and entry is None:
            return None
        in_ports = subgraph.inputs if subgraph else [p.name for p in entry.cls.in_ports]  # type: ignore[union-attr]
        bindings, wired = self._bind(node, in_ports, names, path, node_id, place)
        repeat = self._repeat(node, scope, path)
        if subgraph and node.type in place.stack:
            self.error(f"sub-graph {node.type!r} uses itself: {' → '.join([*place.stack, node.type])}", (*path, "type"))
            return None
        if node.share is not None and (subgraph or node.repeat is not None):
            self.error("share: works on single block nodes, not on sub-graphs or repeats", (*path, "share"))
            return None
        if subgraph:
            body = self._subgraph(place, node, scope, path, first)
            return Use(name, path, node.type, bindings, repeat, body=body) if body is not None else None
        assert entry is not None
        if node.share is not None:
            owned = names.get(node.share)
            if owned is not None and owned.reported:  # the owner is already reported: this node's params are left
                if node.params:
                    self.params.validate(entry, node.params, scope, path, first)
                return None
            owner = self._owner(node, entry, path, node_id, uses)
            if owner is None:
                return None
            params = owner.params if not node.params else self.params.validate(entry, node.params, scope, path, first)
            if node.params and params is not None and params != owner.params:
                self.error(
                    f"share: params differ from those of {node.share!r}",
                    (*path, "params"),
                    hint="omit params on a sharing node; it takes its owner's",
                    node=node_id,
                )
                return None
        else:
            params = self.params.validate(entry, node.params, scope, path, first)
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
        self,
        node: NodeSpec,
        ports: list[str],
        names: dict[str, _Readable],
        path: SpecPath,
        node_id: str,
        place: _Place,
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
        valid = [ref is None or self._ref(ref, names, ref_path, place) for _, ref, ref_path in pairs]
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

    # --- a sub-graph ------------------------------------------------------------------------------------------

    def _subgraph(self, place: _Place, node: NodeSpec, scope: Scope, path: SpecPath, first: str) -> Level | None:
        """The sub-graph's nodes resolved for this use's params (once per distinct set of them)."""
        subgraph = self.spec.blocks[node.type]
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
        body = self.level(_Place(subgraph, ("blocks", node.type), first + ".", (*place.stack, node.type)), inner)
        self._bodies[key] = body
        return body


_REPEAT: TypeAdapter[int] = TypeAdapter(Repeat)


def _refs(spec_in: Any) -> list[str]:
    if spec_in is None:
        return []
    if isinstance(spec_in, str):
        return [spec_in]
    values = spec_in if isinstance(spec_in, list) else list(spec_in.values())
    return [v for v in values if v is not None]
