"""Save a built model as a directory (safetensors weights + standalone spec + manifest) and load it back.

A saved model is three files:

- `model.safetensors`: every parameter and persistent buffer once; a tied tensor (`tie:`) is stored under
  its first name in `state_dict` order and re-tied on load by rebuilding the spec;
- `spec.yaml`: the resolved standalone spec (`extends` merged, `--set` overrides written into `vars`);
- `blockgraph.json`: a manifest (format version, blockgraph and torch versions, dtype, blocks and the plugins
  that provide them, tied names).

Loading reads only YAML, JSON and safetensors: nothing is ever unpickled.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from blockgraph.blocks.registry import receiving_weights
from blockgraph.builder import footprint
from blockgraph.builder.compile import compile_graph
from blockgraph.builder.graph import Graph
from blockgraph.builder.model import GraphModel
from blockgraph.builder.pipeline import build, load_spec, typed_graph
from blockgraph.builder.source import dump_yaml
from blockgraph.builder.validate import ValidSpec
from blockgraph.common.atomic import check_directory_target, owned_directory, write_directory
from blockgraph.common.errors import CheckpointError, Location, Problem, SpecError, UsageError
from blockgraph.common.files import FileKind, MiB
from blockgraph.common.records import read_record
from blockgraph.common.tensorfile import Header, read_header, write_safetensors

FORMAT = "blockgraph-model"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
SPEC = "spec.yaml"
MANIFEST = "blockgraph.json"
MANIFEST_FILE = FileKind("model manifest", CheckpointError, limit=16 * MiB)


class Manifest(BaseModel):
    """What `blockgraph.json` must hold for a saved model to be read; other keys are informative."""

    model_config = ConfigDict(extra="allow")

    format: str
    format_version: int = Field(strict=True, ge=1)
    dtype: str | None = None
    plugins: list[str] = Field(default_factory=list)


WHAT = "saved blockgraph model"


def check_destination(directory: str | Path) -> None:
    """Refuse `directory` as the place to save a model now, before the work that produces it."""
    check_directory_target(directory, owned=replaceable, what=WHAT)


def save(model: nn.Module, directory: str | Path) -> Path:
    """Write `model` (built from a spec) to `directory` atomically (see common.atomic): complete, or not at all.

    An existing saved model at `directory` is replaced; any other non-empty directory, a file, a link or a
    device is refused.
    """
    directory = Path(directory)
    write = model_files(model, Location(str(directory)))
    return write_directory(directory, write, owned=replaceable, what=WHAT)


def model_files(model: nn.Module, where: Location) -> Callable[[Path], None]:
    """Check that `model` can be saved, and return the function that writes its three files into a folder."""
    graph = _model_graph(model)
    tensors, aliases = unique_tensors(model)
    if any(t.is_meta for t in tensors.values()):
        raise UsageError(Problem("a model on the meta device has no weights to save", where, hint="build it on cpu"))
    _check_structure(graph.standalone, model, where)
    manifest = _manifest(model, graph, tensors, aliases)
    spec_text = dump_yaml(graph.standalone)

    def write(folder: Path) -> None:
        folder.mkdir(exist_ok=True)
        metadata = {"format": "pt", "blockgraph.aliases": json.dumps(aliases)}
        write_safetensors(folder / WEIGHTS, _storable(tensors), metadata)
        (folder / SPEC).write_text(spec_text, encoding="utf-8")
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")

    return write


def load(
    directory: str | Path,
    device: str | torch.device = "cpu",
    *,
    plugins: Sequence[str] = (),
    check_memory: bool = True,
) -> GraphModel:
    """Rebuild a saved model from its `spec.yaml` on `device` and fill in its weights bit-exactly.

    The weights file must hold exactly the spec's tensors (names, shapes, and dtypes of their kind); anything
    else is a `CheckpointError` naming the file and the tensors. `plugins` provide blocks the spec needs. A
    model that would not fit in the memory left on `device` is refused first, unless `check_memory` is False.
    """
    from safetensors import SafetensorError, safe_open

    directory = Path(directory)
    manifest = read_manifest(directory)
    weights = directory / WEIGHTS
    header = read_header(str(weights), "weights file")
    dtype = _FLOAT_NAMES.get(manifest.dtype or "")
    model = rebuild(
        directory / SPEC, device, plugins=plugins, dtype=dtype, saved_with=manifest.plugins, check_memory=check_memory
    )
    where = Location(str(weights))
    targets, aliases = unique_tensors(model)
    names = _match_names(header, targets, aliases, where)
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as handle, torch.no_grad():
            for target_name, file_name in names.items():
                _assign(targets[target_name], handle.get_tensor(file_name))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(Problem(f"cannot read the weights file: {type(exc).__name__}", where)) from None
    return model


@dataclass(frozen=True)
class Transfer:
    """What `load_matching` took: tensor names of the model filled from the file, of the model's own (new, or of
    another shape in the file), and of the file's left unused."""

    loaded: list[str]
    new: list[str]
    reshaped: list[str]
    left: list[str]


