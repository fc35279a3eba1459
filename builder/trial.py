"""Trial runs: the sizes of a spec's named dimensions, random inputs of those sizes, and one checked forward pass.

`build`, `export` and the tests run a model once on such inputs; every block's output is held against its own
shape rule, so a block (often a plugin's) whose module and rule disagree is named, not a torch error deep in
the forward.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from blockgraph.blocks.types import TensorType, format_shape, symbol
from blockgraph.builder.graph import Graph
from blockgraph.builder.model import GraphModel
from blockgraph.builder.shapes import block_bug, check_bounds
from blockgraph.common.errors import Problem, SpecError, UsageError
from blockgraph.common.files import GiB, size_text
from blockgraph.common.text import sizes_text

MAX_TRIAL_BYTES = 2 * GiB


def known_dims(graph: Graph, given: dict[str, int] | None = None) -> tuple[dict[str, int], list[str]]:
    """The sizes known (`--dim` first, then the spec's `dims:`) and the inputs' named dimensions without one."""
    sizes = {**graph.dims, **(given or {})}
    missing = sorted({d for s in graph.inputs.values() for d in s.shape if isinstance(d, str) and d not in sizes})
    return sizes, missing


def resolve_dims(graph: Graph, given: dict[str, int] | None = None) -> dict[str, int]:
    """Concrete sizes for every named dimension of the inputs: `--dim` first, then the spec's `dims:`."""
    sizes, missing = known_dims(graph, given)
    if missing:
        raise SpecError(
            Problem(
                f"no size for dimension(s) {', '.join(missing)}",
                graph.locate(("dims",)),
                hint=" ".join(f"--dim {d}=N" for d in missing) + ", or declare them under dims:",
            )
        )
    return sizes


def input_shapes(graph: Graph, dims: dict[str, int], dtype: torch.dtype | None = None) -> dict[str, tuple[int, ...]]:
    """The shapes of a trial run's inputs (optional ones left out), refused when they would take more than
    `MAX_TRIAL_BYTES` in all: a limit of its own, said before the memory a run needs is counted."""
    shapes = {
        name: tuple(d if isinstance(d, int) else dims[d] for d in spec.shape)
        for name, spec in graph.inputs.items()
        if not spec.optional
    }
    total = sum(math.prod(shape) * (dtype or graph.inputs[n].torch_dtype).itemsize for n, shape in shapes.items())
    if total > MAX_TRIAL_BYTES:
        sizes = sizes_text(dims)
        raise UsageError(
            Problem(
                f"the trial inputs would take {size_text(total)} at {sizes}",
                hint=f"trial runs take at most {size_text(MAX_TRIAL_BYTES)} of inputs; give smaller sizes with --dim",
            )
        )
    return shapes


def dummy_inputs(
    graph: Graph,
    dims: dict[str, int],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random inputs for a trial run: integers below `high` (default 2), masks all False; optional inputs left out.

    Inputs of more than `MAX_TRIAL_BYTES` in all are refused before anything is allocated (`input_shapes`).
    """
    generator = torch.Generator().manual_seed(seed)
    shapes = input_shapes(graph, dims, dtype)
    tensors = {}
    for name, shape in shapes.items():
        spec = graph.inputs[name]
        kind = spec.torch_dtype
        if kind == torch.bool:
            value = torch.zeros(shape, dtype=torch.bool)
        elif kind.is_floating_point:
            value = torch.randn(shape, generator=generator).to(dtype or kind)
        else:
            value = torch.randint(0, spec.high or 2, shape, generator=generator, dtype=kind)
        tensors[name] = value.to(device)
    return tensors


def concrete_shape(tensor_type: TensorType, dims: dict[str, int]) -> tuple[int, ...]:
    """Substitute sizes for the symbols of an inferred shape."""
    subs = {symbol(name): size for name, size in dims.items()}
    out = []
    for d in tensor_type.shape:
        value = d if isinstance(d, int) else d.subs(subs)
        out.append(int(value) if getattr(value, "is_number", True) else value)
    return tuple(out)


def trial_run(model: GraphModel, inputs: dict[str, torch.Tensor], dims: dict[str, int]) -> Any:
    """One forward pass that also checks every block's output against its inferred shape.

    A block whose module disagrees with its own shape rule (typically a plugin) is named, with both shapes.
    A module shared by several nodes (`share:`) is called once per node, in graph order.
    """
    typed = model.typed_graph
    graph = typed.graph
    check_bounds(typed, dims)
    mismatches: list[Problem] = []
    calls: dict[str, list[str]] = {}
    for inst in graph.nodes.values():
        calls.setdefault(inst.module_id, []).append(inst.id)

    running: list[str] = []  # nodes whose forward has started and not finished: the last one raised

    def checker(queue: list[str]):
        pending = iter(queue)

        def before(module: torch.nn.Module, args: Any) -> None:
            running.append(next(pending))

        def after(module: torch.nn.Module, args: Any, output: Any) -> None:
            inst = graph.nodes[running.pop()]
            expected = [concrete_shape(t, dims) for t in typed.output_types(inst)]
            got = output if isinstance(output, tuple) else (output,)
            for port, want, tensor in zip(inst.out_ports, expected, got, strict=False):
                if isinstance(tensor, torch.Tensor) and tuple(tensor.shape) != want:
                    message = (
                        f"produced {list(tensor.shape)} on port {port.name!r}, "
                        f"but its shape rule promised {format_shape(want)}"
                    )
                    hint = "the block's infer() and its forward() disagree; fix the block"
                    mismatches.append(block_bug(graph, inst, message, hint))

        return before, after

    handles = []
    for module_id, queue in calls.items():
        module = model.get_submodule(module_id)
        before, after = checker(queue)
        handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        with torch.no_grad():
            outputs = model(**inputs)
    except Exception as exc:
        if not running:
            raise
        inst = graph.nodes[running[-1]]
        sizes = sizes_text(dims)
        message = f"failed on the trial inputs ({sizes}): {type(exc).__name__}: {exc}"
        hint = "check the sizes and value ranges the inputs declare (shape, high) against the block's params"
        raise SpecError(
            Problem(f"block {inst.entry.name!r}: {message}", graph.locate(inst.spec_path), hint, node=inst.id)
        ) from exc
    finally:
        for handle in handles:
            handle.remove()
    if mismatches:
        raise SpecError(mismatches)
    return outputs
