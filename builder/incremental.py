"""Decoding step by step, compiled from the typed graph, for any spec whose blocks can step.

Given the inputs that grow while decoding (the target tokens, and their padding mask), the graph splits in two:
the nodes that depend only on the other inputs (the source: the encoder, its padding mask) run once per batch
in `start`; the nodes that depend on the growing inputs run in `step`, on the new positions only, each as its
block declares (`Block.stepping`, see blocks.stepping): a position-wise block on the new positions, a stateful
one through `step(cache, ...)`. Both functions are generated Python, like the model's forward
(`StepProgram.code`), and share the model's modules.

A spec with a block that cannot step (bidirectional self-attention over the target, pooling over positions, a
plugin block that declares nothing) gets a `Rerun`: the same interface, re-running the whole model on the prefix
at every step, exact but slower; `reason` says which block.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from blockgraph.blocks.registry import Block
from blockgraph.blocks.stepping import StepCache, Stepping
from blockgraph.builder.compile import Emitter, last_uses, load_source, signature
from blockgraph.builder.graph import Endpoint, Graph
from blockgraph.builder.model import GraphModel
from blockgraph.builder.shapes import TypedGraph
from blockgraph.common.errors import Problem, UsageError


class CannotStep(Exception):
    """The model cannot decode step by step; the message says which node and why."""


@dataclass(frozen=True)
class StepPlan:
    """Which nodes run once per batch and which at every step, and the values handed from one to the other."""

    growing: tuple[str, ...]  # inputs that bring new positions at every step
    fixed: tuple[str, ...]  # inputs read once per batch
    start_nodes: tuple[str, ...]  # nodes of the fixed inputs only, that the steps need
    step_nodes: tuple[tuple[str, Stepping], ...]  # nodes of the growing inputs, and how each steps
    state_ports: tuple[dict[str, bool], ...]  # per stateful node: its connected ports, True where they grow
    carried: tuple[Endpoint, ...]  # values of `start` that the steps read
    batch_axes: tuple[int | None, ...]  # per carried value: its batch axis (reordered with the batch), if any
    output: Endpoint
    last_only: tuple[str, Endpoint] | None  # (node, its growing input) from which only the last position is computed
    shares: bool  # every step node that reads a carried batch keeps one row per source (Block.shares_fixed)


def _dim(dims: tuple[Any, ...], axis: int) -> str | None:
    return str(dims[axis]) if len(dims) > axis else None


def _axis(dims: tuple[Any, ...], batch: str | None) -> int | None:
    """Where the batch dimension is in a value's shape (an initial LSTM state has it second), if anywhere."""
    return next((i for i, d in enumerate(dims) if str(d) == batch), None) if batch is not None else None


