"""Export a built model: a `torch.export` program (.pt2) or ONNX, with the spec's named dimensions dynamic.

Every symbolic dimension name of the spec's inputs (`batch`, `seq`, ...) becomes one `torch.export.Dim`, shared
by every input that uses it. When tracing shows a block needs a narrower range (a positional table of 5000
rows bounds `seq`) the range is narrowed; when a block needs an exact size, that dimension falls back to the
trial size, with a warning (a `Problem` of severity "warning" in `Exported.warnings`). Optional inputs (padding
masks) left out of the program are warnings too: the program runs without them, whatever the batch holds.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from blockgraph.blocks.types import format_shape, symbol
from blockgraph.builder.shapes import TypedGraph
from blockgraph.builder.trial import dummy_inputs
from blockgraph.common.atomic import check_file_target, write_file
from blockgraph.common.errors import ExportError, Location, Problem

Format = Literal["exported-program", "onnx"]
FORMATS: tuple[str, ...] = ("exported-program", "onnx")
ONNX_PACKAGES = ("onnx", "onnxscript")
MAX_REFINEMENTS = 4


@dataclass
class Exported:
    """What `export` wrote: the file, and for each named dimension its range (dynamic) or fixed size (static)."""

    path: Path
    format: str
    inputs: list[str]
    outputs: list[str]
    dynamic: dict[str, tuple[int | None, int | None]] = field(default_factory=dict)
    static: dict[str, int] = field(default_factory=dict)
    warnings: list[Problem] = field(default_factory=list)  # dimensions that could not stay dynamic


def export(
    model: torch.nn.Module,
    typed: TypedGraph,
    dims: dict[str, int],
    fmt: Format | str,
    path: str | Path,
    *,
    include_optional: bool | Sequence[str] = False,
    torch_output: bool = False,
) -> Exported:
    """Export `model` (in eval mode) to `path` as `fmt` ("exported-program" or "onnx").

    `dims` are the trial sizes of the spec's named dimensions (see `resolve_dims`); each becomes dynamic where
    the blocks allow. Optional inputs are left out of the exported signature unless `include_optional` is
    True or names them (then they are required there; a boolean mask of all False means "none"); each one left
    out is a warning. torch's own output while exporting (its logs, warnings, the partial graph it prints when
    tracing fails) is kept back unless `torch_output` (`blockgraph --debug`): a failure is an `ExportError`.
    """
    if fmt not in FORMATS:
        raise ExportError(Problem(f"unknown export format {fmt!r}", hint=f"use one of {', '.join(FORMATS)}"))
    if fmt == "onnx":
        require_onnx()
    path = Path(path)
    check_file_target(path, what="exported model")
    graph = typed.graph
    names = _input_names(typed, include_optional)
    device = next((t.device for t in model.state_dict().values()), torch.device("cpu"))
    dtype = next((t.dtype for t in model.state_dict().values() if t.is_floating_point()), None)
    if device.type == "meta":
        raise ExportError(Problem("a model on the meta device cannot be exported", hint="build it on cpu"))
    was_training = model.training
    model.eval()
    try:
        with _torch_output(torch_output):  # its failed guesses log tracebacks; what fails for good is reported
            program, dynamic, static, notes = _trace(model, typed, dims, names, device, dtype)
    finally:
        model.train(was_training)
    left_out = [n for n, s in graph.inputs.items() if s.optional and n not in names]
    if left_out:
        notes.append(_left_out(left_out, typed))
    outputs = list(graph.outputs)
    result = Exported(path, fmt, names, ["output"] if graph.single_output else outputs, dynamic, static, notes)
    if fmt == "exported-program":
        write_file(path, lambda tmp: _save_program(program, tmp), what="exported model")
    else:
        _write_onnx(program, result, typed, torch_output)
    return result


def _save_program(program: Any, tmp: Path) -> None:
    """torch.export.save into memory, then to the file: torch's zip writer aborts the whole process when the
    disk fails under it (its destructor throws), while a failed Python write is an OSError like any other."""
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    tmp.write_bytes(buffer.getbuffer())


def require_onnx() -> None:
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(
            Problem(
                f"ONNX export needs the package(s) {', '.join(missing)}, which are not installed",
                hint="pip install 'blockgraph[onnx]'",
            )
        )


def _input_names(typed: TypedGraph, include_optional: bool | Sequence[str]) -> list[str]:
    inputs = typed.graph.inputs
    if isinstance(include_optional, bool):
        wanted = {n for n, s in inputs.items() if s.optional} if include_optional else set()
    else:
        wanted = set(include_optional)
        unknown = sorted(wanted - {n for n, s in inputs.items() if s.optional})
        if unknown:
            optional = [n for n, s in inputs.items() if s.optional]
            raise ExportError(
                Problem(
                    f"not optional inputs of the spec: {', '.join(unknown)}",
                    hint=f"optional inputs: {', '.join(optional) or 'none'}",
                )
            )
    return [n for n, s in inputs.items() if not s.optional or n in wanted]


def sample_inputs(
    typed: TypedGraph,
    dims: dict[str, int],
    names: Sequence[str],
    device: torch.device,
    dtype: torch.dtype | None = None,
    *,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Inputs for tracing: required ones as `dummy_inputs` makes them; optional ones neutral (False / zeros);
    floating ones in `dtype`, the model's."""

    graph = typed.graph
    tensors = dummy_inputs(graph, dims, device=device, dtype=dtype, seed=seed)
    for name in names:
        if name not in tensors:
            spec = graph.inputs[name]
            shape = tuple(d if isinstance(d, int) else dims[d] for d in spec.shape)
            kind = dtype if dtype is not None and spec.torch_dtype.is_floating_point else spec.torch_dtype
            tensors[name] = torch.zeros(shape, dtype=kind, device=device)
    return {name: tensors[name] for name in names}


