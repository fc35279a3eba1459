"""Spec source: read a YAML or JSON file safely into plain data plus a map from spec paths to lines.

Why it is built this way: PyYAML composes the node tree and this module converts it itself, so no tag can
construct an object, a duplicate key is an error naming both lines, an alias that expands without end is
stopped by a count, and every value keeps its file, line and column for the messages of every later stage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from blockgraph.common.errors import Location, Problem, SpecError, SpecPath
from blockgraph.common.files import FileKind, MiB, read_text

MAX_BYTES = 2 * MiB
MAX_DEPTH = 64
MAX_VALUES = 200_000

Position = tuple[str | None, int, int]

_PLAIN_TAGS = {"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"}
_SCALAR_TAGS = {f"tag:yaml.org,2002:{kind}" for kind in ("str", "int", "float", "bool", "null")}
_TIMESTAMP = "tag:yaml.org,2002:timestamp"  # `2024-01-01` stays the text it is: specs have no dates


@dataclass
class SourceMap:
    """File, line and column (1-based) of every value and every mapping key, by spec path.

    Positions carry their file because `extends:` merges several files into one spec.
    """

    file: str | None = None
    values: dict[SpecPath, Position] = field(default_factory=dict)
    keys: dict[SpecPath, Position] = field(default_factory=dict)
    reached: frozenset[str] = frozenset()  # files reached through `extends:`: messages never quote them

    def locate(self, path: SpecPath, *, key: bool = False) -> Location:
        """The position of `path`, or of its nearest ancestor that has one."""
        if key and path in self.keys:
            return self._at(self.keys[path], path)
        for n in range(len(path), -1, -1):
            pos = self.values.get(path[:n])
            if pos is not None:
                return self._at(pos, path)
        return Location(self.file, None, None, path, quoted=self.file not in self.reached)

    def _at(self, pos: Position, path: SpecPath) -> Location:
        return Location(*pos, path, quoted=pos[0] not in self.reached)

    def mark(self, node: yaml.Node) -> Position:
        return (self.file, node.start_mark.line + 1, node.start_mark.column + 1)


@dataclass
class Document:
    """A loaded spec file: its data and where each part of it came from."""

    data: Any
    source: SourceMap
    path: Path | None = None


SPEC_FILE = FileKind("spec file", SpecError, limit=MAX_BYTES)


def load_file(path: str | Path, *, named_by_spec: bool = False) -> Document:
    """Load a `.yaml`/`.yml`/`.json` spec; every failure is a located `SpecError`.

    A file reached through another spec (`extends:`) is `named_by_spec`: its errors, and those of every later
    stage located in it, say where, never what the file holds there, since it may not be a spec at all.
    """
    path = Path(path)
    text = read_text(path, SPEC_FILE)
    document = load_text(text, str(path), json_syntax=path.suffix.lower() == ".json", quote=not named_by_spec)
    document.path = path
    return document


def load_text(text: str, filename: str | None = None, *, json_syntax: bool = False, quote: bool = True) -> Document:
    """Parse spec text. JSON is checked by the JSON parser first, then mapped to lines like YAML.

    `quote`: errors may show the key, value or character they stumbled on (cleaned, a few characters); without
    it their locations are unquoted (`Location.quoted`), so that they show nothing of the text.
    """
    whole = Location(filename, quoted=quote)
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise SpecError(Problem(f"spec text is larger than {MAX_BYTES:,} bytes", whole))
    if json_syntax:
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(_json_problem(exc, text, whole)) from exc
        except RecursionError as exc:
            raise SpecError(Problem(f"the spec is nested deeper than {MAX_DEPTH} levels", whole)) from exc
        except ValueError as exc:  # an integer literal beyond Python's digit limit
            raise SpecError(Problem(f"JSON value error: {exc}", whole)) from exc
    data, source = _YamlWalker(text, filename, quote).run()
    if data is None:
        raise SpecError(
            Problem("the spec is empty", whole, hint="a spec is a mapping with name, inputs, nodes, outputs")
        )
    return Document(data, source)


def _json_problem(exc: json.JSONDecodeError, text: str, whole: Location) -> Problem:
    """A JSON syntax error; a comma after the last item is pointed at the comma, not at the bracket after it."""
    before = text[: exc.pos].rstrip()
    if exc.msg.startswith(("Expecting property name", "Expecting value")) and before.endswith(","):
        comma = len(before) - 1
        line = text.count("\n", 0, comma) + 1
        column = comma - (text.rfind("\n", 0, comma) + 1) + 1
        return Problem(
            f"JSON syntax error: {exc.msg}",
            replace(whole, line=line, column=column),
            hint="JSON does not allow a comma after the last item; remove it",
        )
    return Problem(f"JSON syntax error: {exc.msg}", replace(whole, line=exc.lineno, column=exc.colno))


class _YamlWalker:
    """Compose the YAML node tree (no object construction), then convert it while recording positions."""

    def __init__(self, text: str, filename: str | None, quote: bool = True):
        self.text = text
        self.quote = quote
        # an unquoted file is reached: the stages after this one locate their problems in it unquoted too
        self.source = SourceMap(filename, reached=frozenset() if quote or filename is None else frozenset({filename}))
        self.count = 0

    def _at(self, line: int | None = None, column: int | None = None, path: SpecPath = ()) -> Location:
        return Location(self.source.file, line, column, path, quoted=self.quote)

    def run(self) -> tuple[Any, SourceMap]:
        try:
            self.loader = yaml.SafeLoader(self.text)
        except yaml.reader.ReaderError as exc:
            raise self._reader_error(exc) from exc
        try:
            node = self.loader.get_single_node()
            data = None if node is None else self._convert(node, (), 0)
        except yaml.MarkedYAMLError as exc:
            raise self._syntax_error(exc) from exc
        except yaml.reader.ReaderError as exc:
            raise self._reader_error(exc) from exc
        except yaml.YAMLError as exc:
            raise SpecError(Problem(f"YAML error: {exc}", self._at())) from exc
        except RecursionError as exc:  # the YAML parser recurses once per nesting level, before we can count
            raise SpecError(Problem(f"the spec is nested deeper than {MAX_DEPTH} levels", self._at())) from exc
        finally:
            if hasattr(self, "loader"):
                self.loader.dispose()
        return data, self.source

    def _reader_error(self, exc: yaml.reader.ReaderError) -> SpecError:
        """A character YAML does not allow (a control character, a lone surrogate), with its line."""
        position = max(0, min(exc.position, len(self.text)))
        line = self.text.count("\n", 0, position) + 1
        column = position - (self.text.rfind("\n", 0, position) + 1) + 1
        shown = isinstance(exc.character, int) and self.quote
        character = f"the character U+{exc.character:04X}" if shown else "a character"
        return SpecError(
            Problem(
                f"the spec contains {character}, which YAML does not allow",
                self._at(line, column),
                hint="remove it; control characters are not allowed even inside quotes",
            )
        )

    def _syntax_error(self, exc: yaml.MarkedYAMLError) -> SpecError:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (None, None)
        message = f"YAML syntax error: {exc.problem or exc.context or ''}"  # an unquoted Location drops its quotes
        hint = None
        if "'\\t'" in message:
            hint = "indent with spaces: YAML does not allow tabs for indentation"
        elif "another document" in message:
            message = "a spec file holds one YAML document, but a second one starts here"
            hint = "remove the `---` line and what follows, or merge the two"
        elif exc.context and exc.problem:
            started = f" that starts on line {exc.context_mark.line + 1}" if exc.context_mark else ""
            # PyYAML's context can name what it read (`found duplicate anchor 'x'`): an unquoted file gets the line
            context = exc.context if self.quote else "the construct"
            hint = f"{context}{started}: look for a missing bracket, quote or comma"
        return SpecError(Problem(message, self._at(line, col), hint=hint))

    def _fail(self, message: str, node: yaml.Node, path: SpecPath, hint: str | None = None) -> SpecError:
        mark = node.start_mark
        return SpecError(Problem(message, self._at(mark.line + 1, mark.column + 1, path), hint=hint))

    def _convert(self, node: yaml.Node, path: SpecPath, depth: int) -> Any:
        self.count += 1
        if self.count > MAX_VALUES:
            raise self._fail(
                f"the spec expands to more than {MAX_VALUES:,} values",
                node,
                path,
                hint="YAML aliases (*name) that expand recursively are not allowed to blow up",
            )
        if depth > MAX_DEPTH:
            raise self._fail(f"the spec is nested deeper than {MAX_DEPTH} levels", node, path)
        self.source.values[path] = self.source.mark(node)
        if isinstance(node, yaml.ScalarNode):
            if node.tag == _TIMESTAMP:
                return node.value
            if node.tag not in _SCALAR_TAGS:
                raise self._fail(f"YAML tag {node.tag!r} is not allowed", node, path, hint="specs hold plain data only")
            try:
                return self.loader.construct_object(node)
            except ValueError as exc:  # an integer beyond Python's digit limit
                raise self._fail(f"cannot read this number: {exc}", node, path) from exc
        if node.tag not in _PLAIN_TAGS:
            raise self._fail(f"YAML tag {node.tag!r} is not allowed", node, path, hint="specs hold plain data only")
        if isinstance(node, yaml.SequenceNode):
            return [self._convert(item, (*path, i), depth + 1) for i, item in enumerate(node.value)]
        self.loader.flatten_mapping(node)
        result: dict[str, Any] = {}
        first_seen: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag not in (*_SCALAR_TAGS, _TIMESTAMP):
                raise self._fail("mapping keys must be plain names", key_node, path)
            key = key_node.value  # the name as written: `on:` and `yes:` stay strings, not YAML 1.1 booleans
            if key in first_seen:
                first = first_seen[key].start_mark.line + 1
                raise self._fail(
                    f"duplicate key {key!r} (first defined on line {first})",
                    key_node,
                    (*path, key),
                    hint="each key may appear once per mapping; remove or rename one",
                )
            first_seen[key] = key_node
            key_path = (*path, key)
            self.source.keys[key_path] = self.source.mark(key_node)
            result[key] = self._convert(value_node, key_path, depth + 1)
        return result


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def dump_json(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False)
