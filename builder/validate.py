"""Loaded data → a validated `Spec`: merge `extends`, apply overrides, substitute `${...}`, check with pydantic."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from blockgraph.blocks import REGISTRY
from blockgraph.builder.expressions import Scope, mentions
from blockgraph.builder.located import failed_paths, pydantic_problems, resolve_variable, substitute_located
from blockgraph.builder.resolve import COPY, Level, resolve
from blockgraph.builder.resolved import resolved_spec
from blockgraph.builder.source import Document, SourceMap, load_file
from blockgraph.builder.spec import Spec
from blockgraph.builder.spec_files import FileAccess
from blockgraph.common.errors import Location, Problem, ProblemList, SpecError, SpecPath, unquoted
from blockgraph.common.text import excerpt

MAX_EXTENDS = 16


@dataclass(frozen=True)
class ValidSpec:
    """A spec that passed validation: its model, every node resolved (`top`), and where each value is written."""

    spec: Spec
    source: SourceMap
    top: Level  # the spec's nodes, each block's params validated and every sub-graph resolved (builder.resolve)
    file: Path | None = None
    standalone: dict[str, Any] = field(default_factory=dict)  # extends merged, overrides in vars: loads on its own
    warnings: tuple[Problem, ...] = ()

    def resolved(self) -> dict[str, Any]:
        """The spec as validation read it, as a spec of its own that builds the same model (see resolved_spec)."""
        return resolved_spec(self.spec, self.top, self.file.parent if self.file is not None else Path())


def validate_document(
    document: Document, overrides: dict[str, Any] | None = None, *, allow_external_files: bool = False
) -> ValidSpec:
    problems = ProblemList()
    root = document.path.parent if document.path is not None else Path.cwd()
    files = FileAccess(root.resolve(), allow_external_files)
    data, source = document.data, document.source
    if not isinstance(data, dict):
        raise SpecError(
            Problem(
                f"a spec is a mapping, found {type(data).__name__}",
                source.locate(()),
                hint="start with `name:`, `inputs:`, `nodes:`, `outputs:`",
            )
        )
    if "extends" in data:  # a spec given as a mapping has no file: its base is relative to the working directory
        data, source = _merge_extends(document.path or Path.cwd() / "<spec>", data, source, [], files)
    raw_vars = data.get("vars") or {}
    if not isinstance(raw_vars, dict):
        raise SpecError(Problem("vars must be a mapping name → value", source.locate(("vars",))))
    raw_vars = dict(raw_vars)
    # a hint lists no variable of a reached base: its names are its text
    shown = [name for name in raw_vars if source.locate(("vars", name), key=True).quoted]
    listed = f"variables: {', '.join(shown) or 'none'}" if shown or not raw_vars else None
    for name, value in (overrides or {}).items():
        if name not in raw_vars:
            close = difflib.get_close_matches(name, shown, n=1)
            problems.add(
                Problem(
                    f"--set {name}: the spec has no variable {name!r}",
                    source.locate(("vars",)),
                    hint=f"did you mean {close[0]!r}?" if close else listed,
                )
            )
        raw_vars[name] = value
    scope = Scope(raw_vars)
    # variables first, so that a bad variable is reported at its definition rather than at its first use
    resolved_vars = {name: resolve_variable(scope, name, source, problems) for name in raw_vars}
    failed: list[SpecPath] = []
    per_copy = _per_copy(data.get("nodes"))  # substituted copy by copy at resolution
    blanked = data  # per-copy keys left out of substitution; the standalone spec keeps them as written
    if per_copy:
        nodes = {name: {**node, **dict.fromkeys(per_copy.get(name, ()), "")} for name, node in data["nodes"].items()}
        blanked = {**data, "nodes": nodes}
    resolved = {
        key: value if key in ("blocks", "vars") else substitute_located(value, (key,), scope, source, problems, failed)
        for key, value in blanked.items()
    }
    for name, kept in per_copy.items():
        resolved["nodes"][name].update(kept)
    resolved["vars"] = resolved_vars
    spec, left_out = _checked_spec(resolved, failed, source, problems)
    top = resolve(spec, source, scope, files, document.path, problems, left_out)
    for target, tied in spec.tie.items():
        if tied in spec.tie:  # compile ties one at a time: a chain would leave `target` on a stale tensor
            problems.add(
                Problem(
                    f"tie {target} → {tied}, but {tied} is itself tied to {spec.tie[tied]}",
                    source.locate(("tie", target)),
                    hint=f"tie {target} to {spec.tie[tied]} directly",
                )
            )
    problems.raise_if_errors()
    standalone = {k: v for k, v in data.items() if k != "extends"}
    if raw_vars:
        standalone["vars"] = raw_vars
    warnings = (*problems.warnings, *_subgraphs_named_like_blocks(spec, source), *_unused_variables(scope, source))
    return ValidSpec(spec, source, top, document.path, standalone, warnings)


def _per_copy(nodes: Any) -> dict[str, dict[str, Any]]:
    """The `type` and `params` of each repeated node that reads `${copy}`, which only resolution knows per copy."""
    if not isinstance(nodes, dict):
        return {}
    found = {}
    for name, node in nodes.items():
        if isinstance(node, dict) and node.get("repeat") is not None:
            kept = {key: node[key] for key in ("type", "params") if key in node}
            if any(mentions(value, COPY) for value in kept.values()):
                found[name] = kept
    return found


SECTIONS = ("inputs", "nodes", "blocks", "vars", "dims", "tie")  # mappings of independent entries
STAND_INS: dict[str, Any] = {"name": "", "inputs": {}, "outputs": "_"}  # for a required key that failed


def _checked_spec(
    data: dict[str, Any], failed: list[SpecPath], source: SourceMap, problems: ProblemList
) -> tuple[Spec, frozenset[SpecPath]]:
    """The spec validated without the parts that failed (a `${...}`, or pydantic's check of a node, an input, a
    sub-graph, a key), so that the rest is still resolved: one node's mistake never hides another's. A failed
    required key is validated as a stand-in, and what refers to a part left out is not reported again. When
    nothing is left to resolve (`nodes:` itself failed), what was found is raised."""
    left_out = {_part(path) for path in failed}
    for attempt in range(2):  # pydantic reports every error at once: a second round only meets what was cut
        candidate = _without(data, left_out)
        try:
            return Spec.model_validate(candidate), frozenset(left_out)
        except ValidationError as exc:
            for problem in pydantic_problems(exc, (), source, Spec, candidate, ignore=left_out):
                problems.add(problem)
            if attempt:
                break
            left_out |= {_part(path) for path in failed_paths(exc, candidate) if path}
    raise SpecError(problems.errors)


def _part(path: SpecPath) -> SpecPath:
    """The part of the spec that a failure at `path` leaves out: a node, an input, a sub-graph, an entry of
    `vars`, `dims` or `tie`, or a top-level key."""
    if path[:1] == ("blocks",) and len(path) > 3 and path[2] == "nodes":
        return path[:4]
    if path[:1] and path[0] in SECTIONS and len(path) > 1:
        return path[:2]
    return path[:1]


def _without(data: dict[str, Any], parts: set[SpecPath]) -> dict[str, Any]:
    """`data` without the values at `parts` (copied where it changes), a required key given its stand-in."""
    for part in parts:
        data = _remove(data, part)
    return {**data, **{key: value for key, value in STAND_INS.items() if (key,) in parts}}


def _remove(data: Any, path: SpecPath) -> Any:
    if not isinstance(data, dict) or path[0] not in data:
        return data
    if len(path) == 1:
        return {key: value for key, value in data.items() if key != path[0]}
    return {**data, path[0]: _remove(data[path[0]], path[1:])}


def _subgraphs_named_like_blocks(spec: Spec, source: SourceMap) -> list[Problem]:
    return [
        Problem(
            f"sub-graph {name!r} has the name of a registered block; nodes of type {name!r} use the sub-graph",
            source.locate(("blocks", name), key=True),
            hint="rename the sub-graph to avoid the confusion",
            severity="warning",
        )
        for name in spec.blocks
        if name in REGISTRY
    ]


def _unused_variables(scope: Scope, source: SourceMap) -> list[Problem]:
    """Variables no `${...}` of the resolved spec refers to (a variable used only by another counts as used)."""
    return [
        Problem(f"variable {name!r} is never used", source.locate(("vars", name)), severity="warning")
        for name in scope.raw
        if name not in scope.used
    ]


def _merge_extends(
    path: Path, data: dict[str, Any], source: SourceMap, chain: list[Path], files: FileAccess
) -> tuple[dict[str, Any], SourceMap]:
    """Deep-merge this spec over the one it `extends:` (recursively); mappings merge, other values replace."""
    here = path.resolve()
    base_ref = data.get("extends")
    if base_ref is None:
        return data, source
    where = source.locate(("extends",))
    if not isinstance(base_ref, str):
        raise SpecError(Problem("extends must be a file path", where))
    if len(chain) >= MAX_EXTENDS:
        raise SpecError(Problem(f"more than {MAX_EXTENDS} levels of extends", where))
    base_path = files.resolve(base_ref, path.parent, where, "extends:")
    try:
        base_path = base_path.resolve()
    except (OSError, ValueError, RuntimeError) as exc:  # a NUL byte, a name too long, a loop of links
        raise SpecError(Problem(f"extends: {excerpt(base_ref, 80)} is not a usable path", where)) from exc
    if base_path in chain or base_path == here:  # names of existing specs of the chain, shown even from a base
        cycle = " → ".join(str(p.name) for p in [*chain, here, base_path])
        raise SpecError(Problem(f"extends forms a cycle: {cycle}", where, hint="a spec cannot extend itself"))
    if not base_path.exists():  # the path a base's `extends:` writes is that base's text
        message = f"extends: base spec not found: {base_path}" if where.quoted else "extends: base spec not found"
        raise SpecError(Problem(message, where, "paths are relative to this file"))
    try:
        base_doc = load_file(base_path, named_by_spec=True)
    except SpecError as exc:
        raise SpecError([_base_problem(p, where, base_path) for p in exc.problems]) from None
    if not isinstance(base_doc.data, dict):
        kind = type(base_doc.data).__name__
        raise SpecError(Problem(f"extends: the base spec {excerpt(base_ref, 80)} is a {kind}, not a mapping", where))
    base_data, base_source = _merge_extends(base_path, base_doc.data, base_doc.source, [*chain, here], files)
    merged = _deep_merge(base_data, {k: v for k, v in data.items() if k != "extends"})
    merged_source = SourceMap(
        source.file,
        {**base_source.values, **source.values},
        {**base_source.keys, **source.keys},
        source.reached | base_source.reached,  # a base's own source marks it reached
    )
    return merged, merged_source


def _base_problem(problem: Problem, where: Location, base_path: Path) -> Problem:
    """A problem loading a base file, shown without its text: at its line there (unquoted), or at the `extends:`.

    At the `extends:` of a base, the base's path is that base's text too."""
    message = problem.message if where.quoted else problem.message.replace(str(base_path), "the base spec")
    at = replace(problem.location, quoted=False) if problem.location.line else where
    return Problem(f"extends: {unquoted(message)}", at, problem.hint and unquoted(problem.hint))


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out