def _trace(
    model: torch.nn.Module,
    typed: TypedGraph,
    dims: dict[str, int],
    names: list[str],
    device: torch.device,
    dtype: torch.dtype | None,
) -> tuple[Any, dict[str, tuple[int | None, int | None]], dict[str, int], list[Problem]]:
    """torch.export with one Dim per named dimension, narrowing ranges or fixing sizes where tracing demands;
    the program, the dynamic ranges, the static sizes and a warning for each dimension that had to be fixed."""
    from torch.export import Dim

    graph = typed.graph
    symbolic = sorted({d for n in names for d in graph.inputs[n].shape if isinstance(d, str)})
    # sizes 0 and 1 are specialised by torch.export; trace dynamic dimensions at 2 or more
    trace_dims = {**dims, **{d: max(dims[d], 2) for d in symbolic}}
    kwargs = sample_inputs(typed, trace_dims, names, device, dtype)
    least = {d: smallest_size(typed, d, trace_dims) for d in symbolic}

    spec_dims = {d: Dim(d, min=least[d]) for d in symbolic}
    shapes: dict[str, Any] = {
        n: {i: spec_dims[d] for i, d in enumerate(graph.inputs[n].shape) if isinstance(d, str)} or None for n in names
    }
    guards: list[str] = []
    notes: list[Problem] = []
    program = None
    for _ in range(MAX_REFINEMENTS + 1):
        try:
            program = torch.export.export(model, (), kwargs, dynamic_shapes=shapes if symbolic else None)
            break
        except torch._dynamo.exc.UserError as exc:
            guards.extend(line for line in str(exc).splitlines() if line.strip().startswith("- "))
            unproven = _unproven_guard(str(exc), least, trace_dims)
            fixes = _suggested_fixes(str(exc))
            if not fixes and unproven is None:
                break
            try:
                shapes = _refine(fixes, shapes) if fixes else shapes
            except Exception:  # a fix torch cannot apply itself: fall back to static sizes
                program = None
                break
            if unproven is not None:  # a guard that holds, which torch's range analysis cannot prove from the
                least[unproven] += 1  # minimum (its bounds of a floor division are loose): try the next one
                shapes = _with_minimum(shapes, unproven, least[unproven])
        except Exception as exc:
            if not symbolic:
                raise _trace_error(exc, typed) from exc
            program = None
            guards.append(_first_line(exc))
            break
    if program is not None and _static_at_trace_size(shapes, graph, names, dims, trace_dims):
        # a size fixed by tracing is the bumped trace size (2): trace again at the size asked for
        kwargs = sample_inputs(typed, {**trace_dims, **_fixed(shapes, graph, names, dims)}, names, device, dtype)
        shapes = _fixed_shapes(shapes, dims, graph, names)
        try:
            program = torch.export.export(model, (), kwargs, dynamic_shapes=shapes)
        except Exception:
            program = None
    if program is None:
        if symbolic:
            notes.append(_static(symbolic, dims, guards, typed))
        kwargs = sample_inputs(typed, dims, names, device, dtype)
        try:
            program = torch.export.export(model, (), kwargs)
        except Exception as exc:
            raise _trace_error(exc, typed) from exc
        return program, {}, {d: dims[d] for d in symbolic}, notes
    dynamic: dict[str, tuple[int | None, int | None]] = {}
    static: dict[str, int] = {}
    chosen = _dims_by_name(shapes, graph, names)
    for name in symbolic:
        value = chosen.get(name)
        if isinstance(value, int):
            static[name] = value
        elif value is not None:
            dynamic[name] = _range(value)
    if static:
        notes.append(_static(sorted(static), static, guards, typed))
    return program, dynamic, static, notes