def plan_steps(typed: TypedGraph, growing: Sequence[str], output: str | None = None) -> StepPlan:
    """Split the graph for decoding with `growing` inputs ([batch, length, …] each), up to the output `output`."""
    graph = typed.graph
    first = graph.inputs[growing[0]].shape
    batch, length = _dim(tuple(first), 0), _dim(tuple(first), 1)
    for name in growing:
        shape = tuple(graph.inputs[name].shape)
        if _dim(shape, 0) != batch or _dim(shape, 1) != length:
            raise CannotStep(f"the growing inputs {', '.join(growing)} must share [batch, length] (input {name!r})")
    target = graph.outputs[output or next(iter(graph.outputs))]
    grows = {Endpoint(name) for name in growing}
    needed = _ancestors(graph, target)
    start_nodes: list[str] = []
    step_nodes: list[tuple[str, Stepping]] = []
    state_ports: list[dict[str, bool]] = []
    step_ports: list[dict[str, bool]] = []  # per step node
    summaries: set[Endpoint] = set()  # step nodes' outputs over all positions (a loss term): steps leave them out
    for inst in graph.nodes.values():
        if inst.id not in needed:
            continue
        ports = {port: ep in grows for port, ep in inst.bindings.items() if ep is not None}
        if not any(ports.values()):
            start_nodes.append(inst.id)
            continue
        where = f"block {inst.entry.name!r} (node {inst.id})"
        how = _stepping(inst.entry.cls, inst.params, ports, where)
        summary_in = {p.name for p in inst.entry.cls.in_ports if p.summary}
        misread = [ep for port, ep in inst.bindings.items() if ep in summaries and port not in summary_in]
        if misread:
            raise CannotStep(f"{where} reads {misread[0]}, a value over all positions that a step does not compute")
        if how == "positions":  # its growing inputs and all its outputs are [batch, length, …], summaries aside
            growing_types = [
                typed.types[ep]
                for port, ep in inst.bindings.items()
                if ep is not None and ports.get(port) and port not in summary_in
            ]
            outputs = [t for p, t in zip(inst.out_ports, typed.output_types(inst), strict=True) if not p.summary]
            if any(_dim(tuple(t.shape), 1) != length for t in (*growing_types, *outputs)):
                raise CannotStep(f"{where} works position by position, but not along the growing length {length}")
        summaries |= {Endpoint(inst.id, p.name) for p in inst.out_ports if p.summary}
        step_nodes.append((inst.id, how))
        step_ports.append(ports)
        if how == "state":
            state_ports.append(ports)
        grows |= {Endpoint(inst.id, p.name) for p in inst.out_ports}
    if target not in grows or _dim(tuple(typed.types[target].shape), 1) != length:
        raise CannotStep(f"the output {output or 'output'} does not grow with the inputs {', '.join(growing)}")
    reads = {ep for node, _ in step_nodes for ep in graph.nodes[node].bindings.values() if ep is not None}
    carried = tuple(ep for ep in _in_order(graph, reads - grows))
    batch_axes = tuple(_axis(tuple(typed.types[ep].shape), batch) for ep in carried)
    fixed = tuple(name for name in graph.inputs if name not in growing)
    last_only = _position_wise_tail(graph, step_nodes, grows, target)
    per_row = {ep for ep, axis in zip(carried, batch_axes, strict=True) if axis is not None}
    shares = all(
        how == "state" and _shares(graph.nodes[node].entry.cls, graph.nodes[node].params, ports)
        for (node, how), ports in zip(step_nodes, step_ports, strict=True)
        if per_row & set(graph.nodes[node].bindings.values())
    )
    return StepPlan(
        tuple(growing),
        fixed,
        tuple(start_nodes),
        tuple(step_nodes),
        tuple(state_ports),
        carried,
        batch_axes,
        target,
        last_only,
        shares,
    )


def _shares(cls: type[Block], params: Any, ports: dict[str, bool]) -> bool:
    """The block's `shares_fixed`; a plugin's rule that fails shares nothing (each row gets its copy)."""
    try:
        return bool(cls.shares_fixed(params, ports))
    except Exception:  # a plugin's rule: the safe answer
        return False


def _stepping(cls: type[Block], params: Any, ports: dict[str, bool], where: str) -> Stepping:
    """The block's declared step behaviour, checked: a plugin's rule that crashes, answers something else or
    says "state" without a `step` cannot step."""
    try:
        how = cls.stepping(params, ports)
    except Exception as exc:  # a plugin's rule: say whose, never a traceback
        raise CannotStep(f"{where}: its stepping rule failed ({type(exc).__name__})") from None
    if how is None:
        raise CannotStep(f"{where} cannot decode step by step")
    if how not in ("positions", "state"):
        raise CannotStep(f"{where}: stepping returned {str(how)[:20]!r}, not 'positions', 'state' or None")
    if how == "state" and cls.step is Block.step:
        raise CannotStep(f"{where}: stepping says 'state' but the block has no step method")
    return how


def _position_wise_tail(
    graph: Graph, step_nodes: list[tuple[str, Stepping]], grows: set[Endpoint], target: Endpoint
) -> tuple[str, Endpoint] | None:
    """Where the chain of position-wise nodes that ends at the output begins, and the growing value it reads.

    A step's caller reads the output's last position only, so the chain (a final norm and the generator,
    whose vocabulary-wide projection is the costliest node of a prompt's first step) needs only that one.
    """
    how = dict(step_nodes)
    readers: dict[Endpoint, list[str]] = {}
    for node in how:
        for ep in graph.nodes[node].bindings.values():
            if ep is not None and ep in grows:
                readers.setdefault(ep, []).append(node)
    cut, after, value = None, None, target
    while value.node in how and how[value.node] == "positions":
        inst = graph.nodes[value.node]
        read_by = {r for p in inst.out_ports for r in readers.get(Endpoint(inst.id, p.name), [])}
        growing_in = [ep for ep in inst.bindings.values() if ep is not None and ep in grows]
        if read_by - {after} or len(growing_in) != 1 or len(readers[growing_in[0]]) != 1:
            break
        cut, after, value = (inst.id, growing_in[0]), inst.id, growing_in[0]
    return cut


