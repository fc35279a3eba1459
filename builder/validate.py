"""Loaded data → a validated `Spec`: merge `extends`, apply overrides, substitute `${...}`, check with pydantic."""

from __future__ import annotations

import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from builder.expressions import ExpressionError, ReportedError, Scope, check_size, substitute
from builder.source import Document, SourceMap, load_file
from builder.spec import EXPR_RE, NAME_RE, PARAM_PATH_RE, Spec
from builder.spec_files import FileAccess
from common.errors import Problem, ProblemList, SpecError, SpecPath
from common.text import excerpt

MAX_EXTENDS = 16


@dataclass
class ValidSpec:
    """A spec that passed validation, with everything later stages need to report located problems."""

    spec: Spec
    source: SourceMap
    scope: Scope
    file: Path | None = None
    standalone: dict[str, Any] | None = None  # extends merged, overrides written into vars: loadable on its own
    files: FileAccess = field(default_factory=lambda: FileAccess(Path.cwd()))  # where its files may be


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
    # variables first, so that a bad variable is reported at its definition rather than at its first use
    resolved_vars = {name: resolve_variable(scope, name, source, problems) for name in raw_vars}
    resolved = {
        key: value if key in ("blocks", "vars") else substitute_located(value, (key,), scope, source, problems)
        for key, value in data.items()
    }
    resolved["vars"] = resolved_vars
    problems.raise_if_errors()
    try:
        spec = Spec.model_validate(resolved)
    except ValidationError as exc:
        raise SpecError(pydantic_problems(exc, (), source, Spec, resolved)) from exc
    standalone = {k: v for k, v in data.items() if k != "extends"}
    if raw_vars:
        standalone["vars"] = raw_vars
    return ValidSpec(spec, source, scope, document.path, standalone=standalone, files=files)


def resolve_variable(scope: Scope, name: str, source: SourceMap, problems: ProblemList) -> Any:
    """A variable's value, its failure reported at the variable that failed (once), or its raw value."""
    try:
        return scope.value(name)
    except ReportedError:
        return scope.raw[name]
    except ExpressionError as exc:
        problems.add(Problem(exc.message, source.locate(exc.path or (*scope.origin, name)), hint=exc.hint))
        return scope.raw[name]


def substitute_located(value: Any, path: SpecPath, scope: Scope, source: SourceMap, problems: ProblemList) -> Any:
    """`substitute`, reporting each failing `${...}` at its own line and carrying on with the rest."""
    result = _substitute_each(value, path, scope, source, problems)
    try:
        check_size(result)
    except ExpressionError as exc:
        problems.add(Problem(exc.message, source.locate(exc.path or path), hint=exc.hint))
        return value
    return result