def smallest_size(typed: TypedGraph, name: str, sizes: dict[str, int]) -> int:
    """The least size of dimension `name` (at least 2, at most its trace size) from which every size inferred from
    it stays 2 or more, the others at their trace sizes: torch.export specialises a size of 1, so a stride-2
    convolution's output (Whisper's frames) must not reach it inside the range.

    Inferred sizes grow with the dimensions they derive from, so the least such size is found by bisection."""
    target = symbol(name)
    others = {symbol(d): size for d, size in sizes.items() if d != name}
    derived = {
        d.subs(others)
        for t in typed.types.values()
        for d in t.shape
        if not isinstance(d, int) and target in getattr(d, "free_symbols", ())
    }
    derived = {d for d in derived if d.free_symbols == {target}}

    def fits(size: int) -> bool:
        return all(int(d.subs(target, size)) >= 2 for d in derived)

    low, high = 2, sizes[name]
    if not derived or fits(low) or not fits(high):
        return low
    while high - low > 1:  # fits(high), not fits(low)
        middle = (low + high) // 2
        low, high = (low, middle) if fits(middle) else (middle, high)
    return high


def _static_at_trace_size(
    shapes: dict[str, Any], graph: Any, names: list[str], dims: dict[str, int], trace_dims: dict[str, int]
) -> bool:
    chosen = _dims_by_name(shapes, graph, names)
    return any(isinstance(v, int) and dims[d] != trace_dims[d] for d, v in chosen.items())


def _fixed(shapes: dict[str, Any], graph: Any, names: list[str], dims: dict[str, int]) -> dict[str, int]:
    """The dimensions tracing made static, at the sizes asked for."""
    return {d: dims[d] for d, v in _dims_by_name(shapes, graph, names).items() if isinstance(v, int)}


