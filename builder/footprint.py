"""What a model will hold in memory, counted before it exists, and the guard that refuses what will not fit.

A model too large for the machine used to allocate until the kernel's OOM killer ended the process (exit 137,
no message), or, under an address-space limit, to fail inside torch's allocator. Every command and API call
that allocates weights (build, load, train, import, consolidate, export, translate, generate) now counts its
needs on a `meta` build of the typed graph first (nothing allocated) and holds them against what
`common.memory.available` says is left, refusing with a `MemoryLimitError` that says what it needs, what is
available and which limit binds.

- **weights**: every parameter and buffer once (a tied tensor once), floating ones at the chosen dtype: what the
  built model holds, to the byte (tests/test_memory_guard.py). Building at another dtype converts each block
  as it is built, so one block in float32 is held on top (`converting`).
- **training** (Adam, as `inspect` counts it): a float32 gradient and two float32 moments per trainable
  parameter; under `--strategy fsdp` each process holds its shards (builder.sharding) but first builds the
  whole model. Activations depend on the batches, which are not known here: not counted.
- **trial run** (`build`, `export`) and **decoding** (a batch of `translate`/`generate`): the most the run
  holds at once, measured by running it on meta tensors of the real sizes (`MetaPeak`: attention scores,
  logits, the decoding caches), the inputs included; a model that cannot run on meta gets an estimate from
  builder.analysis for its trial run, and its decoding goes unchecked.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from blockgraph.builder import analysis
from blockgraph.builder.compile import compile_graph, last_uses
from blockgraph.builder.model import GraphModel
from blockgraph.builder.shapes import TypedGraph
from blockgraph.builder.sharding import per_rank
from blockgraph.builder.trial import input_shapes
from blockgraph.common import memory
from blockgraph.common.errors import MemoryLimitError, Problem
from blockgraph.common.files import size_text
from blockgraph.common.tensorfile import ITEMSIZE, TensorInfo
from blockgraph.common.text import sizes_text

#: what to do instead, for the hints of the API (the commands have their own: `build_advice`)
API_ADVICE = (
    "build(..., device='meta') allocates nothing (for its sizes: `blockgraph inspect`); build it smaller with "
    "dtype='bfloat16' or overrides (fewer layers, a smaller d_model)"
)
LOAD_ADVICE = "load it where more memory is free (another machine, a larger GPU: --device, device=)"

IMPORT_ADVICE = "an import holds the model and the checkpoint's tensors at once: import it where more memory is free"
TRAIN_ADVICE = (
    "`blockgraph inspect SPEC --dtype bfloat16 --ranks N --strategy fsdp` shows what training holds without "
    "allocating; train it smaller (--set: fewer layers, a smaller d_model) or with --strategy fsdp over "
    "processes on more machines or devices"
)


@dataclass(frozen=True)
class Need:
    """Bytes some work holds at once on `device`, by part; `copies`: processes on this machine that each hold it."""

    action: str  # what needs it, as a message starts: "building the model"
    parts: dict[str, int]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    copies: int = 1

    @property
    def total(self) -> int:
        return sum(self.parts.values()) * self.copies

    def text(self) -> str:
        """`25.11 GiB (float32 weights 25.10 GiB, trial run (batch=2, seq=16) 6.88 MiB)`."""
        shown = ", ".join(f"{name} {size_text(size)}" for name, size in self.parts.items() if size)
        each = f" in each of {self.copies} processes" if self.copies > 1 else ""
        return f"{size_text(self.total)} ({shown}{each})"


def build_advice(spec: object, *, dtype: bool = True) -> str:
    """What `blockgraph build SPEC` (or `export`, without `dtype`) can do instead of a model that does not fit."""
    smaller = "--dtype bfloat16, --set" if dtype else "--set"
    return (
        f"`blockgraph inspect {spec}` shows its sizes without allocating anything; make it smaller with "
        f"{smaller} (fewer layers, a smaller d_model) or smaller --dim trial sizes"
    )


def layout(typed: TypedGraph) -> GraphModel:
    """The model on `meta`: every tensor's shape and dtype, no memory."""
    return compile_graph(typed, device="meta")


