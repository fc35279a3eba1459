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
from typing import Any, Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from builder.graph import Endpoint, Graph, NodeInstance
from builder.model import GraphModel
from builder.shapes import TypedGraph
from common.errors import Problem, ProblemList, SpecError


def compile_graph(
    typed: TypedGraph, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> GraphModel:
    """Instantiate every block (on `device`, or `meta` for a weightless model) and bind the generated forward."""
    graph = typed.graph
    cls = model_class(typed)
    model = cls()
    target = torch.device(device or "cpu")
    with torch.device(target), _SkipInitOnMeta() if target.type == "meta" else contextlib.nullcontext():
        for inst in graph.nodes.values():
            if inst.module_id == inst.id:
                _install(model, inst.id, _instantiate(inst, graph))
    _tie(model, graph)
    if dtype is not None:
        model.to(dtype)
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
                Problem(f"tie {target} → {source}: {exc}", where, hint="names are state_dict keys; see inspect")
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


def model_class(typed: TypedGraph) -> type[GraphModel]:
    graph = typed.graph
    code = generate_forward(graph)
    filename = f"<blockgraph {graph.name} #{next(_SOURCES)}>"
    namespace: dict[str, Any] = {"Tensor": torch.Tensor, "Optional": Optional}
    exec(compile(code, filename, "exec", dont_inherit=True), namespace)  # annotations evaluated, not strings
    linecache.cache[filename] = (len(code), None, code.splitlines(keepends=True), filename)
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


def generate_forward(graph: Graph) -> str:
    """The forward as Python source: one line per block call, submodules bound from `_modules` dicts once."""
    required = [n for n, s in graph.inputs.items() if not s.optional]
    optional = [n for n, s in graph.inputs.items() if s.optional]
    names = _Names({"self", "Tensor", "Optional", *graph.inputs})
    var: dict[Endpoint, str] = {Endpoint(n): n for n in graph.inputs}
    containers: dict[str, str] = {"": "_m"}
    names.taken.add("_m")
    args = [f"{n}: Tensor" for n in required] + [f"{n}: Optional[Tensor] = None" for n in optional]
    lines = [f"def forward(self, {', '.join(args)}):", "    _m = self._modules"]

    def container(path: str) -> str:
        if path not in containers:
            parent, _, last = path.rpartition(".")
            containers[path] = names.new("m_" + path)
            lines.append(f"    {containers[path]} = {container(parent)}[{last!r}]._modules")
        return containers[path]

    dies_at: dict[int, list[Endpoint]] = {}
    for endpoint, index in _last_uses(graph).items():
        if endpoint.port:
            dies_at.setdefault(index, []).append(endpoint)
    for index, inst in enumerate(graph.nodes.values()):
        parent, _, last = inst.module_id.rpartition(".")
        call_args = _call_args(inst.entry.cls.in_ports, inst.bindings, var)
        ports = inst.out_ports
        for port in ports:
            var[Endpoint(inst.id, port.name)] = names.new(inst.id if len(ports) == 1 else f"{inst.id}_{port.name}")
        targets = ", ".join(var[Endpoint(inst.id, p.name)] for p in ports)
        lines.append(f"    {targets} = {container(parent)}[{last!r}]({call_args})")
        dead = sorted(var[e] for e in dies_at.get(index, ()))
        if dead:
            lines.append(f"    del {', '.join(dead)}")
    if graph.single_output:
        lines.append(f"    return {var[graph.outputs['output']]}")
    else:
        items = ", ".join(f"{name!r}: {var[ep]}" for name, ep in graph.outputs.items())
        lines.append(f"    return {{{items}}}")
    return "\n".join(lines) + "\n"


def _call_args(ports: tuple, bindings: dict[str, Endpoint | None], var: dict[Endpoint, str]) -> str:
    """The first port by position, every other bound port by name (`attn(x, key_padding_mask=pad)`), as the
    spec wrote them; unbound optional ports keep their defaults."""
    args = []
    for index, port in enumerate(ports):
        bound = bindings.get(port.name)
        if bound is not None:
            args.append(var[bound] if index == 0 else f"{port.name}={var[bound]}")
    return ", ".join(args)


def _last_uses(graph: Graph) -> dict[Endpoint, int]:
    """For each node output, the index of the last node that reads it (outputs of the model are never freed)."""
    last: dict[Endpoint, int] = {}
    for index, inst in enumerate(graph.nodes.values()):
        for endpoint in inst.bindings.values():
            if endpoint is not None:
                last[endpoint] = index
        for port in inst.out_ports:
            last.setdefault(Endpoint(inst.id, port.name), index)
    for endpoint in graph.outputs.values():
        last.pop(endpoint, None)
    return last