def _fixed_shapes(shapes: dict[str, Any], dims: dict[str, int], graph: Any, names: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n in names:
        if shapes.get(n) is None:
            out[n] = None
            continue
        spec = graph.inputs[n].shape
        out[n] = {i: dims[spec[i]] if isinstance(v, int) else v for i, v in shapes[n].items()}
    return out


def _with_minimum(shapes: dict[str, Any], name: str, low: int) -> dict[str, Any]:
    """The dynamic shapes with dimension `name` starting at `low` (its maximum kept)."""
    from torch.export import Dim

    def changed(dim: Any) -> Any:
        if getattr(dim, "__name__", None) != name:
            return dim
        high = _range(dim)[1]
        return Dim(name, min=low) if high is None else Dim(name, min=low, max=high)

    raised: dict[str, Any] = {}
    for n, axes in shapes.items():
        raised[n] = None if axes is None else {i: changed(d) for i, d in axes.items()}
    return raised


def _unproven_guard(message: str, least: dict[str, int], trace_dims: dict[str, int]) -> str | None:
    """The dimension of a "not all values ... in the specified range satisfy the generated guard" failure whose
    minimum can still rise below its trace size (the guard holds there), else None."""
    for name in re.findall(r"Not all values of (\w+) = .* satisfy the generated guard (?!\d+ <= )", message):
        if name in least and least[name] < trace_dims[name]:
            return name
    return None


def _suggested_fixes(message: str) -> str:
    if "Suggested fixes:" not in message:
        return ""
    block = message.split("Suggested fixes:", 1)[1].strip().split("\n\n")[0]
    return "\n".join(line.strip() for line in block.splitlines() if " = " in line)


def _refine(fixes: str, shapes: dict[str, Any]) -> dict[str, Any]:
    from torch.export.dynamic_shapes import refine_dynamic_shapes_from_suggested_fixes

    refined = refine_dynamic_shapes_from_suggested_fixes("Suggested fixes:\n" + fixes, shapes)
    assert isinstance(refined, dict)  # the structure it was given
    return refined


def _dims_by_name(shapes: dict[str, Any], graph: Any, names: list[str]) -> dict[str, Any]:
    """Spec dimension name → what the (refined) dynamic shapes hold for it: a Dim, a derived Dim or an int."""
    out: dict[str, Any] = {}
    for n in names:
        for i, d in enumerate(graph.inputs[n].shape):
            if isinstance(d, str) and shapes.get(n) is not None:
                out.setdefault(d, shapes[n].get(i))
    return out


def _range(dim: Any) -> tuple[int | None, int | None]:
    low, high = getattr(dim, "min", None), getattr(dim, "max", None)
    big = 2**62
    return (low if isinstance(low, int) else None, high if isinstance(high, int) and high < big else None)


def _static(names: Sequence[str], sizes: dict[str, int], guards: list[str], typed: TypedGraph) -> Problem:
    fixed = ", ".join(f"{n}={sizes[n]}" for n in names)
    reason = re.sub(r" \(\d+\)$", "", guards[0].strip().removeprefix("- ").split(". ")[0]) if guards else ""
    return Problem(
        f"dimension(s) {fixed} are static in the export of {typed.graph.name!r}: a block's forward depends on the "
        f"exact size{f' (torch.export: {reason})' if reason else ''}; the exported model takes only these sizes",
        severity="warning",
    )


def _left_out(names: list[str], typed: TypedGraph) -> Problem:
    """The optional inputs an export leaves out: its program always runs as the model does without them."""
    inputs = typed.graph.inputs
    listed = ", ".join(f"{n} ({inputs[n].dtype} {format_shape(inputs[n].shape)})" for n in names)
    return Problem(
        f"optional input(s) left out of the export: {listed}; the exported program always runs without them, "
        "so a padded batch is computed as if none of it were padding",
        severity="warning",
        hint="export with --with-optional to make them inputs (include_optional=True in Python)",
    )


def _trace_error(exc: Exception, typed: TypedGraph) -> ExportError:
    return ExportError(
        Problem(
            f"torch.export cannot trace {typed.graph.name!r}: {_first_line(exc)}",
            hint="a block's forward uses Python control flow on tensor values or an unsupported operation; "
            "run with --debug for the full trace, or torch.export.draft_export for a report",
        )
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _write_onnx(program: Any, result: Exported, typed: TypedGraph, torch_output: bool) -> None:
    """The exported program through the dynamo ONNX exporter; dynamic axes keep the spec's names."""
    path = result.path
    big = sum(v.numel() * v.element_size() for v in program.state_dict.values()) > 1_800_000_000
    try:
        with _torch_output(torch_output):  # it reports every optional torchvision op it skips
            onnx_program = torch.onnx.export(
                program, (), None, output_names=result.outputs, dynamo=True, verbose=False, external_data=big
            )
    except Exception as exc:
        raise ExportError(
            Problem(
                f"the ONNX exporter failed: {_first_line(exc)}",
                Location(str(path)),
                hint="the exported-program format may still work: --format exported-program",
            )
        ) from exc
    assert onnx_program is not None  # the dynamo exporter always returns its program
    _name_axes(onnx_program, result, typed)
    write_file(path, lambda tmp: onnx_program.save(str(tmp), external_data=big), what="exported model")


def _name_axes(onnx_program: Any, result: Exported, typed: TypedGraph) -> None:
    """Call the ONNX graph's dynamic axes after the spec's dimensions (`batch`, not `s27`)."""
    mapping: dict[Any, str] = {}
    graph_inputs = list(onnx_program.model.graph.inputs)
    for value, name in zip(graph_inputs, result.inputs, strict=False):
        for axis, dim in zip(value.shape or (), typed.graph.inputs[name].shape, strict=False):
            if isinstance(dim, str) and dim in result.dynamic and not isinstance(axis, int):
                mapping.setdefault(str(axis), dim)
    if mapping and hasattr(onnx_program, "rename_axes"):
        onnx_program.rename_axes(mapping)


@contextlib.contextmanager
def _torch_output(shown: bool) -> Iterator[None]:
    """Keep torch's own output from the terminal unless `shown`: it logs, warns and prints (a failed trace's
    partial graph, to stderr) through channels of its own, and the error that counts is raised as ours."""
    if shown:
        yield
        return
    disabled = logging.root.manager.disable  # torch's handlers hold the real stderr: redirecting misses them
    logging.disable(logging.CRITICAL)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(disabled)


def describe(result: Exported, typed: TypedGraph) -> list[str]:
    """Lines for the CLI: the file, each input's shape with its dynamic dimensions, outputs."""
    lines = [f"wrote {result.path} ({result.format})"]
    for name in result.inputs:
        spec = typed.graph.inputs[name]
        lines.append(f"  input {name}: {spec.dtype} {format_shape(spec.shape)}")
    for name, (low, high) in result.dynamic.items():
        bounds = [f"at least {low}"] if low is not None and low > 2 else []  # 0 and 1 are torch.export's own
        bounds += [f"at most {high}"] if high is not None else []
        lines.append(f"  dynamic {name}" + (f" ({', '.join(bounds)})" if bounds else ""))
    for name, size in result.static.items():
        lines.append(f"  static {name} = {size}")
    if result.format == "exported-program":  # the program takes its inputs by name, as the model does
        arguments = ", ".join(f"{name}=..." for name in result.inputs)
        lines.append(f"  call: torch.export.load({str(result.path)!r}).module()({arguments})")
    return lines