def _ancestors(graph: Graph, target: Endpoint) -> set[str]:
    """The nodes `target` depends on (itself included)."""
    wanted, needed = {target}, set()
    for inst in reversed(graph.nodes.values()):
        if any(Endpoint(inst.id, p.name) in wanted for p in inst.out_ports):
            needed.add(inst.id)
            wanted |= {ep for ep in inst.bindings.values() if ep is not None}
    return needed


def _in_order(graph: Graph, endpoints: set[Endpoint]) -> list[Endpoint]:
    """Inputs first (spec order), then node outputs in graph order."""
    order = [Endpoint(n) for n in graph.inputs]
    order += [Endpoint(inst.id, p.name) for inst in graph.nodes.values() for p in inst.out_ports]
    return [ep for ep in order if ep in endpoints]


def generate_steps(graph: Graph, plan: StepPlan) -> str:
    """`start(self, <fixed inputs>)` → the carried values, and `step(self, caches, carried, <growing inputs>)`."""
    fixed_inputs = {name: graph.inputs[name] for name in plan.fixed}
    start = Emitter(f"def start(self, {signature(fixed_inputs)}):", list(plan.fixed))
    nodes = [graph.nodes[node] for node in plan.start_nodes]
    dies_at = last_uses(nodes, plan.carried)
    for index, inst in enumerate(nodes):
        start.call(inst)
        start.free(dies_at.get(index, []))
    start.line(f"return {_tuple([start.var[ep] for ep in plan.carried])}")

    growing_inputs = {name: graph.inputs[name] for name in plan.growing}
    step = Emitter(
        f"def step(self, caches, carried, {signature(growing_inputs)}):", list(plan.growing), ("caches", "carried")
    )
    names = [step.bind(ep, _wanted(graph, ep)) for ep in plan.carried]
    if names:
        step.line(f"{_tuple(names).strip('()')} = carried")
    nodes = [graph.nodes[node] for node, _ in plan.step_nodes]
    dies_at = last_uses(nodes, [plan.output])
    cache = 0
    for index, (inst, (_, how)) in enumerate(zip(nodes, plan.step_nodes, strict=True)):
        if plan.last_only is not None and plan.last_only[0] == inst.id:
            name = step.var[plan.last_only[1]]
            step.line(f"{name} = {name}[:, -1:]  # the output is read at the last position only")
        if how == "state":
            step.call(inst, method="step", first=f"caches[{cache}]")
            cache += 1
        else:
            step.call(inst)
        step.free(dies_at.get(index, []))
    step.line(f"return {step.var[plan.output]}")
    return start.source() + "\n\n" + step.source()


def _tuple(names: list[str]) -> str:
    """Python for a tuple of these names: (), (a,), (a, b)."""
    return f"({names[0]},)" if len(names) == 1 else f"({', '.join(names)})"


def _wanted(graph: Graph, ep: Endpoint) -> str:
    """The name the forward gives a value: the node's, or node_port for a node with several outputs."""
    if not ep.port:
        return ep.node
    return ep.node if len(graph.nodes[ep.node].out_ports) == 1 else f"{ep.node}_{ep.port}"