def _substitute_each(value: Any, path: SpecPath, scope: Scope, source: SourceMap, problems: ProblemList) -> Any:
    if isinstance(value, dict):
        return {k: _substitute_each(v, (*path, k), scope, source, problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute_each(v, (*path, i), scope, source, problems) for i, v in enumerate(value)]
    try:
        return substitute(value, scope)
    except ReportedError:  # the variable's own definition is already reported, at its line
        return value
    except ExpressionError as exc:
        problems.add(Problem(exc.message, source.locate(exc.path or path), hint=exc.hint))
        return value


def pydantic_problems(
    exc: ValidationError, prefix: SpecPath, source: SourceMap, model: type[BaseModel], data: Any = None
) -> list[Problem]:
    """Turn pydantic's errors into located problems, with did-you-mean for unknown keys.

    A value checked against a union (`repeat: int | ${...}`) fails once per member; those failures are
    merged into one problem about the value, located at the value (`data` tells locations from member tags).
    """
    groups: dict[tuple[Any, ...], list[Any]] = {}
    for err in exc.errors():
        loc = _value_loc(err["loc"], data)
        groups.setdefault(loc, []).append(err)
    problems = []
    suggested: set[tuple[Any, ...]] = set()  # `heads` suggested for `head`: "missing key 'heads'" says nothing new
    for loc, errors in groups.items():
        if errors[0]["type"] == "extra_forbidden" and loc:
            close = difflib.get_close_matches(str(loc[-1]), _allowed_keys(model, loc[:-1]), n=1)
            suggested |= {(*loc[:-1], c) for c in close}
    for loc, errors in groups.items():
        path = (*prefix, *loc)
        err = errors[0]
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
            if loc not in suggested:
                problems.append(Problem(f"missing required key {loc[-1]!r}", source.locate(path[:-1])))
        else:
            problems.extend(Problem(message, source.locate(path)) for message in _messages(errors))
    return problems


_PATTERNS = {
    NAME_RE: "a name (letters, digits and _, not starting with a digit)",
    EXPR_RE: "a ${...} expression",
    PARAM_PATH_RE: "a parameter path such as generator.proj.weight",
}
_MISMATCH = ("_type", "_parsing", "string_pattern_mismatch", "int_from_float")


def _messages(errors: list[Any]) -> list[str]:
    """One message for a value: a union's members are alternatives, the rest each get their own line."""
    if len(errors) > 1 and all(_same(e.get("input"), errors[0].get("input")) for e in errors):
        found = f"; found {_short(errors[0].get('input'))}"
        constraint = next((e for e in errors if not e["type"].endswith(_MISMATCH)), None)
        if constraint is not None:  # the value has the right type for one member, which has a complaint
            return [_message(constraint)]
        alternatives = list(dict.fromkeys(_expected(e) for e in errors))
        return [f"expected {' or '.join(alternatives)}{found}"]
    return [_message(e) for e in errors]


def _same(a: Any, b: Any) -> bool:
    return a is b or (type(a) is type(b) and isinstance(a, str | int | float) and a == b)


def _message(err: Any) -> str:
    kind = err["type"]
    found = f"; found {_short(err.get('input'))}"
    if kind in ("string_pattern_mismatch", "model_type", "model_attributes_type", "dict_type"):
        return f"expected {_expected(err)}{found}"  # in words, without pydantic's class names or regexes
    message = err["msg"].removeprefix("Value error, ")
    return message if kind == "value_error" else message + found


def _expected(err: Any) -> str:
    """What a failed union member wanted, in words."""
    kind = err["type"]
    if kind == "string_pattern_mismatch":
        pattern = (err.get("ctx") or {}).get("pattern", "")
        return _PATTERNS.get(pattern, f"a string matching {pattern}")
    for start, words in (
        ("int", "an integer"),
        ("float", "a number"),
        ("bool", "true or false"),
        ("string", "a string"),
        ("list", "a list"),
        ("dict", "a mapping"),
        ("model", "a mapping"),
        ("none", "null"),
        ("literal", "one of the allowed values"),
    ):
        if kind.startswith(start):
            return words
    return err["msg"]


def _value_loc(loc: tuple[Any, ...], data: Any) -> tuple[Any, ...]:
    """`loc` without pydantic's tags for union members and validators (`constrained-int`, `function-after[...]`).

    A part that is a key (or index) of `data` is kept; any other part is a tag unless it looks like a
    field name (the last part of a missing key).
    """
    out: list[Any] = []
    current = data
    for part in loc:
        inside = (isinstance(current, dict) and part in current) or (
            isinstance(current, list) and isinstance(part, int) and 0 <= part < len(current)
        )
        if inside:
            current = current[part]
        elif isinstance(part, str) and (not re.match(NAME_RE, part) or part[0].isupper() or part in _TYPE_TAGS):
            continue
        else:
            current = None
        out.append(part)
    return tuple(out)


_TYPE_TAGS = {"int", "float", "str", "bool", "none", "list", "dict"}


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
    if base_path in chain or base_path == here:
        cycle = " → ".join(str(p.name) for p in [*chain, here, base_path])
        raise SpecError(Problem(f"extends forms a cycle: {cycle}", where, hint="a spec cannot extend itself"))
    if not base_path.exists():
        raise SpecError(Problem(f"extends: base spec not found: {base_path}", where, "paths are relative to this file"))
    try:
        base_doc = load_file(base_path, named_by_spec=True)
    except SpecError as exc:  # a problem without a line in the base file is shown at the `extends:` naming it
        raise SpecError(
            [Problem(f"extends: {p.message}", p.location if p.location.line else where, p.hint) for p in exc.problems]
        ) from None
    if not isinstance(base_doc.data, dict):
        kind = type(base_doc.data).__name__
        raise SpecError(Problem(f"extends: the base spec {excerpt(base_ref, 80)} is a {kind}, not a mapping", where))
    base_data, base_source = _merge_extends(base_path, base_doc.data, base_doc.source, [*chain, here], files)
    merged = _deep_merge(base_data, {k: v for k, v in data.items() if k != "extends"})
    merged_source = SourceMap(
        source.file,
        {**base_source.values, **source.values},
        {**base_source.keys, **source.keys},
        source.reached | base_source.reached | {base_source.file or ""},
    )
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
