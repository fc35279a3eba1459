"""A block node's params: substituted in the scope they are written in, file params resolved against the file
that writes them, then validated by the block's `Params` model, once per distinct value (however many nodes or
copies of a sub-graph give it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from blockgraph.blocks import BlockEntry, BlockParams
from blockgraph.blocks.registry import weights_follow
from blockgraph.builder.expressions import Scope
from blockgraph.builder.located import pydantic_problems, substitute_located
from blockgraph.builder.source import SourceMap
from blockgraph.builder.spec_files import FileAccess
from blockgraph.common.errors import Problem, ProblemList, SpecError, SpecPath


class ParamsValidator:
    """Validates the params of block nodes; what is wrong is added to `problems`, at the value that is."""

    def __init__(self, source: SourceMap, files: FileAccess, spec_file: Path | None, problems: ProblemList):
        self.source = source
        self.files = files
        self.folder = spec_file.parent if spec_file is not None else Path()
        self.from_file = spec_file is not None  # a spec given as a mapping has no file its paths are relative to
        self.problems = problems
        self._validated: dict[tuple[str, str], BlockParams | None] = {}

    def validate(
        self, entry: BlockEntry, written: dict[str, Any], scope: Scope, path: SpecPath, node_id: str
    ) -> BlockParams | None:
        """The params `written` at `path` for a node of `entry`'s block; None when they are wrong."""
        failed: list[SpecPath] = []
        raw = substitute_located(written, (*path, "params"), scope, self.source, self.problems, failed)
        if failed:  # a `${...}` failed: its raw text would only fail again here
            return None
        raw = self._file_paths(entry, raw, path, node_id)
        if raw is None:
            return None
        key = (entry.name, json.dumps(raw, sort_keys=True, default=repr))
        if key in self._validated:
            return self._validated[key]
        try:
            params: BlockParams | None = entry.cls.Params.model_validate(raw)
        except ValidationError as exc:
            for problem in pydantic_problems(exc, (*path, "params"), self.source, entry.cls.Params, raw):
                self.problems.add(Problem(problem.message, problem.location, problem.hint, node=node_id))
            params = None
        self._validated[key] = params
        return params

    def _file_paths(self, entry: BlockEntry, raw: Any, path: SpecPath, node_id: str) -> Any:
        """File params (`json_schema_extra={"format": "path"}`) are relative to the file that writes them (as
        `extends:` is) and must stay in the spec's folder (see builder.spec_files); None when one is refused. A
        model rebuilt to receive saved weights never reads them, so their paths are left as written."""
        if weights_follow() or not isinstance(raw, dict):
            return raw
        resolved = dict(raw)
        for name in path_params(entry):
            value = resolved.get(name)
            if isinstance(value, str):
                where = self.source.locate((*path, "params", name))
                written_in = Path(where.file).parent if where.file and self.from_file else self.folder
                try:
                    resolved[name] = str(self.files.resolve(value, written_in, where, f"{name}:"))
                except SpecError as exc:
                    for problem in exc.problems:
                        self.problems.add(Problem(problem.message, problem.location, problem.hint, node=node_id))
                    return None
        return resolved


def path_params(entry: BlockEntry) -> list[str]:
    """The block's params that name files (`json_schema_extra={"format": "path"}`)."""
    return [
        name
        for name, info in entry.cls.Params.model_fields.items()
        if isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get("format") == "path"
    ]
