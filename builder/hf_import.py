"""A Hugging Face-format model directory → the family's shipped spec, its variables read from the config, and
the weights mapped through the family's table (builder.hf_mappings).

Only what reproduces the model exactly is accepted: `config.json`'s `model_type` names a family, every option
the family's spec fixes must have the value the spec implements (all mismatches are reported together), and
the weights (`model.safetensors`, or the shards `model.safetensors.index.json` lists) must fill every tensor
of the spec through the table with nothing left over. Pickle checkpoints (`pytorch_model.bin`) are refused
unread. Nothing here runs code from the directory: the config is JSON, the weights safetensors.

The work of an import is the model's, not what the files claim: every tensor is checked from the headers (its
name, dtype and size against its place in the spec, built on `meta`) before anything is read, and only the
tensors the model takes are read (`Weights`). A config's numbers must be ones the model can hold (a size, a
finite float), whatever Python could hold.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml
from safetensors import safe_open

from blockgraph.builder import footprint
from blockgraph.builder.families import FAMILIES
from blockgraph.builder.hf_mappings import Config, Derived, Family, Value, convert, names_text, plan
from blockgraph.builder.model import GraphModel
from blockgraph.builder.persist import unique_tensors
from blockgraph.builder.pipeline import build, compile_graph
from blockgraph.builder.spec import MAX_DIM as MAX_SIZE
from blockgraph.common.errors import CheckpointError, Location, PluginError, Problem
from blockgraph.common.files import FileKind, MiB, read_json, read_text
from blockgraph.common.native import guarded
from blockgraph.common.tensorfile import TensorInfo, read_header
from blockgraph.common.text import excerpt

FAMILY_SPEC = FileKind("family spec", PluginError, limit=16 * MiB)
CONFIG_FILE = FileKind("model config", CheckpointError, limit=16 * MiB)
INDEX_FILE = FileKind("weights index", CheckpointError, limit=64 * MiB)
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")

T = TypeVar("T")


@dataclass(frozen=True)
class Imported:
    """A Hugging Face directory read into the family's spec: what to write, and the model with its weights."""

    model_type: str
    variables: dict[str, Any]  # the spec's variables, from the config
    specials: dict[str, int | None]  # pad, bos, eos, decoder_start ids
    spec_text: str  # the family's spec with these variables: readable, editable
    model: GraphModel
    tensors: int  # checkpoint tensors read


def _get(config: Config, value: Value) -> Any:
    if callable(value):
        return value(config)
    key, default = (value, None) if isinstance(value, str) else value
    return config.get(key, default)


def read_config(directory: Path) -> tuple[Family, dict[str, Any]]:
    """config.json's family (a registered one) and the whole config."""
    path = directory / "config.json"
    if not path.is_file():
        hint = "a Hugging Face model directory holds config.json and model.safetensors"
        raise CheckpointError(Problem(f"{directory} has no config.json", Location(str(directory)), hint=hint))
    config = read_json(path, CONFIG_FILE)
    where = Location(str(path))
    if not isinstance(config, dict):
        raise CheckpointError(Problem("config.json is not a JSON object", where))
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        shown = excerpt(str(model_type), 40) if model_type is not None else "none"
        raise CheckpointError(
            Problem(
                f"model_type {shown} cannot be imported",
                where,
                hint=f"supported: {', '.join(FAMILIES)}",
            )
        )
    return FAMILIES[model_type], config


SOFTCAPS = {"attn_softcap", "final_softcap"}  # Gemma's: a number, or null for none
YARN = {"yarn_factor", "yarn_mscale", "yarn_mscale_all_dim"}  # DeepSeek-V3's YaRN settings: null without YaRN
# the variables that are numbers (aux_weight: the weight of a router's balancing loss); the others are sizes
FLOAT_VARIABLES = {
    "eps",
    "vision_eps",
    "rope_theta",
    "rotary_pct",
    "dropout",
    "rope_local_theta",
    "rope_factor",
    "aux_weight",
    *SOFTCAPS,
    *YARN,
    "yarn_beta_fast",
    "yarn_beta_slow",
    "routed_scaling",
}
# may be null (eos_token: CLIP's text pooler then reads each text's largest id)
OPTIONAL_VARIABLES = {"window", *SOFTCAPS, *YARN, "yarn_original", "q_lora_rank", "eos_token"}


