"""The Python API: the pipeline load → validate → graph → shapes → compile, one call per stage or all at once."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from blocks.types import TensorType, format_shape, symbol
from builder.compile import GraphModel, compile_graph
from builder.graph import Graph, assemble
from builder.plugins import activate
from builder.shapes import TypedGraph, block_bug, check_bounds, infer_shapes
from builder.source import Document, SourceMap, load_file
from builder.spec import DTYPES
from builder.validate import ValidSpec, validate_document
from common.errors import Location, Problem, SpecError, UsageError
from common.files import GiB, size_text

SpecSource = str | Path | dict[str, Any] | ValidSpec
MAX_TRIAL_BYTES = 2 * GiB


def use_plugins(plugins: Sequence[str] = (), *, allow_override: bool = False) -> None:
    """Make installed plugin packages, `$BLOCKGRAPH_PLUGINS` and these plugins' blocks available."""
    for problem in activate(plugins, allow_override=allow_override):
        warnings.warn(str(problem), stacklevel=3)


def load_spec(
    source: SpecSource,
    overrides: dict[str, Any] | None = None,
    *,
    plugins: Sequence[str] = (),
    allow_external_files: bool = False,
) -> ValidSpec:
    """A spec file (or a mapping already in memory) validated, with `--set`-style variable overrides applied.

    `allow_external_files` lets the spec name files outside its folder (docs/security.md).
    """
    use_plugins(plugins)
    if isinstance(source, ValidSpec):
        return source
    document = Document(source, SourceMap("<dict>")) if isinstance(source, dict) else load_file(source)
    return validate_document(document, overrides, allow_external_files=allow_external_files)


def typed_graph(
    source: SpecSource,
    overrides: dict[str, Any] | None = None,
    *,
    plugins: Sequence[str] = (),
    allow_external_files: bool = False,
) -> TypedGraph:
    """Everything short of allocating weights: validated, wired and shape-checked."""
    valid = load_spec(source, overrides, plugins=plugins, allow_external_files=allow_external_files)
    return infer_shapes(assemble(valid))


def build(
    source: SpecSource,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    overrides: dict[str, Any] | None = None,
    plugins: Sequence[str] = (),
    allow_external_files: bool = False,
) -> GraphModel:
    """Build a spec into an ordinary `nn.Module` (weights on `device`; `meta` allocates none).

    `plugins` are files or modules whose blocks the spec may use (see docs/plugins.md); `allow_external_files`
    lets the spec name files outside its own folder (docs/security.md).
    """
    typed = typed_graph(source, overrides, plugins=plugins, allow_external_files=allow_external_files)
    return compile_graph(typed, device=device, dtype=parse_dtype(dtype))


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES or not DTYPES[dtype].is_floating_point:
        floats = [n for n, d in DTYPES.items() if d.is_floating_point]
        raise SpecError(Problem(f"--dtype {dtype!r} is not a floating dtype", hint=f"use one of {', '.join(floats)}"))
    return DTYPES[dtype]


def resolve_dims(graph: Graph, given: dict[str, int] | None = None) -> dict[str, int]:
    """Concrete sizes for every named dimension of the inputs: `--dim` first, then the spec's `dims:`."""
    declared = graph.valid.spec.dims if graph.valid else {}
    sizes = {**declared, **(given or {})}
    missing = sorted({d for s in graph.inputs.values() for d in s.shape if isinstance(d, str) and d not in sizes})
    if missing:
        raise SpecError(
            Problem(
                f"no size for dimension(s) {', '.join(missing)}",
                Location(str(graph.valid.file) if graph.valid and graph.valid.file else None, path=("dims",)),
                hint=" ".join(f"--dim {d}=N" for d in missing) + ", or declare them under dims:",
            )
        )
    return sizes


def dummy_inputs(
    graph: Graph,
    dims: dict[str, int],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random inputs for a trial run: integers below `high` (default 2), masks all False; optional inputs left out.

    Inputs of more than `MAX_TRIAL_BYTES` in all are refused before anything is allocated.
    """
    generator = torch.Generator().manual_seed(seed)
    shapes = {
        name: tuple(d if isinstance(d, int) else dims[d] for d in spec.shape)
        for name, spec in graph.inputs.items()
        if not spec.optional
    }
    total = sum(math.prod(shape) * (dtype or graph.inputs[n].torch_dtype).itemsize for n, shape in shapes.items())
    if total > MAX_TRIAL_BYTES:
        sizes = ", ".join(f"{name}={size}" for name, size in dims.items())
        raise UsageError(
            Problem(
                f"the trial inputs would take {size_text(total)} at {sizes}",
                hint=f"trial runs take at most {size_text(MAX_TRIAL_BYTES)} of inputs; give smaller sizes with --dim",
            )
        )
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
        sizes = ", ".join(f"{name}={size}" for name, size in dims.items())
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
