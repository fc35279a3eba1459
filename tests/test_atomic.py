"""common.atomic's clean-up of killed writers' leftovers: only the same target's, and never the only old copy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from blockgraph.common import atomic


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _leftover(target: Path, kind: str = ".tmp-") -> Path:
    """The temporary (or, with kind `.old-`, the old copy) a writer of `target` killed mid-write leaves behind."""
    seen: list[str] = []
    atomic.write_file(target, lambda tmp: (seen.append(tmp.parent.name), tmp.write_text("x")))
    target.unlink()
    name = seen[0].replace(f".tmp-{os.getpid()}-", f"{kind}{_dead_pid()}-")
    (target.parent / name).mkdir()
    return target.parent / name


def test_a_name_longer_than_the_prefix_fits_in_a_file_name(tmp_path):
    name = "名" * 84  # 252 bytes: the longest name of whole 3-byte characters
    atomic.write_text(tmp_path / name, "x")
    assert os.listdir(tmp_path) == [name]


def test_two_long_names_sharing_their_beginning_keep_apart_their_leftovers(tmp_path):
    first, second = tmp_path / ("a" * 100 + "-first"), tmp_path / ("a" * 100 + "-second")
    left = _leftover(first)
    atomic.write_text(second, "x")
    assert left.exists(), "a write of `second` removed what a killed writer of `first` left"
    atomic.write_text(first, "x")
    assert not left.exists()


def test_an_old_copy_that_cannot_be_put_back_is_kept(tmp_path, monkeypatch):
    target = tmp_path / "out.txt"
    old = _leftover(target, ".old-")
    (old / "mine.txt").write_text("mine")
    replace = os.replace

    def refuse_to_restore(src, dst):
        if Path(src) == old:
            raise PermissionError(13, "Permission denied")
        replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", refuse_to_restore)
    atomic.write_text(tmp_path / "other.txt", "x")  # a write beside it: not its leftover
    atomic.write_text(target, "new")
    assert (old / "mine.txt").read_text() == "mine", "the only old copy was deleted"


def test_a_running_writers_leftovers_stay(tmp_path):
    target = tmp_path / "out.txt"
    left = _leftover(target)
    alive = left.with_name(left.name.replace(left.name.split("-")[1], str(os.getppid()), 1))
    left.rename(alive)
    atomic.write_text(target, "x")
    assert alive.exists()
