"""Writing outputs so that a crash, a kill or a full disk never leaves a half-written or destroyed target.

The one routine of every writer (saved models, training checkpoints, exported programs, schema files):

- the target is checked first. It may be absent, a regular file (where a file is written) or a directory that
  the writer recognises as its own (where a directory is written). A FIFO, a device, a socket, a symbolic link,
  a directory where a file is expected and a foreign directory are refused, never replaced;
- the output is written into a temporary sibling `.NAME.tmp-PID-XXXX`, flushed to disk, and renamed over the
  target in one step. A directory is swapped with the old one atomically (Linux `renameat2(RENAME_EXCHANGE)`),
  so that at every moment NAME holds the old or the new output, complete; where the file system cannot swap,
  the old one is moved aside to `.NAME.old-PID-XXXX` for the instant between two renames;
- a failure while writing (no space left, a read-only directory) removes the temporary and raises `WriteError`;
  the target is as it was;
- temporaries of a writer that was killed (its PID no longer runs) are removed at the next write to the same
  target, and an old output moved aside and never restored is put back first.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from blockgraph.common.errors import Location, Problem, WriteError
from blockgraph.common.files import created_mode, kind_of, reason

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_PREFIX_BYTES = 80  # of NAME in temporary names, so that they stay within the 255 bytes of a file name


def write_file(path: str | Path, fill: Callable[[Path], object], *, what: str = "file") -> Path:
    """Write the file `path` with `fill(tmp_path)`, atomically; companions `fill` writes beside it go along.

    (The ONNX exporter writes `model.onnx.data` next to `model.onnx` for big models: companions are moved
    first, the named file last.)
    """
    path = Path(path)
    _check_target(path, directory=False, owned=None, what=what)
    parent = _parent(path)
    tmp = _temporary(path)
    try:
        _guard(path, lambda: fill(tmp / path.name))
        produced = sorted(tmp.iterdir(), key=lambda item: item.name == path.name)
        for item in produced:
            if item.name != path.name:
                _check_target(parent / item.name, directory=False, owned=None, what=what)
        for item in produced:
            _guard(path, functools.partial(_install, item, parent / item.name))
        _sync(parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def write_text(path: str | Path, text: str, *, what: str = "file") -> Path:
    """Write UTF-8 text to `path` atomically."""
    return write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), what=what)


def write_directory(
    path: str | Path, fill: Callable[[Path], object], *, owned: Callable[[Path], bool], what: str
) -> Path:
    """Write the directory `path` with `fill(tmp_dir)`, replacing an old one only if `owned(path)` says it is ours.

    An empty directory counts as ours. `what` names the output in messages ("saved model", "checkpoint").
    """
    path = Path(path)
    _check_target(path, directory=True, owned=owned, what=what)
    parent = _parent(path)
    tmp = _temporary(path)
    try:
        _guard(path, lambda: fill(tmp))
        _guard(path, lambda: _sync_tree(tmp))
        if path.exists():
            _guard(path, lambda: _swap(tmp, path))  # tmp now holds the old output
        else:
            _guard(path, lambda: os.replace(tmp, path))
        _sync(parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def owned_directory(
    path: Path,
    marker: str | None,
    files: set[str],
    directories: Mapping[str, Callable[[Path], bool]] | None = None,
) -> bool:
    """Whether replacing `path` loses nothing of the user's: its `marker` (if any) is a regular file and every
    entry is one of the writer's regular `files`, one of its `directories` that passes its own rule, or a
    temporary a killed writer left beside one of those (names alone would let a user's folder named like ours
    through)."""
    directories = directories or {}
    ours = set(files) | set(directories)
    try:
        for entry in os.scandir(path):
            rule = directories.get(entry.name)
            if entry.name in files and entry.is_file(follow_symlinks=False):
                continue
            if rule is not None and entry.is_dir(follow_symlinks=False) and rule(Path(entry.path)):
                continue
            if any(is_temporary(entry.name, name) for name in ours):
                continue
            return False
        return marker is None or stat.S_ISREG(os.lstat(path / marker).st_mode)
    except OSError:
        return False


def is_temporary(name: str, target: str) -> bool:
    """Whether `name` is a temporary (or a set-aside old copy) of a writer of the sibling `target`."""
    return any(name.startswith(f"{_stem_of(target)}{kind}") for kind in (".tmp-", ".old-"))


def check_file_target(path: str | Path, *, what: str = "file") -> None:
    """Refuse `path` as an output file now (before long work), for the same reasons `write_file` would."""
    _check_target(Path(path), directory=False, owned=None, what=what)


def check_directory_target(path: str | Path, *, owned: Callable[[Path], bool], what: str) -> None:
    """Refuse `path` as an output directory now, for the same reasons `write_directory` would."""
    _check_target(Path(path), directory=True, owned=owned, what=what)


def _check_target(path: Path, *, directory: bool, owned: Callable[[Path], bool] | None, what: str) -> None:
    where = Location(str(path))
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except (OSError, ValueError) as exc:
        raise WriteError(Problem(f"cannot write the {what} {path}: {reason(exc)}", where)) from None
    mode = info.st_mode
    hint = "choose another path; blockgraph replaces only its own outputs"
    if stat.S_ISLNK(mode):
        raise WriteError(Problem(f"{path} is a symbolic link; the {what} is not written through it", where, hint))
    if stat.S_ISDIR(mode):
        if not directory:
            raise WriteError(Problem(f"{path} is a directory; the {what} is a file", where, "give a file name"))
        if not (_empty(path) or (owned is not None and owned(path))):
            raise WriteError(
                Problem(
                    f"{path} exists and is not {_a(what)}",
                    where,
                    f"choose a new or empty directory: a directory is replaced only if it holds {_a(what)} alone",
                )
            )
        return
    if not stat.S_ISREG(mode):
        raise WriteError(Problem(f"{path} is {kind_of(mode)}; it is never replaced by the {what}", where, hint))
    if directory:
        raise WriteError(Problem(f"{path} is a file; the {what} is a directory", where, hint))


def _a(what: str) -> str:
    return f"{'an' if what[:1] in 'aeiou' else 'a'} {what}"


def _empty(path: Path) -> bool:
    try:
        return not any(path.iterdir())
    except OSError:
        return False


def _parent(path: Path) -> Path:
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as exc:
        raise WriteError(Problem(f"cannot create the folder {parent}: {reason(exc)}", Location(str(path)))) from None
    _clean_leftovers(path)
    return parent


def _temporary(path: Path) -> Path:
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f"{_stem(path)}.tmp-{os.getpid()}-", dir=path.parent))
        os.chmod(tmp, created_mode(0o777))  # what a plain mkdir gives; mkdtemp's is private to its owner
    except OSError as exc:
        raise WriteError(Problem(f"cannot write in {path.parent}: {reason(exc)}", Location(str(path)))) from None
    return tmp


def _stem(path: Path) -> str:
    return _stem_of(path.name)


def _stem_of(name: str) -> str:
    """`.NAME`, or for a long name its first bytes and a hash of all of it: within a file name's 255 bytes, and
    two long names that share a beginning never take each other's leftovers."""
    raw = os.fsencode(name)
    if len(raw) <= _PREFIX_BYTES:
        return f".{name}"
    head = raw[: _PREFIX_BYTES - 16].decode("utf-8", "ignore")  # whole characters only
    return f".{head}~{hashlib.sha256(raw).hexdigest()[:12]}"


