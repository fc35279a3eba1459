"""Classes 3 and 7: writes never destroy what was there, and a failed write is a clean error that changes nothing.

Targets that are not blockgraph's to replace (a FIFO, a socket, a symbolic link, a directory where a file is
expected, a foreign directory) are refused and left as they were; a full disk (a file-size limit: EFBIG, or a
small tmpfs: ENOSPC) and a read-only file system leave the previous output intact; a kill at any moment of
`build --out` over a saved model leaves the old or the new model loadable under its name.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
from harness import NOTES, TRANSFORMER, assert_clean, bounded, finish, spawn, tiny_spec

from blockgraph import builder

pytest_plugins = ("harness",)

COMMANDS = {
    "export": lambda spec, out: ("export", spec, "--format", "exported-program", "--out", out),
    "build": lambda spec, out: ("build", spec, "--out", out),
    "schema": lambda spec, out: ("schema", "--out", out),
    "train": lambda spec, out: ("train", TRANSFORMER, "--task", "copy", "--max-steps", "1", "--out", out, *TINY),
}
TINY = ("--set", "d_model=16", "--set", "heads=2", "--quiet")


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _socket(path: Path) -> Path:
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.close()
    return path


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("kind", ["fifo", "socket"])
def test_a_special_file_is_never_replaced(tmp_path, command, kind):
    target = (_fifo if kind == "fifo" else _socket)(tmp_path / "out")
    outcome = bounded(f"{command}-out-{kind}", *COMMANDS[command](tiny_spec(tmp_path / "s"), target))
    assert_clean(outcome, 1, "is a FIFO" if kind == "fifo" else "is a socket", "never replaced")
    mode = os.lstat(target).st_mode
    assert stat.S_ISFIFO(mode) if kind == "fifo" else stat.S_ISSOCK(mode)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_symbolic_link_is_never_written_through(tmp_path, command):
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    link = tmp_path / "out"
    link.symlink_to(victim)
    outcome = bounded(f"{command}-out-symlink", *COMMANDS[command](tiny_spec(tmp_path / "s"), link))
    assert_clean(outcome, 1, "is a symbolic link")
    assert link.is_symlink() and victim.read_text() == "keep me"


@pytest.mark.parametrize("command", ["export", "schema"])
def test_a_directory_is_no_file(tmp_path, command):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "mine.txt").write_text("mine")
    outcome = bounded(f"{command}-out-directory", *COMMANDS[command](tiny_spec(tmp_path / "s"), folder))
    assert_clean(outcome, 1, "is a directory")
    assert (folder / "mine.txt").read_text() == "mine"


@pytest.mark.parametrize("command", ["build", "train"])
@pytest.mark.parametrize("contents", ["foreign", "file", "manifest-and-mine"])
def test_a_foreign_directory_or_file_is_never_replaced(tmp_path, command, contents):
    out = tmp_path / "out"
    if contents == "file":
        out.write_text("mine")
    else:
        out.mkdir()
        (out / "mine.txt").write_text("mine")
        if contents == "manifest-and-mine":  # it looks like a saved model, but holds a file of the user's
            (out / "blockgraph.json").write_text("{}")
    outcome = bounded(f"{command}-out-{contents}", *COMMANDS[command](tiny_spec(tmp_path / "s"), out))
    assert_clean(outcome, 1)
    assert (out.read_text() if contents == "file" else (out / "mine.txt").read_text()) == "mine"


def test_a_folder_of_the_users_named_like_a_saved_models_file_is_never_replaced(tmp_path):
    spec = tiny_spec(tmp_path / "s")
    out = tmp_path / "model"
    assert_clean(bounded("build-first", *COMMANDS["build"](spec, out)), 0)
    (out / "model.safetensors").unlink()
    (out / "model.safetensors").mkdir()
    (out / "model.safetensors" / "thesis.txt").write_text("mine")
    assert_clean(bounded("build-over-a-folder-named-weights", *COMMANDS["build"](spec, out)), 1, "is not a saved")
    assert (out / "model.safetensors" / "thesis.txt").read_text() == "mine"


def test_a_checkpoint_whose_model_folder_holds_the_users_files_is_never_replaced(run_dir, tmp_path):
    other = Path(shutil.copytree(run_dir, tmp_path / "other"))
    model = other / "checkpoint" / "model"
    for item in model.iterdir():
        item.unlink()
    (model / "thesis.txt").write_text("mine")
    outcome = bounded("resume-into-a-foreign-model-folder", "train", "--resume", run_dir, "--out", other, *TINY[-1:])
    assert_clean(outcome, 1, "is not a training run directory")
    assert (model / "thesis.txt").read_text() == "mine"


@pytest.mark.parametrize("beside", ["notes.txt", "checkpoint/notes.txt"])
def test_a_folder_with_the_users_files_beside_run_names_is_no_run_directory(tmp_path, beside):
    out = tmp_path / "mine"
    (out / "checkpoint").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"mine": 1}\n')
    (out / beside).write_text("mine")
    outcome = bounded(f"train-out-{beside}", *COMMANDS["train"](None, out))
    assert_clean(outcome, 1, "is not a training run directory")
    assert (out / "metrics.jsonl").read_text() == '{"mine": 1}\n' and (out / beside).read_text() == "mine"


def test_a_missing_parent_is_created_and_a_file_parent_refused(tmp_path):
    spec = tiny_spec(tmp_path / "s")
    assert_clean(bounded("export-new-parent", *COMMANDS["export"](spec, tmp_path / "a" / "b" / "m.pt2")), 0)
    (tmp_path / "file").write_text("mine")
    for command in ("export", "schema", "build"):
        outcome = bounded(f"{command}-file-parent", *COMMANDS[command](spec, tmp_path / "file" / "x"))
        assert_clean(outcome, 1, "cannot")
    assert (tmp_path / "file").read_text() == "mine"


@pytest.mark.parametrize("command", ["build", "export", "schema"])
def test_a_full_disk_keeps_the_previous_output(tmp_path, file_size_limit, command):
    spec = tiny_spec(tmp_path / "s")
    out = tmp_path / ("model" if command == "build" else "out")
    assert_clean(bounded(f"{command}-first", *COMMANDS[command](spec, out)), 0)
    before = _snapshot(out)
    with file_size_limit(300):
        outcome = bounded(f"{command}-disk-full", *COMMANDS[command](spec, out))
    assert_clean(outcome, 1, "File too large", "nothing was replaced")
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["s", out.name])  # no temporaries left


def test_a_checkpoint_that_does_not_fit_keeps_the_previous_one(run_dir, file_size_limit):
    before = _snapshot(run_dir / "checkpoint")
    with file_size_limit(2000):
        outcome = bounded("checkpoint-disk-full", "train", "--resume", run_dir, "--max-steps", "3", "--quiet")
    assert_clean(outcome, 1, "cannot write")
    assert _snapshot(run_dir / "checkpoint") == before


def _snapshot(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def _tmpfs(path: Path, options: str):
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.parametrize("command", ["build", "export", "schema", "train"])
def test_a_read_only_file_system_is_a_clean_error(tmp_path, command):
    with _tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        outcome = bounded(f"{command}-read-only", *COMMANDS[command](tiny_spec(tmp_path / "s"), ro / "out"))
        assert_clean(outcome, 1, "Read-only file system")
        assert list(ro.iterdir()) == []


@pytest.mark.parametrize("command", ["build", "export"])
def test_a_full_file_system_is_a_clean_error(tmp_path, command):
    with _tmpfs(tmp_path / "small", "size=4k") as small:  # one page: the second file does not fit
        outcome = bounded(f"{command}-no-space", *COMMANDS[command](tiny_spec(tmp_path / "s"), small / "out"))
        assert_clean(outcome, 1, "No space left on device")
        assert list(small.iterdir()) == []


def test_train_checks_its_run_directory_before_the_first_step(tmp_path):
    with _tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        started = time.perf_counter()
        outcome = bounded("train-read-only-early", *COMMANDS["train"](None, ro / "run"))
        assert_clean(outcome, 1, "cannot")
        assert "epoch" not in outcome.stderr and time.perf_counter() - started < 5


def test_a_kill_during_build_out_leaves_a_loadable_model(tmp_path):
    """SIGKILL `build --out` at random moments of its save over an existing model. A watcher looks at the name
    all along (every 0.2 ms): it always holds a whole model, old or new, and the next write removes what the
    killed writers left."""
    spec = tiny_spec(tmp_path / "s", replace={"vocab: 20": "vocab: 8000", "d_model: 8": "d_model: 256"})
    out = tmp_path / "model"
    builder.save(builder.build(spec), out)
    gaps: list[float] = []
    watching = threading.Event()

    def watch() -> None:
        while watching.is_set():
            if not (out / "blockgraph.json").is_file():
                gaps.append(time.monotonic())
            time.sleep(0.0002)

    watching.set()
    watcher = threading.Thread(target=watch)
    watcher.start()
    rng = random.Random(0)
    interrupted = 0
    try:
        for attempt in range(7):
            process = spawn("build", spec, "--out", out)
            deadline = time.monotonic() + 60
            while process.poll() is None and time.monotonic() < deadline:  # until the write has begun
                if any(p.name.startswith(".model.tmp-") for p in tmp_path.iterdir()):
                    break
                time.sleep(0.001)
            if attempt < 6:  # the last one runs to its end: the swap itself is watched too
                time.sleep(rng.uniform(0.0, 0.06))  # within the write, the swap or the clean-up (about 0.05 s)
                process.send_signal(signal.SIGKILL)
            outcome = finish(f"kill-build-{attempt}", process)
            interrupted += any(p.name.startswith(".model.") for p in tmp_path.iterdir())
            assert builder.load(out).embed.lut.weight.shape == (8000, 256)  # old or new, whole
    finally:
        watching.clear()
        watcher.join()
    assert outcome.code == 0 and not gaps, f"the name held no model {len(gaps)} times"
    builder.save(builder.build(spec), out)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".model.")] == []
    NOTES.append(
        f"kill during build --out: {interrupted} of 6 kills left a write unfinished; the name always held a model"
    )