def load_matching(model: nn.Module, directory: str | Path) -> Transfer:
    """Fill `model`'s tensors from the saved model at `directory` wherever a name and its shape agree (a tied
    tensor by any of its names); the rest keep their values. The start of fine-tuning an edited spec."""
    from safetensors import SafetensorError, safe_open

    directory = Path(directory)
    read_manifest(directory)
    weights = directory / WEIGHTS
    header = read_header(str(weights), "weights file")
    targets, aliases = unique_tensors(model)
    names_of: dict[str, list[str]] = {name: [name] for name in targets}
    for alias, kept in aliases.items():
        names_of[kept].append(alias)
    loaded, new, reshaped, used = [], [], [], set()
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as handle, torch.no_grad():
            for name, target in targets.items():
                found = next((n for n in names_of[name] if n in header.tensors), None)
                if found is None:
                    new.append(name)
                    continue
                used.add(found)
                info = header.tensors[found]
                if tuple(info.shape) != tuple(target.shape) or info.floating != target.is_floating_point():
                    reshaped.append(name)
                    continue
                _assign(target, handle.get_tensor(found))
                loaded.append(name)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(
            Problem(f"cannot read the weights file: {type(exc).__name__}", Location(str(weights)))
        ) from None
    return Transfer(loaded, new, reshaped, [n for n in header.tensors if n not in used])


def rebuild(
    spec: Path,
    device: str | torch.device = "cpu",
    *,
    plugins: Sequence[str] = (),
    dtype: torch.dtype | None = None,
    saved_with: Sequence[str] = (),
    check_memory: bool = True,
) -> GraphModel:
    """The model of a saved standalone spec, for its weights to be filled in: the files the spec names are
    neither checked nor read. `saved_with`: the plugins the model was saved with, named in the hint;
    `check_memory`: refuse a model that would not fit in the memory left (builder.footprint)."""
    try:
        with receiving_weights():
            typed = typed_graph(load_spec(spec, plugins=plugins))
            if check_memory and footprint.checking(device):
                need = footprint.weights_need(typed, device=device, dtype=dtype, action="loading the model")
                footprint.check(need, hint=footprint.LOAD_ADVICE)
            return compile_graph(typed, device=device, dtype=dtype)
    except SpecError as exc:
        raise _unbuildable(exc, spec, saved_with) from None


def saved_spec(spec: Path, *, saved_with: Sequence[str] = ()) -> ValidSpec:
    """A saved standalone spec (of a saved model, a checkpoint, an import) validated as `rebuild` reads it: the
    files it names are neither checked nor read, for they served weights that are saved."""
    try:
        with receiving_weights():
            return load_spec(spec)
    except SpecError as exc:
        raise _unbuildable(exc, spec, saved_with) from None


def _unbuildable(exc: SpecError, spec: Path, saved_with: Sequence[str]) -> CheckpointError:
    hint = "the saved model's spec.yaml does not build"
    if saved_with:
        hint = (
            f"this model was saved with blocks from {', '.join(saved_with)}: load them if you trust them, "
            "with `blockgraph --plugin FILE_OR_MODULE COMMAND ...` (plugins=[...] in Python)"
        )
    return CheckpointError([*exc.problems, Problem("cannot rebuild the saved spec", Location(str(spec)), hint)])


def read_manifest(directory: Path) -> Manifest:
    """The manifest of a saved model directory, checked for format and version."""
    path = directory / MANIFEST
    where = Location(str(path))
    if not directory.is_dir():
        raise CheckpointError(Problem(f"{directory} is not a directory", Location(str(directory))))
    if not path.exists():
        raise CheckpointError(
            Problem(f"{directory} is not a saved blockgraph model (no {MANIFEST})", where, hint="save it with save()")
        )
    manifest = read_record(path, Manifest, MANIFEST_FILE)
    if manifest.format != FORMAT:
        raise CheckpointError(Problem(f"{MANIFEST} is not a blockgraph model manifest (field format)", where))
    if manifest.format_version > FORMAT_VERSION:
        raise CheckpointError(
            Problem(
                f"saved with format version {manifest.format_version}; this blockgraph reads up to {FORMAT_VERSION}",
                where,
                hint="upgrade blockgraph",
            )
        )
    return manifest


def is_saved_model(path: str | Path) -> bool:
    """Whether `path` looks like a saved model (it has a manifest); reading it says whether it is a valid one."""
    return (Path(path) / MANIFEST).is_file()


def replaceable(path: Path) -> bool:
    """A directory `save` may replace: a saved model and nothing else (no file of the user's would be lost)."""
    return owned_directory(path, MANIFEST, {WEIGHTS, SPEC, MANIFEST})


