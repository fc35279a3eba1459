"""JSON records blockgraph writes and reads back (manifests, checkpoint state), checked by pydantic models.

A record comes from a directory someone may have downloaded: it is read bounded (common.files) and validated
field by field, so that a wrong type or a missing key is an error that names the file and the field instead
of a `KeyError` deep in the code that uses it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from pydantic import TypeAdapter, ValidationError

from blockgraph.common.errors import Location, Problem
from blockgraph.common.files import FileKind, read_json

R = TypeVar("R")


def read_record(path: str | Path, model: type[R], kind: FileKind) -> R:
    """The JSON file `path` as a `model`; every field that does not fit is a problem naming file and field."""
    data = read_json(path, kind)
    return check_record(data, model, kind, path)


def check_record(data: object, model: type[R], kind: FileKind, path: str | Path, field: str = "") -> R:
    """`data` (read from `path`) as a `model` (a pydantic model or a dataclass); `field` prefixes its fields."""
    try:
        return TypeAdapter(model).validate_python(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_input=False, include_url=False):
            name = ".".join(str(part)[:40] for part in (*([field] if field else []), *error["loc"])) or "(top level)"
            problems.append(Problem(f"{kind.what}: field {name}: {error['msg']}", Location(str(path))))
        raise kind.error(problems) from None