def spec_variables(family: Family, config: Config, where: Location) -> dict[str, Any]:
    """The family spec's variables from `config`; every option the spec fixes otherwise, and every value that is
    not the number the spec needs, is reported at once."""
    problems = [
        Problem(f"{key} is not a mapping of options", where)
        for key in family.nested
        if config.get(key) is not None and not isinstance(config.get(key), dict)
    ]
    variables = {}
    for name, value in family.variables.items():
        try:
            variables[name] = _get(config, value)
        except (TypeError, ValueError, AttributeError, ArithmeticError):  # a text, a list, an int beyond floats
            problems.append(Problem(f"cannot read the spec's {name} from this config", where))
            continue
        problem = _bad_number(name, variables[name])
        if problem:
            problems.append(Problem(problem, where))
    for option, accepted in family.fixed.items():
        read = family.options.get(option)
        have = read(config) if read else config.get(option, family.defaults.get(option, _ABSENT))
        if have is not _ABSENT and not any(_matches(have, value, config) for value in accepted):
            shown = " or ".join(_shown(value) for value in accepted)
            problems.append(
                Problem(
                    f"{option} is {excerpt(_shown(have), 40)}; the {family.model_type} spec implements {shown}",
                    where,
                    hint="this variant cannot be imported exactly (see docs/pretrained.md)",
                )
            )
    if problems:
        raise CheckpointError(problems)
    return variables


def _bad_number(name: str, value: Any) -> str | None:
    """Why `value` cannot be the spec variable `name`, or None."""
    if value is None and name in OPTIONAL_VARIABLES:
        return None
    if name in FLOAT_VARIABLES:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and _finite(value) and value >= 0
        return None if ok else f"{name} is {excerpt(_shown(value), 40)}, not a finite number ≥ 0"
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_SIZE:
        return None
    return f"{name} is {excerpt(_shown(value), 40)}, not a size from 1 to {MAX_SIZE:,}"


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer that no float holds
        return False


_ABSENT = object()  # an option config.json does not set, and transformers has no other default for


def _matches(have: Any, value: Any, config: Config) -> bool:
    """`value` is a literal, or `Derived` from the config's other options."""
    if isinstance(value, Derived):
        try:
            return bool(have == value.value(config))
        except (TypeError, ValueError, ArithmeticError):
            return False
    return bool(have == value)


