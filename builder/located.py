"""Failures turned into located problems: pydantic's validation errors and `${...}` substitution errors.

Both stages that validate values (validation of the spec, resolution of every node's params) report through
these, so that a problem always names the file, line and spec path of the value, with a did-you-mean for
unknown keys and one message per value however many union members pydantic tried.
"""

from __future__ import annotations

import difflib
import re
import typing
from collections.abc import Collection
from typing import Any

from pydantic import BaseModel, ValidationError

from blockgraph.builder.expressions import ExpressionError, ReportedError, Scope, check_size, substitute
from blockgraph.builder.source import SourceMap
from blockgraph.builder.spec import EXPR_RE, NAME_RE, PARAM_PATH_RE
from blockgraph.common.errors import Problem, ProblemList, SpecPath


def resolve_variable(scope: Scope, name: str, source: SourceMap, problems: ProblemList) -> Any:
    """A variable's value, its failure reported at the variable that failed (once), or its raw value."""
    try:
        return scope.value(name)
    except ReportedError:
        return scope.raw[name]
    except ExpressionError as exc:
        problems.add(Problem(exc.message, source.locate(exc.path or (*scope.origin, name)), hint=exc.hint))
        return scope.raw[name]


def substitute_located(
    value: Any,
    path: SpecPath,
    scope: Scope,
    source: SourceMap,
    problems: ProblemList,
    failed: list[SpecPath] | None = None,
) -> Any:
    """`substitute`, reporting each failing `${...}` at its own line and carrying on with the rest.

    A value that failed is left as written and its path appended to `failed`: checking it further would only
    report the same mistake again (a variable whose definition failed is reported there, once)."""
    failures: list[SpecPath] = [] if failed is None else failed
    result = _substitute_each(value, path, scope, source, problems, failures)
    try:
        check_size(result)
    except ExpressionError as exc:
        problems.add(Problem(exc.message, source.locate(exc.path or path), hint=exc.hint))
        failures.append(path)
        return value
    return result


def _substitute_each(
    value: Any, path: SpecPath, scope: Scope, source: SourceMap, problems: ProblemList, failed: list[SpecPath]
) -> Any:
    if isinstance(value, dict):
        return {k: _substitute_each(v, (*path, k), scope, source, problems, failed) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute_each(v, (*path, i), scope, source, problems, failed) for i, v in enumerate(value)]
    try:
        return substitute(value, scope)
    except ReportedError:  # the variable's own definition is already reported, at its line
        failed.append(path)
        return value
    except ExpressionError as exc:
        problems.add(Problem(exc.message, source.locate(exc.path or path), hint=exc.hint))
        failed.append(path)
        return value


def pydantic_problems(
    exc: ValidationError,
    prefix: SpecPath,
    source: SourceMap,
    model: type[BaseModel],
    data: Any = None,
    ignore: Collection[SpecPath] = (),
) -> list[Problem]:
    """Turn pydantic's errors into located problems, with did-you-mean for unknown keys.

    A value checked against a union (`repeat: int | ${...}`) fails once per member; those failures are
    merged into one problem about the value, located at the value (`data` tells locations from member tags).
    Errors inside the parts `ignore` names (already reported, or left out on purpose) are not reported.
    """
    groups: dict[tuple[Any, ...], list[Any]] = {}
    for err in exc.errors():
        loc = _value_loc(err["loc"], data)
        if not any(loc[: len(part)] == part for part in ignore):
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
            hint = _HINTS.get(err["type"])
            problems.extend(Problem(message, source.locate(path), hint=hint) for message in _messages(errors))
    return problems


_HINTS = {  # pydantic error type → what to do about it
    "int_from_float": "sizes are whole numbers: `/` divides to a fraction, `//` to a whole number (`${d_model // 3}`)",
}


def failed_paths(exc: ValidationError, data: Any) -> list[SpecPath]:
    """The path in `data` of each of pydantic's errors (a missing key's path ends with its name)."""
    return [_value_loc(err["loc"], data) for err in exc.errors()]


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