@dataclass
class DecodeState:
    """Where a decoding is: each stateful node's cache, the values `start` computed (a `Rerun`: the prefix)."""

    caches: list[StepCache]
    carried: tuple[Any, ...]
    batch_axes: tuple[int | None, ...]
    prefix: dict[str, torch.Tensor] | None = None  # what a `Rerun` re-reads at every step
    shares: bool = False  # whether the sources' fixed values stay one row per source (StepPlan.shares)
    rows: int = 0  # rows of the growing values, sources × width (0: before the first step)
    width: int = 1  # rows per source

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` of the batch (beam search: the surviving hypotheses, repeats allowed). Where the steps
        share the sources' values and the kept rows stay grouped by source, as many each (beam search's), only the
        growing state follows `index`: the sources' values just lose the sources that left."""
        if self.shares:
            sources, width = _grouping(index // self.width, self.rows // self.width)
        else:
            sources, width = index, 1
        for cache in self.caches:
            cache.reorder(index, sources, width)
        if sources is not None:
            self.carried = tuple(
                value.index_select(axis, sources) if axis is not None and value is not None else value
                for value, axis in zip(self.carried, self.batch_axes, strict=True)
            )
        self.rows, self.width = len(index), width
        if self.prefix is not None:
            self.prefix = {name: value.index_select(0, index) for name, value in self.prefix.items()}

    def cache_bytes(self) -> int:
        return sum(cache.nbytes() for cache in self.caches)


def _grouping(owners: torch.Tensor, count: int) -> tuple[torch.Tensor | None, int]:
    """The sources of rows owned by `owners` (of `count` sources) and the rows per source: (None: all `count`
    sources, in order; else the sources kept) where the owners come in equal runs in increasing order, else
    (`owners`, 1): every row gets its own copy of its source's values."""
    kept, runs = torch.unique_consecutive(owners, return_counts=True)
    width = int(runs[0]) if len(runs) else 1
    if bool((runs == width).all()) and bool((kept[1:] > kept[:-1]).all()):
        return (None if len(kept) == count else kept), width
    return owners, 1


class StepProgram:
    """A built model's decoding steps: `start` once per batch, then `step` with the new positions."""

    reason: str | None = None  # why it re-runs the model (a `Rerun`); None: it steps

    def __init__(self, model: GraphModel, plan: StepPlan, *, compiled: bool = False):
        self.model, self.plan = model, plan
        self.code = generate_steps(model.typed_graph.graph, plan)
        namespace = load_source(self.code, f"{model.typed_graph.graph.name} steps")
        self._start, self._step = namespace["start"], namespace["step"]
        if compiled:
            _check_compiler(model)
            self._step = torch.compile(self._step, dynamic=True)

    def start(self, capacity: int, **fixed: torch.Tensor | None) -> DecodeState:
        """Run the nodes of the fixed inputs; `capacity` is the most positions the decoding will reach."""
        carried = self._start(self.model, **fixed)
        caches = [StepCache(capacity, ports) for ports in self.plan.state_ports]
        return DecodeState(caches, carried, self.plan.batch_axes, shares=self.plan.shares)

    def step(self, state: DecodeState, **growing: torch.Tensor | None) -> torch.Tensor:
        """The output at the new positions of the growing inputs ([batch, new, …] each); only at the last one
        where the output ends in position-wise blocks (the generator)."""
        if not state.rows:  # the first step: one row per source
            state.rows = next(t.size(0) for t in growing.values() if t is not None)
        return self._step(self.model, state.caches, state.carried, **growing)


def _check_compiler(model: nn.Module) -> None:
    """torch.compile's CPU kernels are C++ that inductor compiles: refuse early, not at the first step."""
    on_cpu = all(t.device.type == "cpu" for t in model.state_dict().values())
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if on_cpu and not compiler:
        raise UsageError(
            Problem("--compile needs a C++ compiler (g++ or clang++) on PATH for CPU kernels", hint="decode without it")
        )


class Rerun:
    """`StepProgram`'s interface for a model that cannot step: every step runs the model on everything so far."""

    def __init__(self, model: GraphModel, growing: Sequence[str], output: str | None, reason: str):
        self.model, self.reason = model, reason
        self.growing, self.output = tuple(growing), output
        graph = model.typed_graph.graph
        self.fixed = tuple(name for name in graph.inputs if name not in self.growing)
        batch = _dim(tuple(graph.inputs[self.growing[0]].shape), 0)
        self.batch_axes = tuple(_axis(tuple(graph.inputs[name].shape), batch) for name in self.fixed)
        self.code = ""

    def start(self, capacity: int, **fixed: torch.Tensor | None) -> DecodeState:
        return DecodeState([], tuple(fixed.get(name) for name in self.fixed), self.batch_axes, prefix={})

    def step(self, state: DecodeState, **growing: torch.Tensor | None) -> torch.Tensor:
        """The output at the last new position, from the whole model run on the prefix so far."""
        assert state.prefix is not None  # made by `start`
        for name, new in growing.items():
            if new is not None:
                seen = state.prefix.get(name)
                state.prefix[name] = new if seen is None else torch.cat((seen, new), dim=1)
        out = self.model(**dict(zip(self.fixed, state.carried, strict=True)), **state.prefix)
        if isinstance(out, Mapping):
            out = out[self.output or next(iter(out))]
        return out[:, -1:]


def step_program(
    model: GraphModel, growing: Sequence[str], output: str | None = None, *, compiled: bool = False
) -> StepProgram | Rerun:
    """The model's decoding steps, or a `Rerun` (with its `reason`) where a block cannot step."""
    try:
        plan = plan_steps(model.typed_graph, growing, output)
    except CannotStep as exc:
        return Rerun(model, growing, output, str(exc))
    return StepProgram(model, plan, compiled=compiled)
