"""The spec as resolution read it, written back out as a spec of its own (`validate --resolved`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from blockgraph.blocks import REGISTRY
from blockgraph.builder.block_params import path_params
from blockgraph.builder.resolve import Level, Use
from blockgraph.builder.spec import Spec


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
    if spec.roles.loss:
        data["roles"] = spec.roles.model_dump()
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
        copies = [use.copy(index) for index in range(use.repeat or 1)]
        types = [self._subgraph(copy) if copy.body is not None else copy.type for copy in copies]
        node: dict[str, Any] = {"type": per_copy(types)}
        if use.params is not None and use.share is None:  # a sharing node takes its owner's params
            params = [self._params(copy) if copy.params is not None else {} for copy in copies]
            # the spec gave every copy the same keys: one that another copy's block lacks holds its default
            common = [key for key in params[0] if all(key in each for each in params)]
            node["params"] = {key: per_copy([each[key] for each in params]) for key in common}
        bindings = {port: ref for port, ref in use.bindings.items() if ref is not None}  # skipped: unconnected
        if any(copy.bindings != use.bindings for copy in copies):  # copies naming their ports otherwise: by position
            node["in"] = list(use.bindings.values())
        elif bindings:
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
        for name in path_params(use.entry):
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


def per_copy(values: list[Any]) -> Any:
    """The value of every copy of a stack: itself when they agree, else a `${...}` picking each copy's by its index,
    the shorter of a repeating list (`${['local', 'global'][copy % 2]}`) and the runs in order."""
    if all(value == values[0] for value in values):
        return values[0]
    period = next(p for p in range(1, len(values) + 1) if all(v == values[i % p] for i, v in enumerate(values)))
    cycle = f"[{', '.join(map(repr, values[:period]))}][copy % {period}]" if period < len(values) else None
    runs: list[tuple[Any, int]] = []  # (value, the first copy after its run)
    for index, value in enumerate(values):
        if runs and runs[-1][0] == value:
            runs[-1] = (value, index + 1)
        else:
            runs.append((value, index + 1))
    chained = " else ".join(f"{value!r} if copy < {end}" for value, end in runs[:-1]) + f" else {runs[-1][0]!r}"
    return "${" + min(filter(None, (cycle, chained)), key=len) + "}"


def _outputs(level: Level) -> str | dict[str, str]:
    if level.single:
        return next(ref for ref, _ in level.outputs.values())
    return {name: ref for name, (ref, _) in level.outputs.items()}
