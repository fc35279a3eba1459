"""Reading training text: tab-separated pairs, labelled lines or one sentence per line, with located errors.

A pairs file is UTF-8 text, one pair per line: `source<TAB>target`; a labelled file (a classifier's data)
has `label<TAB>text` lines, read the same way. Blank lines are ignored; columns after
the second are ignored (attribution columns, as some corpora have). A line that cannot be read (bytes that
are not UTF-8, no tab, an empty side) is an error naming the file and the line number; with `skip_bad=True`
such lines are left out and counted instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from blockgraph.common import files
from blockgraph.common.errors import DataError, Location, Problem
from blockgraph.common.files import FileKind, GiB

MAX_SHOWN = 10  # bad lines listed in one error
DATA_FILE = FileKind("data file", DataError, limit=4 * GiB)


@dataclass
class TextData:
    """The readable records of a file (pairs, or single sentences) and the bad lines met on the way."""

    records: list[tuple[str, ...]]
    bad: list[Problem] = field(default_factory=list)
    path: Path | None = None

    def summary(self) -> str:
        if not self.bad:
            return ""
        first = self.bad[0]
        return (
            f"skipped {len(self.bad)} bad line(s) of {self.path} (first: line {first.location.line}: {first.message})"
        )


def read_pairs(path: str | Path, *, skip_bad: bool = False) -> TextData:
    """Source/target pairs of a tab-separated file."""
    return _read(Path(path), fields=2, skip_bad=skip_bad)


def read_labelled(path: str | Path, *, skip_bad: bool = False) -> TextData:
    """(label, text) records of a tab-separated `label<TAB>text` file (a classifier's data)."""
    return _read(Path(path), fields=2, skip_bad=skip_bad, names=("label", "text"))


def read_lines(path: str | Path, *, skip_bad: bool = False) -> TextData:
    """The non-blank lines of a text file (a language model's sentences)."""
    return _read(Path(path), fields=1, skip_bad=skip_bad)


def _read(path: Path, *, fields: int, skip_bad: bool, names: tuple[str, str] = ("source", "target")) -> TextData:
    records: list[tuple[str, ...]] = []
    bad: list[Problem] = []
    for number, line in files.read_lines(path, DATA_FILE):
        line = line.removesuffix(b"\r")
        if number == 1:
            line = line.removeprefix(b"\xef\xbb\xbf")
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            column = len(line[: exc.start].decode("utf-8", errors="replace")) + 1
            bad.append(_bad(path, number, f"not UTF-8 text (byte 0x{line[exc.start]:02x})", column))
            continue
        if not text.strip():
            continue
        if fields == 1:
            records.append((text.strip(),))
            continue
        parts = text.split("\t")
        if len(parts) < 2:
            bad.append(_bad(path, number, f"no tab between the {names[0]} and the {names[1]}"))
            continue
        source, target = parts[0].strip(), parts[1].strip()
        if not source or not target:
            bad.append(_bad(path, number, f"empty {names[0] if not source else names[1]}", 1 if not source else None))
            continue
        records.append((source, target))
    if bad and not skip_bad:
        shown = bad[:MAX_SHOWN]
        hint = "fix these lines, or pass --skip-bad-lines to leave them out"
        if len(bad) > MAX_SHOWN:
            hint = f"{len(bad) - MAX_SHOWN} more bad line(s) not shown; " + hint
        last = shown[-1]
        shown[-1] = Problem(last.message, last.location, hint)
        raise DataError(shown)
    if not records:
        what = "lines" if fields == 1 else "pairs" if names[0] == "source" else "labelled lines"
        raise DataError(Problem(f"{path} holds no usable {what}", Location(str(path))))
    return TextData(records, bad, path)


def _bad(path: Path, line: int, message: str, column: int | None = None) -> Problem:
    return Problem(f"line {line}: {message}", Location(str(path), line, column))


def split(records: list, valid_fraction: float, seed: int, *, minimum: int = 1) -> tuple[list, list]:
    """A deterministic held-out split: `valid_fraction` of the records (at least `minimum` when there are 2+)."""
    if valid_fraction <= 0 or len(records) < 2:
        return list(records), []
    count = min(len(records) - 1, max(minimum, round(len(records) * valid_fraction)))
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:count])
    train = [r for i, r in enumerate(records) if i not in held]
    valid = [r for i, r in enumerate(records) if i in held]
    return train, valid