def _shown(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def specials(family: Family, config: Config, vocab: int | None, where: Location) -> dict[str, int | None]:
    """The pad, bos, eos and decoder-start ids of the config (the family's defaults where it says nothing); a
    negative id means none (as some conversions write it), one past the vocabulary (`vocab`, None for a model
    that reads no tokens) is an error."""
    found: dict[str, int | None] = {}
    problems = []
    for name, default in family.specials.items():
        key = "decoder_start_token_id" if name == "decoder_start" else f"{name}_token_id"
        value = config.get(key, default)
        if isinstance(value, list):  # several eos ids: the first ends a sequence
            value = value[0] if value else None
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            value = None
        elif vocab is not None and value >= vocab:
            problems.append(Problem(f"{key} is {value}, beyond the vocabulary of {vocab}", where))
        found[name] = value
    if problems:
        raise CheckpointError(problems)
    return found


def weight_headers(directory: Path) -> dict[str, tuple[Path, TensorInfo]]:
    """Every tensor's file, dtype and shape: of model.safetensors, or of the shards model.safetensors.index.json
    names (plain file names in `directory`), each header read once."""
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.exists():
        return headers([single])
    if index.exists():
        return _shards(index)
    pickled = [name for name in PICKLES if (directory / name).exists()]
    if pickled:
        raise CheckpointError(
            Problem(
                f"{pickled[0]} is a pickle file, which can run code when read: it is not opened",
                Location(str(directory / pickled[0])),
                hint="convert it to safetensors where you trust it (transformers: the class config.json's "
                "`architectures` names, .from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)), "
                "then import DIR",
            )
        )
    raise CheckpointError(Problem(f"{directory} has no model.safetensors", Location(str(directory))))


def headers(files: list[Path]) -> dict[str, tuple[Path, TensorInfo]]:
    """Every tensor's file, dtype and shape, from the checked headers; a tensor in two shards is refused."""
    found: dict[str, tuple[Path, TensorInfo]] = {}
    for path in files:
        for name, info in read_header(str(path), "weights file").tensors.items():
            if name in found:
                raise CheckpointError(Problem(f"tensor {excerpt(name, 60)} is in two shards", Location(str(path))))
            found[name] = (path, info)
    return found


class Weights(Mapping[str, torch.Tensor]):
    """The checkpoint's tensors by name (today's, see `_as_today`), each read from its file when first asked for:
    what is never asked for is never read. Use it as a context: the files are closed after."""

    def __init__(self, found: Mapping[str, tuple[Path, TensorInfo, str]]):
        self._found = found  # name → (file, header entry, name in the file)
        self._read: dict[str, torch.Tensor] = {}
        self._files = contextlib.ExitStack()
        self._handles: dict[Path, Any] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._read:
            path, _, stored = self._found[name]

            def failed(failure: str) -> CheckpointError:
                return CheckpointError(Problem(f"cannot read the weights file ({failure})", Location(str(path))))

            with guarded(failed):
                if path not in self._handles:
                    self._handles[path] = self._files.enter_context(safe_open(str(path), framework="pt"))
                self._read[name] = self._handles[path].get_tensor(stored)
        return self._read[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._found)

    def __len__(self) -> int:
        return len(self._found)

    def __enter__(self) -> Weights:
        return self

    def __exit__(self, *exc: object) -> None:
        self._files.close()


def _shards(index: Path) -> dict[str, tuple[Path, TensorInfo]]:
    data = read_json(index, INDEX_FILE)
    where = Location(str(index))
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(Problem("field weight_map: expected a non-empty mapping of tensor → file", where))
    names = sorted({str(name) for name in weight_map.values()})
    bad = [name for name in names if not re.fullmatch(r"[\w.-]+\.safetensors", name) or name.startswith(".")]
    if bad:
        raise CheckpointError(
            Problem(f"field weight_map names {excerpt(bad[0], 40)}, not a .safetensors file beside it", where)
        )
    missing = [name for name in names if not (index.parent / name).is_file()]
    if missing:
        raise CheckpointError(Problem(f"shard {excerpt(missing[0], 60)} is missing", where))
    found = headers([index.parent / name for name in names])
    astray = [name for name, file in weight_map.items() if name not in found or found[name][0].name != file]
    if astray:
        raise CheckpointError(Problem(f"field weight_map: {excerpt(str(astray[0]), 60)} is not in its shard", where))
    return found


def spec_text(family: Family, variables: Mapping[str, Any], origin: str) -> str:
    """The family's shipped spec with `variables` written into its `vars:` block, comments kept."""
    lines = _standalone(family.spec_path)
    if "vars:" not in lines:  # a plugin family's spec: the config's variables have nowhere to go
        raise PluginError(
            Problem(
                f"the {family.model_type} family's spec has no top-level `vars:` block (one variable a line)",
                Location(str(family.spec_path)),
                hint="write the sizes the config reads as vars: in the family's spec",
            )
        )
    start = lines.index("vars:")
    end = next((i for i in range(start + 1, len(lines)) if lines[i] and not lines[i].startswith(" ")), len(lines))
    for i in range(start + 1, end):
        match = re.match(r"(  (\w+): )([^#]*?)(\s*#.*)?$", lines[i])
        if match and match.group(2) in variables:
            scalar = yaml.safe_dump(variables[match.group(2)], default_flow_style=True).splitlines()[0]
            lines[i] = f"{match.group(1)}{scalar}{match.group(4) or ''}"
    header = [
        f"# Imported by `blockgraph import` from {origin} (model_type {family.model_type}):",
        "# the variables below come from its config.json.",
    ]
    return "\n".join([*header, *lines]) + "\n"


def _standalone(path: Path) -> list[str]:
    """A shipped spec's lines; one that `extends:` another is the base's, with its own comments, name and
    description (a base's variables are all the extension's: the import sets every one)."""
    lines = read_text(path, FAMILY_SPEC).splitlines()
    base = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("extends:")), None)
    if base is None:
        return lines
    own = {line.split(":", 1)[0]: line for line in lines if line.startswith(("name:", "description:"))}
    comments = list(itertools.takewhile(lambda line: line.startswith("#"), lines))
    body = list(itertools.dropwhile(lambda line: line.startswith("#"), _standalone(path.parent / base)))
    return [*comments, *(own.get(line.split(":", 1)[0], line) for line in body)]


