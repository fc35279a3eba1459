"""Reading files that may be hostile: regular files only, bounded in bytes, never blocking.

Every file blockgraph reads goes through here: a spec and its `extends:`, pretrained vectors and vocabularies,
data files, saved specs, manifests and checkpoint JSON, and the headers of safetensors files. What makes a read
safe, whatever the file is:

- only a regular file is read. A FIFO (opening one blocks until a writer comes), a device (`/dev/zero` never
  ends), a socket or a directory is refused before any byte is read, from `stat`, and again from `fstat` on
  the opened descriptor, so that a file swapped in between is caught too;
- at most `limit` bytes are read, and at most `max_line` bytes per line when reading lines; the size the file
  system reports is never trusted (it is 0 for files in /proc);
- every failure is a located error of the file's own kind (`FileKind.error`) that names the file and what was
  expected, and never quotes the file;
- every JSON file is parsed one way (`parse_json`), which refuses what another reader of it would take
  differently: a key twice, a number no float holds.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from blockgraph.common.errors import BlockgraphError, Location, Problem
from blockgraph.common.text import binary_size

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


@dataclass(frozen=True)
class FileKind:
    """What a file is for: its name in messages, the error it raises, and how much of it may be read."""

    what: str  # "spec file", "data file", ...
    error: type[BlockgraphError]
    limit: int  # bytes
    max_line: int = 1 * MiB  # bytes in one line, for files read line by line

    def fail(self, path: str | Path, message: str, hint: str | None = None, line: int | None = None) -> BlockgraphError:
        return self.error(Problem(message, Location(str(path), line), hint=hint))


def kind_of(mode: int) -> str:
    """What a file that is not a regular one is, for messages: a directory, a FIFO, a device, ..."""
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def open_file(path: str | Path, kind: FileKind) -> BinaryIO:
    """Open a regular file for reading in binary, or raise `kind.error` saying what the path is instead."""
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise kind.fail(
            path, f"{kind.what} not found: {path}", "it does not exist: check the path and its spelling"
        ) from None
    except (OSError, ValueError) as exc:  # a NUL byte, a name too long, a loop of links, no permission
        raise kind.fail(path, f"cannot use {path} as a {kind.what}: {reason(exc)}") from None
    _require_regular(path, info.st_mode, kind)
    try:
        # O_NONBLOCK: should the path have become a FIFO since the stat, opening it must not wait for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise kind.fail(path, f"cannot open the {kind.what}: {reason(exc)}") from None
    try:
        _require_regular(path, os.fstat(fd).st_mode, kind)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _require_regular(path: Path, mode: int, kind: FileKind) -> None:
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise kind.fail(path, f"{path} is a directory, not a {kind.what}")
    raise kind.fail(
        path, f"the {kind.what} is {kind_of(mode)}, not a regular file", "blockgraph reads only regular files"
    )


def created_mode(bits: int) -> int:
    """The mode a plain create gives: `bits` (0o666 for a file, 0o777 for a directory) less the user's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return bits & ~umask


def reason(exc: BaseException) -> str:
    """Why an operation failed, for messages: the system's words ("No space left on device"), no path."""
    return (exc.strerror if isinstance(exc, OSError) and exc.strerror else None) or type(exc).__name__


def read_bytes(path: str | Path, kind: FileKind) -> bytes:
    """The whole file, refused if it holds more than `kind.limit` bytes.

    A regular file's size says at once when it is too large (a sparse file of 5 GiB is not read); reading
    stops after `limit + 1` bytes in any case, for files whose reported size is not their content's.
    """
    with open_file(path, kind) as handle:
        if os.fstat(handle.fileno()).st_size > kind.limit:
            raise kind.fail(
                path, f"the {kind.what} is too large: the limit is {size_text(kind.limit)}", _limit_hint(kind)
            )
        try:
            data = handle.read(kind.limit + 1)
        except OSError as exc:
            raise kind.fail(path, f"cannot read the {kind.what}: {reason(exc)}") from None
    if len(data) > kind.limit:
        raise kind.fail(path, f"the {kind.what} is too large: the limit is {size_text(kind.limit)}", _limit_hint(kind))
    return data


