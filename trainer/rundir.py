"""A training run's directory: one writer at a time, and nothing in it replaced that is not the run's own.

`train --out DIR` (or `--resume DIR`) takes an advisory lock on `DIR/.lock` before the first step. The kernel
releases it when the process ends, however it ends (Ctrl-C, a crash, SIGKILL), so a stale lock file never
blocks the next run; `train --nproc N`'s workers inherit the launcher's lock, which then lasts until the last
of them has ended; a second `train` on the same directory while one runs fails at once, naming the first.
Taking the lock also proves the directory writable before any work is done.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from blockgraph.common.atomic import check_directory_target, owned_directory
from blockgraph.common.errors import Location, Problem, UsageError, WriteError
from blockgraph.trainer import checkpoint, tensorboard

LOCK = ".lock"
METRICS = "metrics.jsonl"


def is_run_directory(path: Path) -> bool:
    """A run's own directory: its lock, its metrics, its checkpoint and its TensorBoard events, nothing of the
    user's beside them (the lock is not required: a run copied without its dot-files is still a run)."""
    directories = {checkpoint.NAME: checkpoint.replaceable, tensorboard.DIRECTORY: tensorboard.is_event_directory}
    return owned_directory(path, None, {LOCK, METRICS}, directories)


@contextlib.contextmanager
def exclusive(directory: Path) -> Iterator[int]:
    """Hold the run directory's lock for the duration of the block (creating the directory if need be).

    The block gets the lock's descriptor: a child process given it (`pass_fds`) holds the lock until it ends too.
    """
    check_directory_target(directory, owned=is_run_directory, what="training run directory")
    where = Location(str(directory))
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        raise WriteError(
            Problem(f"cannot write the training run directory {directory}: {exc.strerror}", where)
        ) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise WriteError(Problem(f"{directory / LOCK} is not a regular file", where))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            owner = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            raise UsageError(
                Problem(
                    f"another `blockgraph train` (pid {owner or '?'}) is writing to {directory}",
                    where,
                    hint="wait for it to finish, or choose another --out",
                )
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield fd
    finally:
        os.close(fd)  # releases the lock (a worker given it holds it until it ends)


def append_line(path: Path, line: str) -> None:
    """Append one line to a log of the run (metrics.jsonl); a link, a FIFO or a device there is refused."""
    where = Location(str(path))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        raise WriteError(Problem(f"cannot write {path}: {exc.strerror}", where)) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise WriteError(Problem(f"{path} is not a regular file; it is never written to", where))
        os.write(fd, (line + "\n").encode("utf-8"))
    except OSError as exc:
        raise WriteError(Problem(f"cannot write {path}: {exc.strerror}", where)) from None
    finally:
        os.close(fd)
