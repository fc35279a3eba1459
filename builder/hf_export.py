"""A model of a registered family → a Hugging Face-format directory that `transformers` loads with its Auto class
(no remote code): the way back from `blockgraph import` (builder.hf_import).

Refuse, don't approximate: the model is exported only if the family's spec, rendered from the variables that
config.json can hold and read back from it, builds this very model (every node's type, parameters and inputs,
every tensor's name and shape); each difference is reported at its place in the model's spec.

The directory holds `config.json` (model_type, architectures, every size and option the family reads),
`model.safetensors` (or shards with their index, over `max_shard_size`), `generation_config.json` for a model
that generates, and the tokenizer files given. It is written atomically, into a new or empty directory.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from blockgraph.builder.families import FAMILIES
from blockgraph.builder.graph import Graph
from blockgraph.builder.hf_import import spec_text, spec_variables
from blockgraph.builder.hf_mappings import Derived, Family, to_hf
from blockgraph.builder.model import GraphModel
from blockgraph.builder.persist import unique_tensors
from blockgraph.builder.pipeline import compile_graph, typed_graph
from blockgraph.common.atomic import check_directory_target, write_directory
from blockgraph.common.errors import CheckpointError, Location, Problem, UsageError
from blockgraph.common.text import excerpt

WHAT = "Hugging Face export"
SPECIAL_KEYS = {
    "pad": "pad_token_id",
    "bos": "bos_token_id",
    "eos": "eos_token_id",
    "decoder_start": "decoder_start_token_id",
}
UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
MAX_SHARD_SIZE = 5 * UNITS["GB"]  # "5GB", transformers' `save_pretrained` default


@dataclass(frozen=True)
class Exported:
    """What an export wrote."""

    model_type: str
    files: list[str]
    tensors: int


def hf_config(family: Family, variables: Mapping[str, Any], specials: Mapping[str, int | None]) -> dict[str, Any]:
    """config.json for the family's spec at `variables`: what its reading reads, the options as the spec fixes them."""
    config: dict[str, Any] = {"model_type": family.model_type, "architectures": list(family.architectures)}
    for name, value in family.variables.items():
        if not callable(value):
            config[value if isinstance(value, str) else value[0]] = variables[name]
    config.update(family.written(variables))
    for option, accepted in family.fixed.items():
        if option not in family.options:  # read from elsewhere: `written` holds it
            first = accepted[0]
            config[option] = first.value(config) if isinstance(first, Derived) else first
    config.update({SPECIAL_KEYS[name]: i for name, i in specials.items() if i is not None})
    return config


def matching_family(model: GraphModel, model_type: str | None, where: Location) -> Family:
    """The family `model` is (the one named, else the first registered that builds it); its refusals otherwise."""
    graph: Graph = model.typed_graph.graph
    candidates = [FAMILIES[model_type]] if model_type in FAMILIES else list(FAMILIES.values())
    refusals = []
    for family in candidates:
        if not set(family.variables) <= set(graph.vars):
            continue
        problems = differences(family, graph, model)
        if not problems:
            return family
        refusals.append(problems)
    if not refusals:
        raise CheckpointError(
            Problem(
                "the model is none of the registered families (its spec's variables are no family's)",
                where,
                hint="export it with `--format exported-program` or `--format onnx`, or register its family "
                "(docs/architecture.md)",
            )
        )
    raise CheckpointError(min(refusals, key=len))


def differences(family: Family, graph: Graph, model: torch.nn.Module) -> list[Problem]:
    """Why the family's config.json cannot express `graph`: each variable it would read otherwise, each node
    of its spec (rendered from what config.json holds) that differs, each tensor of another name or shape."""
    name = family.model_type
    variables = {key: graph.vars[key] for key in family.variables}
    config = hf_config(family, variables, {})
    where = Location("config.json")
    try:
        read = spec_variables(family, config, where)
    except CheckpointError as error:
        return error.problems
    problems = [
        Problem(
            f"variable {key}: {_shown(variables[key])}; {name}'s config.json gives {_shown(read[key])}",
            graph.locate(("vars", key)),
        )
        for key in variables
        if read[key] != variables[key]
    ]
    their_typed = typed_graph(spec_text_source(family, read))
    theirs = their_typed.graph
    for node_id in sorted(set(graph.nodes) | set(theirs.nodes)):
        ours_node, their_node = graph.nodes.get(node_id), theirs.nodes.get(node_id)
        if ours_node is None:
            problems.append(Problem(f"node {node_id}: missing; {name}'s config.json always has it"))
            continue
        at = graph.locate(ours_node.spec_path)
        if their_node is None:
            problems.append(Problem(f"node {node_id}: {name}'s config.json cannot express an extra node", at))
        elif ours_node.entry.name != their_node.entry.name:
            problems.append(
                Problem(
                    f"node {node_id}: type {ours_node.entry.name}; {name}'s config.json says {their_node.entry.name}",
                    at,
                )
            )
        else:
            mine, given = ours_node.params.model_dump(), their_node.params.model_dump()
            problems += [
                Problem(
                    f"node {node_id}: {key} {_shown(mine.get(key))}; {name}'s config.json says "
                    f"{_shown(given.get(key))}",
                    at,
                )
                for key in sorted(set(mine) | set(given))
                if mine.get(key) != given.get(key)
            ]
            if ours_node.bindings != their_node.bindings:
                problems.append(Problem(f"node {node_id}: its inputs are not the {name} spec's", at))
    if graph.ties != theirs.ties or graph.outputs != theirs.outputs:
        problems.append(Problem(f"the model's ties or outputs are not the {name} spec's"))
    if not problems:
        built = compile_graph(their_typed, device="meta")
        shapes = {key: tuple(t.shape) for key, t in model.state_dict().items()}
        if shapes != {key: tuple(t.shape) for key, t in built.state_dict().items()}:
            problems.append(Problem(f"the model's tensors are not the {name} spec's"))
    return problems