def read_text(path: str | Path, kind: FileKind) -> str:
    """The file as UTF-8 text (a byte-order mark dropped); bytes that are not UTF-8 are an error with their line."""
    raw = read_bytes(path, kind)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise kind.fail(
            path, f"the {kind.what} is not UTF-8 text (byte {exc.start})", "save it as UTF-8", line
        ) from None


def read_lines(path: str | Path, kind: FileKind) -> Iterator[tuple[int, bytes]]:
    """(line number from 1, the line's bytes without its newline), streamed; bounded per line and in all."""
    with open_file(path, kind) as handle:
        yield from stream_lines(handle, path, kind)


def stream_lines(handle: BinaryIO, path: str | Path, kind: FileKind) -> Iterator[tuple[int, bytes]]:
    """The lines of an open stream (a file, standard input), as `read_lines` bounds them."""
    total = 0
    for number in range(1, 1 << 62):
        try:
            line = handle.readline(kind.max_line + 1)
        except OSError as exc:
            raise kind.fail(path, f"cannot read the {kind.what}: {reason(exc)}", line=number) from None
        if not line:
            return
        total += len(line)
        if total > kind.limit:
            raise kind.fail(
                path, f"the {kind.what} is too large: the limit is {size_text(kind.limit)}", _limit_hint(kind)
            )
        if len(line) > kind.max_line:
            raise kind.fail(
                path,
                f"line {number} of the {kind.what} is longer than {size_text(kind.max_line)}",
                "is this the right file? lines of text are far shorter",
                number,
            )
        yield number, line.removesuffix(b"\n")


def read_json(path: str | Path, kind: FileKind) -> Any:
    """The file parsed as JSON (see `parse_json`)."""
    return parse_json(read_text(path, kind), path, kind)


class _Unreadable(ValueError):
    """A JSON value that parses but that no reader of the file could use the same way (see `parse_json`)."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        raise _Unreadable("a key twice in one object")
    return found


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _Unreadable("a number beyond the range of a float")
    return value


def _constant(name: str) -> Any:
    raise _Unreadable(f"{name}, which is not JSON")


def parse_json(data: str | bytes, path: str | Path, kind: FileKind, hint: str | None = None) -> Any:
    """JSON text read from `path` (already bounded in size), the one way every JSON file is parsed; `hint`
    is added to its errors.

    Errors say where (line, column) and what, never the text. What would read differently elsewhere is refused:
    a key given twice in one object (Python keeps the last, other parsers the first), a number that overflows a
    float (`1e400`), NaN and Infinity (not JSON), nesting deeper than Python recurses, integers longer than
    Python converts.
    """
    if isinstance(data, bytes):
        raw = data
        try:
            data = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            raise kind.fail(path, f"the {kind.what} is not UTF-8 text (byte {exc.start})", hint, line) from None
    try:
        return json.loads(data, object_pairs_hook=_no_duplicates, parse_float=_finite, parse_constant=_constant)
    except json.JSONDecodeError as exc:
        message = f"the {kind.what} is not valid JSON ({exc.msg}, column {exc.colno})"
        raise kind.fail(path, message, hint, exc.lineno) from None
    except RecursionError:
        raise kind.fail(path, f"the {kind.what} is nested too deeply to be read", hint) from None
    except MemoryError:  # a file within its limit can still hold more values than memory (a list of 0s)
        raise kind.fail(path, f"the {kind.what} holds more values than memory does", hint) from None
    except _Unreadable as exc:
        raise kind.fail(path, f"the {kind.what} holds {exc}", hint) from None
    except ValueError as exc:  # an integer literal beyond Python's digit limit
        message = f"the {kind.what} holds a value that cannot be read: {type(exc).__name__}"
        raise kind.fail(path, message, hint) from None


def size_text(n: int) -> str:
    return binary_size(n, trim=True)


def _limit_hint(kind: FileKind) -> str:
    return f"a {kind.what} is at most {size_text(kind.limit)}; is this the right file?"


def inside(path: Path, root: Path) -> bool:
    """Whether `path`, with links and `..` resolved, lies in the folder `root` (also resolved)."""
    try:
        path.resolve().relative_to(root.resolve())
    except (ValueError, OSError, RuntimeError):  # outside; a NUL byte; a loop of links
        return False
    return True