def _clean_leftovers(path: Path) -> None:
    """Remove temporaries of dead writers; put back an old output a dead writer moved aside and never replaced."""
    stem = _stem(path)
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return
    for item in siblings:
        for marker in (".tmp-", ".old-"):
            if not item.name.startswith(stem + marker):
                continue
            pid = item.name[len(stem + marker) :].partition("-")[0]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            if marker == ".old-" and not os.path.lexists(path):
                with contextlib.suppress(OSError):  # if it cannot be put back now, it stays for the next run
                    os.replace(item, path)
                continue
            shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, owned by someone else
        return True
    return True


def _swap(new: Path, old: Path) -> None:
    """Exchange two directories in one step; where the system cannot, two renames with the old one set aside."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None:
        result = renameat2(_AT_FDCWD, os.fsencode(new), _AT_FDCWD, os.fsencode(old), _RENAME_EXCHANGE)
        if result == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), str(old))
    aside = Path(tempfile.mkdtemp(prefix=f"{_stem(old)}.old-{os.getpid()}-", dir=old.parent))
    os.rmdir(aside)
    os.replace(old, aside)
    try:
        os.replace(new, old)
    except BaseException:
        os.replace(aside, old)
        raise
    os.replace(aside, new)  # so that the caller's clean-up of `new` removes the old output


def _guard(path: Path, step: Callable[[], object]) -> None:
    """Run one step of a write; an OSError (no space, read-only, no permission) becomes a WriteError."""
    try:
        step()
    except OSError as exc:
        hint = (
            "free some space and run again; nothing was replaced"
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
            else "nothing was replaced"
        )
        raise WriteError(Problem(f"cannot write {path}: {reason(exc)}", Location(str(path)), hint)) from None


def _install(item: Path, target: Path) -> None:
    """Flush a finished output to disk and rename it over its target."""
    _sync(item)
    os.replace(item, target)


def _sync(path: Path) -> None:
    """Flush a file or a directory (its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF):  # some file systems cannot sync directories
            raise
    finally:
        os.close(fd)


def _sync_tree(root: Path) -> None:
    for folder, _, names in os.walk(root):
        for name in names:
            _sync(Path(folder) / name)
        _sync(Path(folder))
