"""blockgraph's errors: located problems, grouped by what went wrong, rendered once at the CLI edge.

Every error the user can fix is a `BlockgraphError` carrying a list of `Problem`s (all the independent mistakes
found in one pass). Its subclass says which input was wrong, so that a caller can tell a bad spec from a corrupt
checkpoint or a full disk without reading messages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

SpecPath = tuple[str | int, ...]


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"|; found .*$")


def unquoted(text: str) -> str:
    """`text` with what it quotes of a file (`'value'`, `; found ...`) taken out: it says where, not what."""
    return _QUOTED.sub(lambda m: "" if m.group().startswith(";") else "…", text)


def format_path(path: SpecPath) -> str:
    """`("nodes", "enc", "params", "heads")` → `nodes.enc.params.heads`; list indices as `[2]`."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


@dataclass(frozen=True)
class Location:
    """Where a problem sits: the file, the line/column of the value (1-based) and its path in the spec."""

    file: str | None = None
    line: int | None = None
    column: int | None = None
    path: SpecPath = ()
    quoted: bool = field(default=True, compare=False)  # False in a file reached through a spec: quote nothing

    def __str__(self) -> str:
        if self.file is None and self.line is None and not self.path:
            return ""
        where = self.file or "<spec>"
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        return f"{where} ({format_path(self.path)})" if self.path and self.quoted else where


@dataclass(frozen=True)
class Problem:
    """One thing wrong (or worth a warning) in a spec, with enough context to fix it."""

    message: str
    location: Location = field(default_factory=Location)
    hint: str | None = None
    severity: Literal["error", "warning"] = "error"
    node: str | None = None

    def __post_init__(self) -> None:
        if not self.location.quoted:  # the one place that keeps a reached file's contents out of messages
            object.__setattr__(self, "message", unquoted(self.message))
            object.__setattr__(self, "hint", self.hint and unquoted(self.hint))
            object.__setattr__(self, "node", None)  # a node's name is that file's text too

    def __str__(self) -> str:
        text = f"{self.location}: " if str(self.location) else ""
        text += f"{self.severity}: {self.message}"
        if self.node:
            text += f" [node {self.node}]"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class BlockgraphError(Exception):
    """Anything the user can fix: a bad spec, a missing file, a broken plugin. Carries every problem found."""

    def __init__(self, problems: list[Problem] | Problem | str):
        if isinstance(problems, str):
            problems = Problem(problems)
        self.problems: list[Problem] = [problems] if isinstance(problems, Problem) else list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class SpecError(BlockgraphError):
    """The spec (or a file it names: `extends:`, pretrained vectors, a vocabulary) is invalid."""


class UsageError(BlockgraphError):
    """A command-line option or API argument is unusable: a device, a dtype, a dimension size, a flag."""


class DataError(BlockgraphError):
    """Training or translation data (a data file, a sentence, a tokenizer) cannot be used."""


class CheckpointError(BlockgraphError):
    """A saved model or a training checkpoint is missing, corrupt, foreign or from another spec."""


class PluginError(BlockgraphError):
    """A plugin could not be loaded or registered."""


class ExportError(BlockgraphError):
    """The model could not be exported (a block torch.export cannot trace, a missing package)."""


class WriteError(BlockgraphError):
    """An output could not be written (a full disk, a read-only directory, a target that is not ours)."""


class MemoryLimitError(BlockgraphError):
    """A model (its weights, training state or a run's activations) would not fit in the memory available:
    refused before anything was allocated, instead of ending in the kernel's OOM killer."""


class ProblemList:
    """Collects problems across a pass so that all independent errors are reported together."""

    def __init__(self) -> None:
        self.items: list[Problem] = []
        self._seen: set[tuple[str, Location, str]] = set()

    def add(self, problem: Problem) -> None:
        """Record a problem once: the same mistake seen in every copy of a repeat is one problem."""
        key = (problem.message, problem.location, problem.severity)
        if key not in self._seen:
            self._seen.add(key)
            self.items.append(problem)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.items if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.items if p.severity == "warning"]

    def raise_if_errors(self, error_type: type[BlockgraphError] = SpecError) -> None:
        if self.errors:
            raise error_type(self.errors)
