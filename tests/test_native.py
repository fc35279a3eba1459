"""common.native's guard: descriptor 2 muted while a native call runs, and put back as it was however guards
overlap (a nested guard, or two threads' guards that end in either order)."""

from __future__ import annotations

import os
import threading

import pytest

from blockgraph.common.errors import DataError, Problem
from blockgraph.common.native import guarded


def _target() -> str:
    return os.readlink(f"/proc/self/fd/{2}")


def _fail(name: str) -> DataError:
    return DataError(Problem(f"failed: {name}"))


def test_overlapping_guards_restore_descriptor_2_after_the_last_ends():
    before = _target()
    outer = guarded(_fail)
    outer.__enter__()
    assert _target() == os.devnull
    inner_started, outer_done = threading.Event(), threading.Event()

    def other_thread() -> None:  # opens its guard while the outer one is open, ends after it
        with guarded(_fail):
            inner_started.set()
            outer_done.wait(10)
            assert _target() == os.devnull

    thread = threading.Thread(target=other_thread)
    thread.start()
    inner_started.wait(10)
    outer.__exit__(None, None, None)
    assert _target() == os.devnull  # the other thread's guard is still open
    outer_done.set()
    thread.join(10)
    assert _target() == before


def test_a_failure_inside_becomes_the_callers_error_and_interrupts_pass():
    before = _target()
    with pytest.raises(DataError, match="failed: ZeroDivisionError"), guarded(_fail):
        1 / 0  # noqa: B018
    with pytest.raises(KeyboardInterrupt), guarded(_fail):
        raise KeyboardInterrupt
    assert _target() == before