def import_directory(directory: str | Path) -> Imported:
    """Read a Hugging Face-format directory into the family's spec and a model holding its weights.

    Everything is checked from the config and the weights' headers first, on a model built on `meta`: the
    sizes, every tensor's name, dtype and size against the place the family's table gives it. Only then is
    anything allocated, and only the tensors the model takes are read.
    """
    directory = Path(directory)
    family, config = read_config(directory)
    where, weights = Location(str(directory / "config.json")), Location(str(directory))
    variables = spec_variables(family, config, where)
    found = _as_today(family, {name: (path, info, name) for name, (path, info) in weight_headers(directory).items()})
    plan(family, found)  # names first: a tensor no rule places, or two in one place, is refused before all else
    dtype = _dtype(found, weights)
    layout = build(family.spec_path, overrides=variables, dtype=dtype, device="meta")
    _check_size(layout, {name: info.shape for name, (_, info, _) in found.items()}, weights)
    _check_places(family, found, layout, weights)
    need = footprint.import_need(layout, [info for _, info, _ in found.values()])
    footprint.check(need, hint=footprint.IMPORT_ADVICE)  # before anything is allocated
    model = compile_graph(layout.typed_graph, dtype=dtype).eval()  # the meta layout's graph: resolved once
    targets = unique_tensors(model)[0]
    with Weights(found) as tensors:
        shapes = {name: tuple(t.shape) for name, t in targets.items()}
        state, computed = convert(family, tensors, heads=variables.get("heads"), shapes=shapes)
        for hf_name, our_name in computed:  # a table the spec computes (sinusoidal positions) must be the stored one
            ours, theirs = model.get_buffer(our_name).squeeze(0), tensors[hf_name]
            rows = min(len(ours), len(theirs)) if ours.dim() == theirs.dim() == 2 else 0
            same = rows and ours.shape[1] == theirs.shape[1]
            if not same or not torch.allclose(ours[:rows].float(), theirs[:rows].float(), atol=1e-4, rtol=0):
                raise CheckpointError(Problem(f"{hf_name} is not the table the spec computes", weights))
    wrong = [name for name, value in state.items() if targets[name].shape != value.shape]
    if wrong:
        name = wrong[0]
        have, want = tuple(state[name].shape), tuple(targets[name].shape)
        raise CheckpointError(Problem(f"{name}: the checkpoint's tensor is {have}, the spec's {want}", weights))
    with torch.no_grad():
        for name, value in state.items():
            targets[name].copy_(value)
    vocab = int(variables["vocab"]) if "vocab" in variables else None  # an image model reads no tokens
    text = spec_text(family, variables, excerpt(directory.resolve().name, 60))
    found_specials = specials(family, config, vocab, where)
    return Imported(family.model_type, variables, found_specials, text, model, len(found))