def spec_text_source(family: Family, variables: Mapping[str, Any]) -> dict[str, Any]:
    """The family's spec at `variables`, as a mapping the pipeline reads."""
    import yaml

    return yaml.safe_load(spec_text(family, variables, "export"))


def _shown(value: Any) -> str:
    return excerpt("null" if value is None else str(value), 40)


def export_hf(
    model: GraphModel,
    out: str | Path,
    *,
    model_type: str | None = None,
    specials: Mapping[str, int | None] | None = None,
    tokenizer: Mapping[str, bytes] | None = None,
    max_shard_size: int = MAX_SHARD_SIZE,
) -> Exported:
    """Write `model` as the Hugging Face directory `out` (see the module's docstring): complete, or nothing.

    `model_type` names its family (an import's record); `specials` are its token ids (the family's defaults
    where not given); `tokenizer` the files to carry, by name; `max_shard_size` the bytes of a weights file.
    """
    out = Path(out)
    check_directory_target(out, owned=_never, what=WHAT)
    family = matching_family(model, model_type, Location(str(out)))
    graph: Graph = model.typed_graph.graph
    variables = {key: graph.vars[key] for key in family.variables}
    ids = {**family.specials, **(specials or {})}
    config = hf_config(family, variables, ids)
    config["dtype"] = str(next(iter(model.parameters())).dtype).removeprefix("torch.")
    tensors = {
        name: tensor.detach().cpu().contiguous()
        for name, tensor in to_hf(family, unique_tensors(model)[0], heads=variables.get("heads")).items()
    }
    shards = _shards(tensors, max_shard_size)
    files = {"config.json": _json(config), **dict(tokenizer or {})}
    if family.generates:
        generation = {SPECIAL_KEYS[name]: i for name, i in ids.items() if i is not None}
        files["generation_config.json"] = _json(generation)

    def fill(folder: Path) -> None:
        folder.mkdir(exist_ok=True)
        for name, data in files.items():
            (folder / name).write_bytes(data)
        for name, shard in shards.items():
            save_file(shard, str(folder / name), metadata={"format": "pt"})
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                "weight_map": {tensor: name for name, shard in shards.items() for tensor in shard},
            }
            (folder / "model.safetensors.index.json").write_bytes(_json(index))

    write_directory(out, fill, owned=_never, what=WHAT)
    return Exported(family.model_type, sorted(p.name for p in out.iterdir()), len(tensors))


def shard_size(text: str) -> int:
    """`--max-shard-size` in bytes, written as transformers writes it (`5GB`, `500MB`: powers of 1000; `1GiB`:
    of 1024), so a size copied from a Hugging Face command means the same here."""
    match = re.fullmatch(r"\s*(\d{1,13})\s*([a-z]{1,3})\s*", text, re.IGNORECASE)
    size = int(match[1]) * UNITS[match[2].upper()] if match and match[2].upper() in UNITS else None
    if size is None or not UNITS["KB"] <= size <= UNITS["TB"]:  # below 1KB each tensor is a shard anyway
        raise UsageError(
            Problem(
                f"--max-shard-size {excerpt(text, 20)}: a size from 1KB to 1TB, a whole number of B, KB, MB, GB, "
                "TB (powers of 1000), KiB, MiB or GiB",
                hint="transformers writes 5GB by default; e.g. --max-shard-size 2GB",
            )
        )
    return size


def _never(path: Path) -> bool:
    """Only a new or empty directory is written: a directory of Hugging Face files may be the user's own."""
    return False


def _shards(tensors: Mapping[str, torch.Tensor], limit: int) -> dict[str, dict[str, torch.Tensor]]:
    """model.safetensors, or model-0000k-of-0000n.safetensors of at most `limit` bytes each (a larger tensor alone)."""
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and size + nbytes > limit:
            groups.append({})
            size = 0
        groups[-1][name] = tensor
        size += nbytes
    if len(groups) == 1:
        return {"model.safetensors": groups[0]}
    return {f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors": group for k, group in enumerate(groups)}


def _json(data: Mapping[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
