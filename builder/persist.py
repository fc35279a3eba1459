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
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blocks.registry import receiving_weights
from builder.errors import Location, Problem, SpecError
from builder.source import dump_yaml
from builder.validate import ValidSpec

FORMAT = "blockgraph-model"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
SPEC = "spec.yaml"
MANIFEST = "blockgraph.json"


def save(model: nn.Module, directory: str | Path, valid_spec: ValidSpec | None = None) -> Path:
    """Write `model` to `directory` atomically: a temporary sibling directory, renamed into place when complete.

    `valid_spec` defaults to the spec the model was built from. An existing saved model at `directory` is
    replaced; any other non-empty directory is refused.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    valid = valid_spec if valid_spec is not None else _model_spec(model)
    where = Location(str(directory))
    if valid.standalone is None:
        raise SpecError(Problem("this spec has no standalone form to save", where, hint="load it with load_spec"))
    if directory.exists() and not _replaceable(directory):
        raise SpecError(
            Problem(
                f"{directory} exists and is not a saved blockgraph model",
                where,
                hint="choose a new directory, or an empty one",
            )
        )
    tensors, aliases = unique_tensors(model)
    if any(t.is_meta for t in tensors.values()):
        raise SpecError(Problem("a model on the meta device has no weights to save", where, hint="build it on cpu"))
    _check_structure(valid, model, where)
    manifest = _manifest(model, valid, tensors, aliases)
    spec_text = dump_yaml(valid.standalone)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        save_file(
            _storable(tensors),
            str(tmp / WEIGHTS),
            metadata={"format": "pt", "blockgraph.aliases": json.dumps(aliases)},
        )
        _write_text(tmp / SPEC, spec_text)
        _write_text(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        _fsync(tmp / WEIGHTS)
        _default_permissions(tmp)
        _move_into_place(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load(
    directory: str | Path,
    device: str | torch.device = "cpu",
    *,
    plugins: Sequence[str] = (),
) -> nn.Module:
    """Rebuild a saved model from its `spec.yaml` on `device` and fill in its weights bit-exactly.

    The weights file must hold exactly the spec's tensors (names and shapes); anything else is a `SpecError`
    naming the missing, unexpected and mis-shaped tensors. `plugins` provide blocks the spec needs.
    """
    from safetensors import SafetensorError, safe_open

    from builder.api import build, load_spec

    directory = Path(directory)
    manifest = read_manifest(directory)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise SpecError(Problem(f"no weights file {WEIGHTS} in {directory}", Location(str(weights))))
    try:
        valid = load_spec(directory / SPEC, plugins=plugins)
        dtype = manifest.get("dtype")
        with receiving_weights():
            model = build(valid, device=device, dtype=dtype if dtype in _FLOAT_NAMES else None)
    except SpecError as exc:
        sources = manifest.get("plugins") or []
        if not sources:
            raise
        hint = f"this model was saved with blocks from {', '.join(sources)}: pass them as plugins"
        problem = Problem("cannot rebuild the saved spec", Location(str(directory)), hint)
        raise SpecError([*exc.problems, problem]) from exc
    where = Location(str(weights))
    targets, aliases = unique_tensors(model)
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as handle:
            saved = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118
            names = _match_names(saved, targets, aliases, where)
            with torch.no_grad():
                for target_name, file_name in names.items():
                    _assign(targets[target_name], handle.get_tensor(file_name))
    except SafetensorError as exc:
        raise SpecError(Problem(f"cannot read the weights file: {exc}", where)) from exc
    return model


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of a saved model directory, checked for format and version."""
    path = directory / MANIFEST
    where = Location(str(path))
    if not directory.is_dir():
        raise SpecError(Problem(f"{directory} is not a directory", Location(str(directory))))
    if not path.is_file():
        raise SpecError(
            Problem(f"{directory} is not a saved blockgraph model (no {MANIFEST})", where, hint="save it with save()")
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpecError(Problem(f"cannot read the manifest: {exc}", where)) from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SpecError(Problem(f"{MANIFEST} is not a blockgraph model manifest", where))
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise SpecError(
            Problem(
                f"saved with format version {version}; this blockgraph reads up to {FORMAT_VERSION}",
                where,
                hint="upgrade blockgraph",
            )
        )
    return manifest


def is_saved_model(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


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


def _model_spec(model: nn.Module) -> ValidSpec:
    typed = getattr(model, "typed_graph", None)
    valid = typed.graph.valid if typed is not None else None
    if valid is None:
        raise SpecError(Problem("the model was not built from a spec; pass the ValidSpec to save()"))
    return valid


def _replaceable(directory: Path) -> bool:
    return directory.is_dir() and (is_saved_model(directory) or not any(directory.iterdir()))


def _check_structure(valid: ValidSpec, model: nn.Module, where: Location) -> None:
    """The standalone spec must rebuild this very structure, or the saved directory would not load."""
    from builder.api import build

    rebuilt = build(valid.standalone or {}, device="meta")
    expected, _ = unique_tensors(rebuilt)
    have, aliases = unique_tensors(model)
    problems = _mismatches({n: tuple(t.shape) for n, t in have.items()}, expected, aliases, where, "the model")
    if problems:
        raise SpecError(problems)


def _match_names(
    saved: dict[str, tuple[int, ...]], targets: dict[str, torch.Tensor], aliases: dict[str, str], where: Location
) -> dict[str, str]:
    """Target name → name in the file; refuses missing, unexpected and mis-shaped tensors."""
    problems = _mismatches(saved, targets, aliases, where, "the weights file")
    if problems:
        raise SpecError(problems)
    return {aliases.get(name, name): name for name in saved}


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
                f"{what} lacks {len(missing)} tensor(s) the spec has: {_names(missing)}",
                where,
                hint="the weights belong to another spec, or were renamed",
            )
        )
    if unexpected:
        problems.append(
            Problem(f"{what} has {len(unexpected)} tensor(s) the spec has not: {_names(unexpected)}", where)
        )
    if shapes:
        problems.append(
            Problem(
                f"{len(shapes)} tensor(s) differ in shape: {_names(shapes)}",
                where,
                hint="the spec's sizes (vars, --set) differ from those the weights were saved with",
            )
        )
    return problems


