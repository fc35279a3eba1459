"""Loaded data → a validated `Spec`: merge `extends`, apply overrides, substitute `${...}`, check with pydantic."""

from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from builder.errors import Location, Problem, ProblemList, SpecError, SpecPath
from builder.expressions import ExpressionError, Scope, substitute
from builder.load import Document, SourceMap, load_file
from builder.spec import Spec

MAX_EXTENDS = 16


@dataclass
class ValidSpec:
    """A spec that passed validation, with everything later stages need to report located problems."""

    spec: Spec
    source: SourceMap
    scope: Scope
    file: Path | None = None
    warnings: tuple[Problem, ...] = ()
    standalone: dict[str, Any] | None = None  # extends merged, overrides written into vars: loadable on its own


def validate_document(document: Document, overrides: dict[str, Any] | None = None) -> ValidSpec:
    problems = ProblemList()
    data, source = document.data, document.source
    if not isinstance(data, dict):
        raise SpecError(
            Problem(
                f"a spec is a mapping, found {type(data).__name__}",
                source.locate(()),
                hint="start with `name:`, `inputs:`, `nodes:`, `outputs:`",
            )
        )
    if "extends" in data and document.path is not None:
        data, source = _merge_extends(document.path, data, source, [])
    raw_vars = data.get("vars") or {}
    if not isinstance(raw_vars, dict):
        raise SpecError(Problem("vars must be a mapping name → value", source.locate(("vars",))))
    raw_vars = dict(raw_vars)
    for name, value in (overrides or {}).items():
        if name not in raw_vars:
            close = difflib.get_close_matches(name, list(raw_vars), n=1)
            problems.add(
                Problem(
                    f"--set {name}: the spec has no variable {name!r}",
                    source.locate(("vars",)),
                    hint=f"did you mean {close[0]!r}?" if close else f"variables: {', '.join(raw_vars) or 'none'}",
                )
            )
        raw_vars[name] = value
    scope = Scope(raw_vars)
    resolved = {
        key: value if key in ("blocks", "vars") else substitute_located(value, (key,), scope, source, problems)
        for key, value in data.items()
    }
    resolved["vars"] = {
        name: substitute_located(raw_vars[name], ("vars", name), scope, source, problems) for name in raw_vars
    }
    problems.raise_if_errors()
    try:
        spec = Spec.model_validate(resolved)
    except ValidationError as exc:
        raise SpecError(pydantic_problems(exc, (), source, Spec)) from exc
    standalone = {k: v for k, v in data.items() if k != "extends"}
    if raw_vars:
        standalone["vars"] = raw_vars
    return ValidSpec(spec, source, scope, document.path, standalone=standalone)


def substitute_located(value: Any, path: SpecPath, scope: Scope, source: SourceMap, problems: ProblemList) -> Any:
    """`substitute`, reporting each failing `${...}` at its own line and carrying on with the rest."""
    if isinstance(value, dict):
        return {k: substitute_located(v, (*path, k), scope, source, problems) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute_located(v, (*path, i), scope, source, problems) for i, v in enumerate(value)]
    try:
        return substitute(value, scope)
    except ExpressionError as exc:
        problems.add(Problem(exc.message, source.locate(path), hint=exc.hint))
        return value


def pydantic_problems(
    exc: ValidationError, prefix: SpecPath, source: SourceMap, model: type[BaseModel]
) -> list[Problem]:
    """Turn pydantic's errors into located problems, with did-you-mean for unknown keys."""
    problems = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        path = (*prefix, *loc)
        kind = err["type"]
        if kind == "extra_forbidden":
            key = loc[-1] if loc else "?"
            allowed = _allowed_keys(model, loc[:-1])
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = (
                f"did you mean {close[0]!r}?" if close else (f"allowed keys: {', '.join(allowed)}" if allowed else None)
            )
            problems.append(Problem(f"unknown key {key!r}", source.locate(path, key=True), hint=hint))
        elif kind == "missing":
            problems.append(Problem(f"missing required key {loc[-1]!r}", source.locate(path[:-1])))
        else:
            message = err["msg"].removeprefix("Value error, ")
            if kind != "value_error":
                message += f"; found {_short(err.get('input'))}"
            problems.append(Problem(message, source.locate(path)))
    return problems


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _allowed_keys(model: Any, loc: tuple[Any, ...]) -> list[str]:
    """The field names (aliases) of the model found by following `loc` from `model`."""
    current = model
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = next((f for n, f in current.model_fields.items() if (f.alias or n) == part), None)
            if field is None:
                return []
            current = field.annotation
        elif typing.get_origin(current) in (dict, list):
            current = typing.get_args(current)[-1]
        else:
            return []
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [f.alias or n for n, f in current.model_fields.items()]
    return []


def _unwrap(annotation: Any) -> Any:
    """Strip Annotated/Optional wrappers down to a model, dict or list type."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    args = typing.get_args(annotation)
    if args and typing.get_origin(annotation) not in (dict, list):
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        return models[0] if models else annotation
    return annotation


def _merge_extends(
    path: Path, data: dict[str, Any], source: SourceMap, chain: list[Path]
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
    base_path = (path.parent / base_ref).resolve()
    if base_path in chain or base_path == here:
        cycle = " → ".join(str(p.name) for p in [*chain, here, base_path])
        raise SpecError(Problem(f"extends forms a cycle: {cycle}", where, hint="a spec cannot extend itself"))
    if not base_path.exists():
        raise SpecError(
            Problem(f"extends: base spec not found: {base_path}", where, hint="paths are relative to this file")
        )
    base_doc = load_file(base_path)
    if not isinstance(base_doc.data, dict):
        raise SpecError(Problem("the base spec is not a mapping", Location(str(base_path))))
    base_data, base_source = _merge_extends(base_path, base_doc.data, base_doc.source, [*chain, here])
    merged = _deep_merge(base_data, {k: v for k, v in data.items() if k != "extends"})
    merged_source = SourceMap(source.file, {**base_source.values, **source.values}, {**base_source.keys, **source.keys})
    return merged, merged_source


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