def held_bytes(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """What `model` holds in parameters and buffers (each tensor once), floating ones at `dtype` if given."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(_nbytes(t, dtype) for t in tensors.values())


def _nbytes(tensor: torch.Tensor, dtype: torch.dtype | None) -> int:
    size = dtype.itemsize if dtype is not None and tensor.is_floating_point() else tensor.element_size()
    return tensor.numel() * size


def converting_bytes(model: GraphModel, dtype: torch.dtype | None) -> int:
    """Building at `dtype` converts each block as it is built: the largest block's floating tensors in the
    dtype they were made in, on top of the model (0 when nothing converts)."""
    if dtype is None:
        return 0
    graph = model.typed_graph.graph
    largest = 0
    for inst in graph.nodes.values():
        if inst.module_id == inst.id:
            module = model.get_submodule(inst.module_id)
            tensors = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
            if any(t.dtype != dtype for t in tensors):
                largest = max(largest, sum(_nbytes(t, None) for t in tensors))
    return largest


def weights_need(
    typed: TypedGraph,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    action: str = "building the model",
    model: GraphModel | None = None,
) -> Need:
    """The built model's parameters and buffers at `dtype` (as `compile_graph` makes them) on `device`."""
    model = model or layout(typed)
    return Need(action, _weights(model, dtype), torch.device(device))


def _weights(model: GraphModel, dtype: torch.dtype | None) -> dict[str, int]:
    name = str(dtype or next((p.dtype for p in model.parameters()), torch.float32)).removeprefix("torch.")
    parts = {f"{name} weights": held_bytes(model, dtype)}
    converting = converting_bytes(model, dtype)
    if converting:
        parts["converting one block"] = converting
    return parts


def trial_bytes(typed: TypedGraph, model: GraphModel, dims: Mapping[str, int]) -> int:
    """The most a trial run at `dims` holds at once, weights aside, in the dtype of `model` (a meta layout): the
    generated forward run on meta tensors (`MetaPeak`), or, where a block cannot run on meta (data-dependent
    code, a plugin) or would take long (a recurrence over many positions), an estimate from the node outputs
    still to be read and the running node's internals."""
    graph = typed.graph
    sizes = dict(dims)
    model.eval()  # as the trial run: no dropout masks
    floats = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    shapes = input_shapes(graph, sizes)  # the trial inputs' own limit first
    try:
        with torch.no_grad(), MetaPeak(model, budget=op_budget(typed)) as peak:
            kinds = {name: graph.inputs[name].torch_dtype for name in shapes}
            inputs = {
                name: torch.zeros(shape, dtype=floats if kinds[name].is_floating_point else kinds[name], device="meta")
                for name, shape in shapes.items()
            }
            model(**inputs)
        return peak.peak
    except Exception:  # a block without meta support (it reads values), a long recurrence: estimated instead
        return _estimated_trial(typed, model, sizes, floats)


def _estimated_trial(typed: TypedGraph, model: GraphModel, dims: dict[str, int], floats: torch.dtype) -> int:
    """The inputs and, node by node along the generated forward, the outputs still to be read plus the running
    node's internals (what autograd keeps of it, measured by builder.analysis): the largest such sum."""
    graph = typed.graph
    costs = analysis.analyse(typed, model, dims, dtype=floats)
    live = 0
    for spec in graph.inputs.values():
        if not spec.optional:
            shape = [d if isinstance(d, int) else dims[d] for d in spec.shape]
            live += math.prod(shape) * (floats if spec.torch_dtype.is_floating_point else spec.torch_dtype).itemsize
    dies = last_uses(graph.nodes.values(), graph.outputs.values())
    peak = live
    for index, inst in enumerate(graph.nodes.values()):
        cost = costs.nodes[inst.id]
        made = cost.activation_bytes or 0
        peak = max(peak, live + made + (cost.saved_bytes or 0))
        live += made - sum(costs.endpoint_bytes.get(e, 0) for e in dies.get(index, []))
    return peak


def build_need(
    typed: TypedGraph,
    dims: Mapping[str, int],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    model: GraphModel | None = None,
) -> Need:
    """`build`: the weights at `dtype` and one trial run at `dims` in it. `model`: a meta layout, converted."""
    model = model or layout(typed)
    parts = _weights(model, dtype)
    if dtype is not None:
        model.to(dtype)  # on meta: no memory, no time
    parts[f"trial run ({sizes_text(dict(dims))})"] = trial_bytes(typed, model, dims)
    return Need("building and running the model", parts, torch.device(device))


def trial_need(
    typed: TypedGraph, dims: Mapping[str, int], *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Need:
    """One trial run at `dims`, in `dtype`, of a model that exists already (loaded): its activations only."""
    model = compile_graph(typed, device="meta", dtype=dtype)
    parts = {f"trial run ({sizes_text(dict(dims))})": trial_bytes(typed, model, dims)}
    return Need("running the model once", parts, torch.device(device))


def import_need(layout_model: GraphModel, tensors: Iterable[TensorInfo]) -> Need:
    """Importing a checkpoint: the model (`layout_model`, on meta at the import's dtype) and every tensor of the
    checkpoint read at once (`tensors`, their headers) before they are copied in."""
    read = sum(math.prod(t.shape) * ITEMSIZE[t.dtype] for t in tensors)
    return Need("importing the model", {"weights": held_bytes(layout_model), "checkpoint's tensors read": read})


def training_need(
    typed: TypedGraph,
    *,
    device: str | torch.device = "cpu",
    strategy: str = "ddp",
    world: int = 1,
    local: int = 1,
    compute_dtype: torch.dtype | None = None,
    action: str = "training",
    model: GraphModel | None = None,
) -> Need:
    """Training with Adam in float32 (trainer.schedule) on `world` processes, `local` of them on this machine's
    `device` when it is the CPU: the weights, gradients and optimizer state one process holds (activations
    aside, see the module notes)."""
    model = model or layout(typed)
    weights = held_bytes(model)
    trainable = {id(p): p for p in model.parameters() if p.requires_grad}
    elements = sum(p.numel() for p in trainable.values())
    parts = {
        "float32 weights": weights,
        "gradients": elements * 4,
        "Adam's moments": elements * 8 + 4 * len(trainable),
    }
    if strategy == "fsdp" and world > 1:  # each process builds the whole model, then keeps its shards
        compute = compute_dtype.itemsize if compute_dtype is not None else 4
        shares = per_rank(model, world, "fsdp", compute_bytes=compute)
        buffers = held_bytes(model) - sum(p.numel() * p.element_size() for p in model.parameters())
        sharded = {
            "float32 weights (shards)": shares.parameters + buffers,
            "gradients (shards)": shares.gradients,
            "Adam's moments (shards)": shares.optimizer,
            "gathered layers": shares.gathered,
        }
        if sum(sharded.values()) < weights:
            sharded = {"float32 weights (whole, before sharding)": weights}
        parts = sharded
    place = torch.device(device)
    return Need(action, parts, place, copies=local if place.type == "cpu" else 1)


def op_budget(typed: TypedGraph) -> int:
    """Operations a forward of `typed` may take on meta before it counts as too long to measure: a few times what
    the shipped specs take (30 to 50 per node), so that only a recurrence over many positions (about 30 operations
    per position) runs out."""
    return 2000 + 200 * len(typed.graph.nodes)


class TooLong(Exception):
    """Code run under `MetaPeak` took more operations than its budget (a recurrence over a long sequence)."""


class MetaPeak(TorchDispatchMode):
    """While active, the bytes of the `meta` tensors that ops make and that are still alive, and the most at once:
    what running the same code on a real device would hold (the model's own tensors, `excluded`, aside).

    A storage counts once, from the first tensor on it until the last one is gone (views included). Past
    `budget` operations it raises `TooLong`: a recurrence steps through every position, even on meta."""

    def __init__(self, excluded: nn.Module | None = None, *, budget: int = 20_000):
        super().__init__()
        held = (*excluded.parameters(), *excluded.buffers()) if excluded is not None else ()
        self.excluded = {t.untyped_storage()._cdata for t in held}
        self.live = self.peak = 0
        self.budget = budget
        self._storages: dict[int, list[int]] = {}  # storage → [tensors alive on it, bytes]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, tuple | list) else (out,)
        self.budget -= max(1, len(outs))  # a recurrence unbinds its positions: each one counts
        if self.budget < 0:
            raise TooLong(f"more operations than the budget, at {func}")
        for tensor in tree_leaves(outs):
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                self._track(tensor)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.excluded:
            return
        entry = self._storages.get(key)
        if entry is None:
            entry = self._storages[key] = [0, storage.nbytes()]
            self.live += entry[1]
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        weakref.finalize(tensor, self._release, key).atexit = False

    def _release(self, key: int) -> None:
        entry = self._storages[key]
        entry[0] -= 1
        if entry[0] == 0:
            del self._storages[key]
            self.live -= entry[1]


def checking(device: str | torch.device) -> bool:
    """Whether a need on `device` would be checked at all: not skipped, not meta, a device whose memory is known.
    Callers ask first, so that a skipped check costs no meta build nor trial run."""
    where = torch.device(device)
    return where.type != "meta" and not memory.skip_requested() and memory.available(where) is not None


def check(need: Need, *, hint: str = API_ADVICE, skip: bool = False) -> None:
    """Refuse `need` when it exceeds what its device has left (see common.memory): a `MemoryLimitError` saying
    what it needs, what is available and which limit binds. `skip`, `--skip-memory-check` and
    `$BLOCKGRAPH_SKIP_MEMORY_CHECK` go ahead unchecked; so does a device whose memory is unknown, or meta."""
    if skip or memory.skip_requested():
        return
    left = memory.available(need.device)
    if left is None or need.total <= left.bytes:
        return
    where = "" if need.device.type == "cpu" else f" on {need.device}"
    message = (
        f"{need.action} needs {need.text()}{where}, but {size_text(left.bytes)} is available: {left.limit}; "
        "nothing was allocated"
    )
    raise MemoryLimitError(Problem(message, hint=f"{hint}; {memory.SKIP_HINT}"))
