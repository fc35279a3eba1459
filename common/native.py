"""Calls into the native libraries that read untrusted files (`tokenizers` and `safetensors` in Rust,
`sentencepiece` in C++): whatever they raise becomes a located error.

A Rust panic reaches Python as `pyo3_runtime.PanicException`, which derives from `BaseException`, so that
`except Exception` lets it through to a traceback; and Rust's panic hook prints it, with what it quotes of the
file, straight to file descriptor 2, past every filter of ours. Inside `guarded`, descriptor 2 points at
/dev/null and every exception but an interrupt becomes the caller's error. What no guard catches, an abort
(an allocation the library cannot make), is prevented by checking a file before the library reads it
(trainer.tokenizer_json, common.tensorfile).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator

from blockgraph.common.errors import BlockgraphError


@contextlib.contextmanager
def guarded(fail: Callable[[str], BlockgraphError]) -> Iterator[None]:
    """Run the block with the native library's own output muted; a failure in it (named: `a panic`,
    `MemoryError`, ...) raises `fail(name)`. BlockgraphErrors and interrupts pass as they are."""
    muted = _mute()
    try:
        yield
    except (BlockgraphError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # a panic is a BaseException; the library failing is the file failing
        raise fail(failure(exc)) from None
    finally:
        _restore(muted)


def failure(exc: BaseException) -> str:
    """What went wrong in a native call, for messages: never its text, which may quote the file."""
    return "a panic" if type(exc).__name__ == "PanicException" else type(exc).__name__


class _Muted:
    """Descriptor 2 is the process's: guards open at the same time (threads) share one muting."""

    lock = threading.Lock()
    depth = 0
    saved: int | None = None


def _mute() -> bool:
    """Point descriptor 2 at /dev/null, once for all guards open at a time; False when it cannot be."""
    with _Muted.lock:
        if _Muted.depth:
            _Muted.depth += 1
            return True
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError):  # no descriptor 2 (a daemon), or a closed stream: nothing to mute
            return False
        try:
            null = os.open(os.devnull, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
            os.dup2(null, 2)
            os.close(null)
        except OSError:
            os.close(saved)
            return False
        _Muted.depth, _Muted.saved = 1, saved
        return True


def _restore(muted: bool) -> None:
    """Undo `_mute` when the last guard open at a time ends."""
    if not muted:
        return
    with _Muted.lock:
        _Muted.depth -= 1
        if _Muted.depth == 0 and _Muted.saved is not None:
            os.dup2(_Muted.saved, 2)
            os.close(_Muted.saved)
            _Muted.saved = None
