"""What a model costs, without allocating it: parameters, forward FLOPs and memory per node and in total.

FLOPs are counted two ways, which the tests hold against each other:

- **torch**: `torch.utils.flop_counter.FlopCounterMode` around each node's module, called on `meta` tensors of
  the node's concrete input shapes (no weight or activation is ever allocated). Identical calls (the copies
  of a `repeat:` stack, same block, params and input shapes) are measured once and reused, so a 96-layer
  model costs a handful of meta calls, not 96 layers' worth.
- **analytic**: each block's own formula (`Block.flops`, next to its shape rule; a plugin's block may have one
  too), from its params and input shapes.

Both follow torch's convention: matrix multiplications only, 2 FLOPs per multiply-accumulate (so a Linear is
2·tokens·in·out, attention 4·batch·heads·q_len·k_len·d_k, the causal mask not halving it); element-wise
work (norms, softmax, activations, residual adds, biases) is not counted.

Memory: *activations* of a node are the bytes of its outputs (numel × element size). The training estimate
uses what autograd actually saves for backward, measured on the same meta calls with
`torch.autograd.graph.saved_tensors_hooks` (docs/inspect.md lists what it assumes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import sympy
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from blockgraph.blocks.types import TensorType, as_dim, dtype_kind, symbol
from blockgraph.builder.graph import Endpoint, Graph, NodeInstance
from blockgraph.builder.shapes import TypedGraph, check_bounds
from blockgraph.builder.trial import known_dims

Shape = tuple[Any, ...]  # ints, or sympy expressions when no sizes are given
T = TypeVar("T")

#: bytes per parameter for the weight-memory line
WEIGHT_DTYPES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}


# --- analytic FLOPs -------------------------------------------------------------------------------------------


def analytic_flops(inst: NodeInstance, typed: TypedGraph, dims: dict[str, int] | None) -> int | sympy.Expr | None:
    """The block's own count (`Block.flops`, next to its shape rule): an expression of the dimensions, with the
    sizes substituted when known; None for a block that counts nothing."""
    value = inst.entry.cls.flops(inst.params, typed.input_types(inst), typed.output_types(inst))
    if value is None:
        return None
    if dims is not None and not isinstance(value, int):
        value = sympy.sympify(value).subs({symbol(n): s for n, s in dims.items()})
    return int(value) if isinstance(value, int) or getattr(value, "is_number", False) else value


# --- measurements on meta -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    """One meta call of a block module: torch's FLOPs and what autograd saved for backward."""

    flops: int
    by_op: dict[str, int]
    internal: tuple[tuple[int, torch.dtype], ...]  # (numel, dtype) of saved tensors that are not inputs/outputs
    saved_inputs: frozenset[str]  # input ports whose tensor autograd kept
    saved_outputs: frozenset[str]  # output ports whose tensor autograd kept


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def measure_call(
    module: nn.Module, args: Sequence[torch.Tensor | None], in_ports: Sequence[str], out_ports: Sequence[str]
) -> Measured:
    """Call `module(*args)` (meta tensors) under the FLOP counter and a saved-tensors hook."""
    excluded = {_storage_key(t) for t in (*module.parameters(), *module.buffers())}
    inputs = {_storage_key(a): port for a, port in zip(args, in_ports, strict=False) if a is not None}
    saved: dict[int, tuple[int, torch.dtype]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in excluded and key not in saved:
            saved[key] = (t.untyped_storage().nbytes() // max(t.element_size(), 1), t.dtype)
        return t

    with (
        torch.enable_grad(),
        FlopCounterMode(display=False) as counter,
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        result = module(*args)
    outs = result if isinstance(result, tuple) else (result,)
    outputs = {_storage_key(t): port for t, port in zip(outs, out_ports, strict=False) if isinstance(t, torch.Tensor)}
    by_op = {str(op).removeprefix("aten."): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return Measured(
        flops=int(counter.get_total_flops()),
        by_op=by_op,
        internal=tuple(v for k, v in saved.items() if k not in inputs and k not in outputs),
        saved_inputs=frozenset(inputs[k] for k in saved if k in inputs),
        saved_outputs=frozenset(outputs[k] for k in saved if k in outputs),
    )


# --- the analysis -----------------------------------------------------------------------------------------------


@dataclass
class NodeCost:
    """Everything `inspect` shows for one node; sizes are None without concrete dimensions."""

    id: str
    block: str
    params: int
    trainable: int
    input_shapes: dict[str, Shape | None]
    output_shapes: tuple[Shape, ...]
    flops: int | None = None  # torch's count
    flops_by_op: dict[str, int] = field(default_factory=dict)
    flops_analytic: int | sympy.Expr | None = None
    activation_bytes: int | None = None  # bytes of the outputs
    saved_bytes: int | None = None  # kept for backward inside the node (not its inputs or outputs)
    saved_endpoints: tuple[Endpoint, ...] = ()  # inputs and outputs autograd keeps
    error: str | None = None  # why torch could not measure it
    flops_error: str | None = None  # why the block's own formula failed (a plugin's bug): no analytic count
    active: int = 0  # of `params`, those one token's forward reads (`Block.active_parameters`: a mixture of experts')

    @property
    def shown_flops(self) -> int | None:
        """torch's count, or the block's own formula where torch could not run the node (a packed LSTM on meta)."""
        if self.flops is not None:
            return self.flops
        return self.flops_analytic if isinstance(self.flops_analytic, int) else None

    @property
    def counted_analytic(self) -> int | sympy.Expr | None:
        """The formula's count for the totals: a block without a formula that torch measures at 0 FLOPs (no matrix
        multiplication, a plugin's element-wise block) counts 0 rather than leaving the analytic total unknown."""
        if self.flops_analytic is None and self.flops_error is None and self.flops == 0:
            return 0
        return self.flops_analytic


@dataclass
class Costs:
    """A model's costs: per node (graph order) and in total, at `dims` and `dtype`."""

    name: str
    nodes: dict[str, NodeCost]
    dims: dict[str, int] | None
    dtype: torch.dtype
    parameters: int
    trainable: int
    buffer_bytes: int
    missing_dims: tuple[str, ...] = ()
    endpoint_bytes: dict[Endpoint, int] = field(default_factory=dict)
    tokens: int | None = None  # positions of one forward: the first integer input's elements (token ids)

    @property
    def concrete(self) -> bool:
        return self.dims is not None

    @property
    def active_parameters(self) -> int:
        """The parameters one token's forward reads: all of them but the experts a mixture does not route it to."""
        return sum(n.active for n in self.nodes.values())

    @property
    def flops_per_token(self) -> int | None:
        """The forward FLOPs (torch's count, else the formulas') per position of the token input, rounded."""
        flops = self.flops if self.flops is not None else self.flops_analytic
        if not self.tokens or not isinstance(flops, int):
            return None
        return round(flops / self.tokens)

    @property
    def flops(self) -> int | None:
        """torch's forward FLOPs, all nodes; None without dims or when a node could not be measured."""
        values = _known(n.flops for n in self.nodes.values())
        return None if not self.concrete or values is None else sum(values)

    @property
    def flops_analytic(self) -> int | sympy.Expr | None:
        """The blocks' formulas over all nodes (`NodeCost.counted_analytic`); None when one has none."""
        values = _known(n.counted_analytic for n in self.nodes.values())
        if values is None:
            return None
        return sum(values) if self.concrete else sympy.Add(*values)

    @property
    def activation_bytes(self) -> int | None:
        """All node outputs at once (every intermediate kept)."""
        sizes = _known(n.activation_bytes for n in self.nodes.values())  # all set when concrete
        return sum(sizes) if self.concrete and sizes is not None else None

    @property
    def saved_activation_bytes(self) -> int | None:
        """What autograd keeps for backward over one forward pass: node internals plus the tensors between nodes.

        A node torch could not run on meta (`unmeasured`) counts its outputs instead."""
        internal = _known(n.activation_bytes if n.saved_bytes is None else n.saved_bytes for n in self.nodes.values())
        if not self.concrete or internal is None:  # all set when concrete
            return None
        endpoints = {e for n in self.nodes.values() for e in n.saved_endpoints}
        return sum(internal) + sum(self.endpoint_bytes[e] for e in endpoints)

    @property
    def unmeasured(self) -> list[NodeCost]:
        """Nodes torch could not run on meta (data-dependent control flow, a plugin without meta support)."""
        return [n for n in self.nodes.values() if n.error is not None]

    def weight_bytes(self) -> dict[str, int]:
        """Parameter memory (buffers not included: `buffer_bytes`) if every parameter were stored in each dtype."""
        return {name: self.parameters * size for name, size in WEIGHT_DTYPES.items()}

    def training_bytes(self) -> dict[str, int] | None:
        """One training step with Adam at `dtype`: weights (parameters and buffers), gradients, optimizer state,
        activations (see docs)."""
        activations = self.saved_activation_bytes
        if activations is None:
            return None
        size = _itemsize(self.dtype)
        parts = {
            "weights": self.parameters * size + self.buffer_bytes,
            "gradients": self.trainable * size,
            "optimizer": self.trainable * 8,  # Adam's two moments, float32
            "master_weights": self.trainable * 4 if self.dtype != torch.float32 else 0,
            "activations": activations,
        }
        parts["total"] = sum(parts.values())
        return parts


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def parameter_counts(model: nn.Module, graph: Graph) -> dict[str, tuple[int, int]]:
    """(parameters, trainable) per node, each tensor counted once (tied weights belong to the first node)."""
    seen: set[int] = set()
    counts = {}
    for node_id, inst in graph.nodes.items():
        total = trainable = 0
        for p in model.get_submodule(inst.module_id).parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
                trainable += p.numel() if p.requires_grad else 0
        counts[node_id] = (total, trainable)
    return counts


def concrete_dims(graph: Graph, given: dict[str, int] | None = None) -> tuple[dict[str, int] | None, tuple[str, ...]]:
    """Sizes from `--dim` and the spec's `dims:`; (None, the missing names) when some input dimension has none."""
    sizes, missing = known_dims(graph, given)
    return (None, tuple(missing)) if missing else (sizes, ())


class _Concretizer:
    """Symbolic shape → ints, cached per distinct shape (a deep stack repeats the same few shapes)."""

    def __init__(self, dims: dict[str, int]):
        self.subs = {symbol(name): size for name, size in dims.items()}
        self.cache: dict[Shape, Shape] = {}

    def __call__(self, shape: Shape) -> Shape:
        found = self.cache.get(shape)
        if found is None:
            found = tuple(d if isinstance(d, int) else int(sympy.sympify(d).subs(self.subs)) for d in shape)
            self.cache[shape] = found
        return found


def analyse(
    typed: TypedGraph,
    model: nn.Module,
    dims: dict[str, int] | None = None,
    *,
    dtype: torch.dtype | None = None,
    measure: bool = True,
) -> Costs:
    """Costs of every node of a (meta) model built from `typed`.

    `dims` override the spec's `dims:`; without a size for every input dimension only symbolic shapes,
    parameters and analytic FLOP expressions are given. `dtype` is the floating dtype activations and
    training are counted in (default: the inferred types', float32). `measure=False` skips torch's count.
    """
    graph = typed.graph
    sizes, missing = concrete_dims(graph, dims)
    if sizes is not None:
        check_bounds(typed, sizes)
    first = next(iter(model.parameters()), None)
    dtype = dtype or (first.dtype if first is not None and first.is_floating_point() else torch.float32)
    counts = parameter_counts(model, graph)
    float_size = _itemsize(dtype)
    buffer_bytes = sum(  # floating buffers (positional tables, norm statistics) move to `dtype` with the model
        b.numel() * (float_size if b.is_floating_point() else b.element_size()) for b in model.buffers()
    )
    costs = Costs(
        graph.name,
        {},
        sizes,
        dtype,
        sum(p.numel() for p in model.parameters()),
        sum(p.numel() for p in model.parameters() if p.requires_grad),
        buffer_bytes,
        missing,
    )
    shape_of = _Concretizer(sizes) if sizes is not None else (lambda s: s)
    if sizes is not None:
        ids = [spec for spec in graph.inputs.values() if not spec.optional and dtype_kind(spec.torch_dtype) == "int"]
        costs.tokens = math.prod(shape_of(tuple(as_dim(d) for d in ids[0].shape))) if ids else None
    itemsizes: dict[torch.dtype, int] = {}

    def nbytes(numel: int, kind: torch.dtype) -> int:
        if kind.is_floating_point:
            return numel * float_size
        if kind not in itemsizes:
            itemsizes[kind] = _itemsize(kind)
        return numel * itemsizes[kind]

    def endpoint_bytes(ep: Endpoint) -> int:
        found = costs.endpoint_bytes.get(ep)
        if found is None:
            t = typed.types[ep]
            found = costs.endpoint_bytes[ep] = nbytes(math.prod(shape_of(t.shape)), t.dtype)
        return found

    memo: dict[Any, Measured | str] = {}
    for inst in graph.nodes.values():
        in_types = typed.input_types(inst)
        out_types = typed.output_types(inst)
        ins = {port: None if t is None else shape_of(t.shape) for port, t in in_types.items()}
        outs = tuple(shape_of(t.shape) for t in out_types)
        cost = NodeCost(inst.id, inst.entry.name, *counts[inst.id], ins, outs)
        cost.active = active_parameters(inst, cost.params)
        try:
            cost.flops_analytic = analytic_flops(inst, typed, sizes)
        except Exception as exc:  # a formula is user code when it comes from a plugin: a count lost, not a report
            cost.flops_error = _failure(exc)
        if sizes is not None:
            cost.activation_bytes = sum(endpoint_bytes(Endpoint(inst.id, p.name)) for p in inst.out_ports)
            if measure:
                _measure_node(inst, model, in_types, ins, dtype, memo, cost, nbytes)
                for ep in cost.saved_endpoints:
                    endpoint_bytes(ep)
        costs.nodes[inst.id] = cost
    return costs


def active_parameters(inst: NodeInstance, total: int) -> int:
    """Of a node's `total` parameters, those one token's forward reads (`Block.active_parameters`); a rule that
    fails (a plugin's) counts them all, and a node whose module another node holds (`share:`) reads them there."""
    if not total:
        return 0
    try:
        return int(inst.entry.cls.active_parameters(inst.params, total))
    except Exception:  # a plugin's rule: every parameter counted, as without one
        return total


def _known(values: Iterable[T | None]) -> list[T] | None:
    """The values, or None when one of them is unknown."""
    found = list(values)
    return None if any(v is None for v in found) else [v for v in found if v is not None]


def _failure(exc: Exception) -> str:
    """What failed, in one line: the exception's type and the first line of its message."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()


def _params_key(params: Any) -> Any:
    try:
        hash(params)
        return params
    except TypeError:
        return params.model_dump_json()


def _measure_node(
    inst: NodeInstance,
    model: nn.Module,
    in_types: dict[str, TensorType | None],
    ins: dict[str, Shape | None],
    dtype: torch.dtype,
    memo: dict[Any, Measured | str],
    cost: NodeCost,
    nbytes: Callable[[int, torch.dtype], int],
) -> None:
    module = model.get_submodule(inst.module_id)
    ports = [p.name for p in inst.entry.cls.in_ports]
    bound = {p: ep for p, ep in inst.bindings.items() if ep is not None}
    kinds = {p: t.dtype for p, t in in_types.items() if t is not None}  # every connected port has a type
    shapes = {p: s for p, s in ins.items() if s is not None}  # and a shape
    last = max((i for i, p in enumerate(ports) if p in bound), default=-1)
    call_ports = ports[: last + 1]
    signature = tuple((p, ins[p], kinds[p], bool(bound[p].port)) if p in bound else (p, None) for p in call_ports)
    key = (inst.entry.name, _params_key(inst.params), signature, tuple(p.requires_grad for p in module.parameters()))
    found = memo.get(key)
    if found is None:
        first = next(iter(module.parameters()), None)
        device = first.device if first is not None else torch.device("meta")

        def argument(p: str) -> torch.Tensor | None:
            if p not in bound:
                return None
            kind = kinds[p]
            from_node = bool(bound[p].port)  # a node's output carries gradient; a spec input does not
            if kind.is_floating_point:
                kind = next((q.dtype for q in module.parameters() if q.is_floating_point()), dtype)
            return torch.empty(shapes[p], dtype=kind, device=device, requires_grad=from_node and kind.is_floating_point)

        was = {m: m.training for m in module.modules()}
        module.train()
        try:
            args = [argument(p) for p in call_ports]  # a size beyond what torch can index fails here
            found = measure_call(module, args, call_ports, [p.name for p in inst.out_ports])
        except Exception as exc:  # a block without meta support (data-dependent control flow, a plugin)
            found = _failure(exc)
        finally:
            for m, mode in was.items():
                m.training = mode
        memo[key] = found
    if isinstance(found, str):
        cost.error = found
        return
    cost.flops, cost.flops_by_op = found.flops, found.by_op
    cost.saved_bytes = sum(nbytes(numel, kind) for numel, kind in found.internal)
    cost.saved_endpoints = (
        *(bound[p] for p in sorted(found.saved_inputs)),
        *(Endpoint(inst.id, p) for p in sorted(found.saved_outputs)),
    )