def _names(items: Iterable[str], limit: int = 10) -> str:
    items = list(items)
    text = ", ".join(items[:limit])
    return text + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _assign(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copy bit-exactly into the model's own tensor (keeping ties); a different dtype replaces the data."""
    if target.dtype == value.dtype:
        target.copy_(value)
    else:
        target.data = value.to(target.device)


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
    model: nn.Module, valid: ValidSpec, tensors: dict[str, torch.Tensor], aliases: dict[str, str]
) -> dict[str, Any]:
    floats = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values() if t.is_floating_point()})
    typed = getattr(model, "typed_graph", None)
    blocks: dict[str, str] = {}
    if typed is not None:
        for inst in typed.graph.nodes.values():
            blocks[inst.entry.name] = inst.entry.source
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "blockgraph_version": _version(),
        "torch_version": torch.__version__,
        "spec_name": valid.spec.name,
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


def _write_text(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def _default_permissions(directory: Path) -> None:
    """What a plain mkdir and open would give (mkdtemp makes the directory private to its owner)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for item in directory.iterdir():
        os.chmod(item, 0o666 & ~umask)


def _move_into_place(tmp: Path, directory: Path) -> None:
    """Rename the finished temporary directory to `directory`, replacing an old save only once the new one is whole."""
    if not directory.exists():
        os.replace(tmp, directory)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
    os.replace(directory, old / "model")
    try:
        os.replace(tmp, directory)
    except BaseException:
        os.replace(old / "model", directory)
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
