"""Typed graph → `nn.Module` whose `forward` is generated Python: no per-call interpretation of the graph.

The forward is straight-line code, one call per block in graph order: submodules bound from `_modules` once
per call (not through `nn.Module.__getattr__`), every port after the first passed by name as the spec wrote
it, and each intermediate `del`eted after its last use. It is readable (`model.code`, `inspect --code`),
traceable by `torch.export`, and `torch.compile`-able.
"""

from __future__ import annotations

import contextlib
import itertools
import keyword
import linecache
import re
from collections.abc import Iterable
from typing import Any, Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from blockgraph.builder.graph import Endpoint, Graph, NodeInstance
from blockgraph.builder.model import GraphModel
from blockgraph.builder.shapes import TypedGraph
from blockgraph.common.errors import Problem, ProblemList, SpecError


def compile_graph(
    typed: TypedGraph, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> GraphModel:
    """Instantiate every block (on `device`, or `meta` for a weightless model) and bind the generated forward.

    With `dtype`, each block is converted as soon as it is built, so that the model never exists whole in the
    dtype its blocks make (a 7B model in bfloat16 never takes its float32 size; builder.footprint counts it)."""
    graph = typed.graph
    cls = model_class(typed)
    model = cls()
    target = torch.device(device or "cpu")
    with torch.device(target), _SkipInitOnMeta() if target.type == "meta" else contextlib.nullcontext():
        for inst in graph.nodes.values():
            if inst.module_id == inst.id:
                module = _instantiate(inst, graph)
                _install(model, inst.id, module if dtype is None else module.to(dtype))
    _tie(model, graph)
    return model


_INIT_FUNCTIONS = frozenset(
    {
        *(getattr(nn.init, name) for name in nn.init.__all__ if name.endswith("_") and hasattr(nn.init, name)),
        torch.Tensor.uniform_,
        torch.Tensor.normal_,
        torch.Tensor.zero_,
        torch.Tensor.fill_,
    }
)


class _SkipInitOnMeta(TorchFunctionMode):
    """Weight initialisation on the meta device is a no-op that still costs Python time (decompositions): skip it.

    A meta tensor has no values, so `nn.init.kaiming_uniform_(w)` and friends return `w` unchanged here; every
    other call goes through. A weightless build (`device="meta"`) takes about a third less time.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _INIT_FUNCTIONS:
            tensor = args[0] if args else next(iter(kwargs.values()), None)
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


def _instantiate(inst: NodeInstance, graph: Graph) -> nn.Module:
    """One block's module; a failure (a bad pretrained file, a plugin bug) is a located error."""
    try:
        return inst.entry.cls(inst.params)
    except Exception as exc:
        origin = "" if inst.entry.source == "built-in" else f" (from {inst.entry.source})"
        raise SpecError(
            Problem(
                f"cannot build block {inst.entry.name!r}{origin}: {exc}",
                graph.locate((*inst.spec_path, "params")),
                node=inst.id,
            )
        ) from exc


def _tie(model: nn.Module, graph: Graph) -> None:
    """Make each `tie:` target parameter the very tensor of its source; shapes must agree."""
    problems = ProblemList()
    ties = graph.ties
    for target, source in ties.items():
        where = graph.locate(("tie", target))
        try:
            shared = model.get_parameter(source)
            owner_path, _, attr = target.rpartition(".")
            owner = model.get_submodule(owner_path)
            current = model.get_parameter(target)
        except AttributeError as exc:
            problems.add(
                Problem(
                    f"tie {target} → {source}: {exc}",
                    where,
                    hint="names are state_dict keys: `blockgraph inspect SPEC --params` lists them",
                )
            )
            continue
        if current.shape != shared.shape:
            problems.add(
                Problem(f"tie {target} {list(current.shape)} → {source} {list(shared.shape)}: shapes differ", where)
            )
            continue
        setattr(owner, attr, shared)
    problems.raise_if_errors()


_SOURCES = itertools.count(1)  # one linecache key per compiled model: two models of one spec keep their own code


def load_source(code: str, label: str) -> dict[str, Any]:
    """The functions of generated `code`, under a linecache key of their own, so tracebacks show the lines."""
    filename = f"<blockgraph {label} #{next(_SOURCES)}>"
    namespace: dict[str, Any] = {"Tensor": torch.Tensor, "Optional": Optional}
    exec(compile(code, filename, "exec", dont_inherit=True), namespace)  # annotations evaluated, not strings
    linecache.cache[filename] = (len(code), None, code.splitlines(keepends=True), filename)
    return namespace


def model_class(typed: TypedGraph) -> type[GraphModel]:
    graph = typed.graph
    code = generate_forward(graph)
    namespace = load_source(code, graph.name)
    class_name = "".join(part.capitalize() for part in re.split(r"[^A-Za-z0-9]+", graph.name) if part) or "Model"
    return type(
        class_name if class_name[0].isalpha() else "Model" + class_name,
        (GraphModel,),
        {"forward": namespace["forward"], "code": code, "spec_name": graph.name, "typed_graph": typed},
    )


def _install(model: nn.Module, node_id: str, module: nn.Module) -> None:
    """Place a block at its dotted path, creating ModuleList (repeats) / ModuleDict (sub-graphs) on the way."""
    parts = node_id.split(".")
    parent = model
    for depth, part in enumerate(parts[:-1]):
        child = parent._modules.get(part)
        if child is None:
            child = nn.ModuleList() if parts[depth + 1].isdigit() else nn.ModuleDict()
            parent.add_module(part, child)
        parent = child
    if isinstance(parent, nn.ModuleList):
        parent.append(module)
    else:
        parent.add_module(parts[-1], module)


class _Names:
    """Python identifiers for node outputs and containers, unique and never keywords."""

    def __init__(self, reserved: set[str]):
        self.taken = set(reserved)

    def new(self, wanted: str) -> str:
        base = re.sub(r"\W", "_", wanted)
        if not base or base[0].isdigit() or keyword.iskeyword(base) or base.startswith("_"):
            base = "v_" + base
        name, n = base, 1
        while name in self.taken:
            n += 1
            name = f"{base}_{n}"
        self.taken.add(name)
        return name


class Emitter:
    """The lines of one generated method: each block a call on a submodule bound from `_modules` once, each
    value a unique Python name (`var`: the endpoint it holds), each intermediate freed after its last use."""

    def __init__(self, header: str, inputs: list[str], reserved: tuple[str, ...] = ()):
        self.names = _Names({"self", "Tensor", "Optional", "_m", *inputs, *reserved})
        self.var: dict[Endpoint, str] = {Endpoint(n): n for n in inputs}
        self.containers: dict[str, str] = {"": "_m"}
        self.lines = [header, "    _m = self._modules"]

    def line(self, text: str) -> None:
        self.lines.append(f"    {text}")

    def container(self, path: str) -> str:
        if path not in self.containers:
            parent, _, last = path.rpartition(".")
            self.containers[path] = self.names.new("m_" + path)
            self.line(f"{self.containers[path]} = {self.container(parent)}[{last!r}]._modules")
        return self.containers[path]

    def bind(self, endpoint: Endpoint, wanted: str) -> str:
        """A new name for a value that comes from outside the calls (a decoding step's fixed values)."""
        self.var[endpoint] = self.names.new(wanted)
        return self.var[endpoint]

    def call(self, inst: NodeInstance, method: str = "", first: str = "") -> None:
        """`outputs = module(args)`, or `module.<method>(first, args)` (a decoding step with its cache)."""
        parent, _, last = inst.module_id.rpartition(".")
        arguments = _call_args(inst.entry.cls.in_ports, inst.bindings, self.var)
        if first:
            arguments = f"{first}, {arguments}" if arguments else first
        ports = inst.out_ports
        for port in ports:
            self.bind(Endpoint(inst.id, port.name), inst.id if len(ports) == 1 else f"{inst.id}_{port.name}")
        targets = ", ".join(self.var[Endpoint(inst.id, p.name)] for p in ports)
        self.line(f"{targets} = {self.container(parent)}[{last!r}]{'.' + method if method else ''}({arguments})")

    def free(self, endpoints: list[Endpoint]) -> None:
        dead = sorted(self.var[e] for e in endpoints)
        if dead:
            self.line(f"del {', '.join(dead)}")

    def source(self) -> str:
        return "\n".join(self.lines) + "\n"


def signature(inputs: dict[str, Any]) -> str:
    """`a: Tensor, b: Optional[Tensor] = None` for the required, then the optional inputs."""
    required = [f"{n}: Tensor" for n, s in inputs.items() if not s.optional]
    return ", ".join(required + [f"{n}: Optional[Tensor] = None" for n, s in inputs.items() if s.optional])


def generate_forward(graph: Graph) -> str:
    """The forward as Python source: one line per block call, submodules bound from `_modules` dicts once."""
    emit = Emitter(f"def forward(self, {signature(graph.inputs)}):", list(graph.inputs))
    dies_at = last_uses(graph.nodes.values(), graph.outputs.values())
    for index, inst in enumerate(graph.nodes.values()):
        emit.call(inst)
        emit.free(dies_at.get(index, []))
    if graph.single_output:
        emit.line(f"return {emit.var[graph.outputs['output']]}")
    else:
        items = ", ".join(f"{name!r}: {emit.var[ep]}" for name, ep in graph.outputs.items())
        emit.line(f"return {{{items}}}")
    return emit.source()


def _call_args(ports: tuple, bindings: dict[str, Endpoint | None], var: dict[Endpoint, str]) -> str:
    """The first port by position, every other bound port by name (`attn(x, key_padding_mask=pad)`), as the
    spec wrote them; unbound optional ports keep their defaults."""
    args = []
    for index, port in enumerate(ports):
        bound = bindings.get(port.name)
        if bound is not None:
            args.append(var[bound] if index == 0 else f"{port.name}={var[bound]}")
    return ", ".join(args)


def last_uses(nodes: Iterable[NodeInstance], kept: Iterable[Endpoint]) -> dict[int, list[Endpoint]]:
    """Index in `nodes` → the node outputs made there or before that no later node reads (what may be freed
    after that call); the endpoints `kept` (returned) are never freed."""
    last: dict[Endpoint, int] = {}
    for index, inst in enumerate(nodes):
        for endpoint in inst.bindings.values():
            if endpoint is not None and endpoint.port:
                last[endpoint] = index
        for port in inst.out_ports:
            last.setdefault(Endpoint(inst.id, port.name), index)
    for endpoint in kept:
        last.pop(endpoint, None)
    dies_at: dict[int, list[Endpoint]] = {}
    for endpoint, index in last.items():
        dies_at.setdefault(index, []).append(endpoint)
    return dies_at