def _check_places(family: Family, found: Mapping[str, tuple[Path, TensorInfo, str]], layout: torch.nn.Module,
                  where: Location) -> None:  # fmt: skip
    """From the names and headers alone (nothing is read): every checkpoint tensor has a place in the model of
    the spec (`layout`, on meta) and the size of that place; every tensor of the model has a source."""
    targets = {name: t.numel() for name, t in unique_tensors(layout)[0].items()}
    filled: set[str] = set()
    astray, misfit = [], []
    for name, (rule, groups) in plan(family, found).items():
        shape = found[name][1].shape
        ours = [target.format(**groups) for target in rule.ours]
        if rule.transform == "tied":  # the same as its source, which is compared, not copied
            source = rule.source.format(**groups)
            fits = source in found and found[source][1].shape == shape
        elif rule.transform == "computed":  # held against the table the spec computes
            fits = math.prod(shape) <= sum(b.numel() for n, b in layout.named_buffers() if n in ours)
        else:
            astray += [target for target in ours if target not in targets]
            filled.update(ours)
            fits = math.prod(shape) == sum(targets.get(target, 0) for target in ours)
        if not fits:
            misfit.append(f"{name} {tuple(shape)}")
    missing = sorted(set(targets) - filled)
    problems = []
    if astray:
        problems.append(
            Problem(f"{len(astray)} tensor(s) of the checkpoint have no place in the spec: {names_text(astray)}", where)
        )
    if missing:
        problems.append(
            Problem(f"the checkpoint lacks {len(missing)} tensor(s) of the spec: {names_text(missing)}", where)
        )
    if misfit:
        problems.append(Problem(f"{names_text(misfit)}: not the size of its place in the spec", where))
    if problems:
        raise CheckpointError(problems)


def _check_size(layout: torch.nn.Module, shapes: Mapping[str, tuple[int, ...]], where: Location) -> None:
    """The config's model must be about as large as the weights (ties and computed tables aside)."""
    wanted = sum(t.numel() for t in unique_tensors(layout)[0].values())
    held = sum(math.prod(shape) for shape in shapes.values())
    if wanted > 1.05 * held + 4096:
        raise CheckpointError(
            Problem(
                f"config.json describes a model of {wanted:,} values; the weights hold {held:,}",
                where,
                hint="the config does not belong to these weights",
            )
        )


def _as_today(family: Family, tensors: dict[str, T]) -> dict[str, T]:
    """Older checkpoints' names as today's transformers writes them (the family's `legacy`); what it drops (the
    masks and frequencies they used to save) the spec computes."""
    renamed = ((family.legacy(name), tensor) for name, tensor in tensors.items())
    return {name: tensor for name, tensor in renamed if name is not None}


DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def _dtype(found: Mapping[str, tuple[Path, TensorInfo, str]], where: Location) -> torch.dtype:
    """The weights' floating dtype when they share one (a bfloat16 checkpoint stays bfloat16), else float32.
    Every tensor the model takes is a parameter: one in another dtype (integers, booleans, 8-bit floats) is
    refused by name, not cast."""
    unusable = sorted((name, info.dtype) for name, (_, info, _) in found.items() if info.dtype not in DTYPES)
    if unusable:
        name, kind = unusable[0]
        raise CheckpointError(
            Problem(
                f"tensor {excerpt(name, 60)} is {kind}: weights in {kind} cannot be imported",
                where,
                hint="the spec's tensors are floating: F16, BF16, F32 or F64",
            )
        )
    kinds = {info.dtype for _, info, _ in found.values()}
    return DTYPES[kinds.pop()] if len(kinds) == 1 else torch.float32