def unique_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state_dict with each tensor once (first name in state_dict order) and alias name → kept name."""
    kept: dict[str, torch.Tensor] = {}
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
            kept[name] = tensor
    return kept, aliases


_FLOAT_NAMES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16)}
_SAFETENSORS_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}


def _model_graph(model: nn.Module) -> Graph:
    typed = getattr(model, "typed_graph", None)
    if typed is None:
        raise UsageError(Problem("the model was not built from a spec", hint="build it with builder.build"))
    return typed.graph


def _check_structure(standalone: dict[str, Any], model: nn.Module, where: Location) -> None:
    """The standalone spec must rebuild this very structure, or the saved directory would not load."""

    with receiving_weights():  # only the structure matters: the files the spec names are not looked at
        rebuilt = build(standalone, device="meta")
    expected, _ = unique_tensors(rebuilt)
    have, aliases = unique_tensors(model)
    problems = _mismatches({n: tuple(t.shape) for n, t in have.items()}, expected, aliases, where, "the model")
    if problems:  # the model was changed after it was built: its spec no longer describes it
        raise UsageError(problems)


def _match_names(
    header: Header, targets: dict[str, torch.Tensor], aliases: dict[str, str], where: Location
) -> dict[str, str]:
    """Target name → name in the file; refuses missing, unexpected, mis-shaped and mis-typed tensors.

    A floating tensor may be stored in another floating dtype (it is converted, as `--dtype` would); an
    integer or boolean tensor of a floating parameter, or any other dtype change, is refused.
    """
    saved = {name: info.shape for name, info in header.tensors.items()}
    problems = _mismatches(saved, targets, aliases, where, "the weights file")
    if problems:
        raise CheckpointError(problems)
    names = {aliases.get(name, name): name for name in saved}
    kinds = []
    for target_name, file_name in names.items():
        target, info = targets[target_name], header.tensors[file_name]
        expected = str(target.dtype).removeprefix("torch.")
        if (target.is_floating_point() and not info.floating) or (
            not target.is_floating_point() and _SAFETENSORS_DTYPES.get(info.dtype) != target.dtype
        ):
            kinds.append(f"{file_name}: {info.dtype} in the file, {expected} in the model")
    if kinds:
        raise CheckpointError(Problem(f"{len(kinds)} tensor(s) have the wrong dtype: {names_list(kinds)}", where))
    return names


def _mismatches(
    found: dict[str, tuple[int, ...]],
    expected: dict[str, torch.Tensor],
    aliases: dict[str, str],
    where: Location,
    what: str,
) -> list[Problem]:
    """Differences between `found` (name → shape) and the spec's tensors; a tied tensor may go by either name."""
    canonical: dict[str, str] = {}
    unexpected = []
    for name in found:
        target = aliases.get(name, name)
        if target in expected and target not in canonical:
            canonical[target] = name
        else:
            unexpected.append(name)
    missing = [name for name in expected if name not in canonical]
    shapes = [
        f"{name}: {list(found[file_name])} in {what}, {list(expected[name].shape)} in the spec"
        for name, file_name in canonical.items()
        if found[file_name] != tuple(expected[name].shape)
    ]
    problems = []
    if missing:
        problems.append(
            Problem(
                f"{what} lacks {len(missing)} tensor(s) the spec has: {names_list(missing)}",
                where,
                hint="the weights belong to another spec, or were renamed",
            )
        )
    if unexpected:
        problems.append(
            Problem(f"{what} has {len(unexpected)} tensor(s) the spec has not: {names_list(unexpected)}", where)
        )
    if shapes:
        problems.append(
            Problem(
                f"{len(shapes)} tensor(s) differ in shape: {names_list(shapes)}",
                where,
                hint="the spec's sizes (vars, --set) differ from those the weights were saved with",
            )
        )
    return problems


def names_list(items: Iterable[str], limit: int = 10) -> str:
    items = list(items)
    text = ", ".join(items[:limit])
    return text + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _assign(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copy into the model's own tensor (keeping ties and the model's dtype): bit-exact when the dtypes agree."""
    target.copy_(value)


def _storable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors safetensors accepts: detached, contiguous, on the CPU, none sharing storage with another."""
    out: dict[str, torch.Tensor] = {}
    storages: set[tuple[str, int]] = set()
    for name, tensor in tensors.items():
        tensor = tensor.detach()
        if tensor.device.type != "cpu":
            out[name] = tensor.cpu().contiguous()
            continue
        storage = (tensor.device.type, tensor.untyped_storage().data_ptr())
        shared = storage in storages and tensor.numel() > 0
        storages.add(storage)
        out[name] = tensor.clone(memory_format=torch.contiguous_format) if shared else tensor.contiguous()
    return out


def _manifest(
    model: nn.Module, graph: Graph, tensors: dict[str, torch.Tensor], aliases: dict[str, str]
) -> dict[str, Any]:
    floats = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values() if t.is_floating_point()})
    blocks = {inst.entry.name: inst.entry.source for inst in graph.nodes.values()}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "blockgraph_version": _version(),
        "torch_version": torch.__version__,
        "spec_name": graph.name,
        "dtype": floats[0] if len(floats) == 1 else ("mixed" if floats else None),
        "parameters": sum(t.numel() for n, t in tensors.items() if isinstance(t, nn.Parameter)),
        "tensors": len(tensors),
        "tied": aliases,
        "blocks": dict(sorted(blocks.items())),
        "plugins": sorted({source for source in blocks.values() if source != "built-in"}),
        "files": {"weights": WEIGHTS, "spec": SPEC},
    }


def _version() -> str:
    try:
        return metadata.version("blockgraph")
    except metadata.PackageNotFoundError:
        return "unknown"
