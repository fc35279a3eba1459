"""Interrupting a run (issue 23): a signal to `train --nproc 2`'s launcher alone, its death, or a worker's, ends
every worker and frees the run directory, with one line saying where the last checkpoint is; a resumed run says
so, its progress goes on counting, and the epoch it resumed midway reports the figures of all its batches."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import ROOT, SPECS, tiny_reverse_config
from rich.console import Console

from blockgraph.trainer import checkpoint, rundir
from blockgraph.trainer.loop import TrainConfig, train

torch.set_num_threads(1)

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo"),
    pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds the processes in /proc"),
]

RUN = [
    "train", SPECS / "rnn_seq2seq_attention.yaml", "--task", "reverse",
    "--task-options", "symbols=6,min_len=2,max_len=6,train=65,valid=8",
    "--set", "emb=16", "--set", "hidden=16", "--set", "layers=1", "--set", "dropout=0.0",
    "--batch-size", "16", "--epochs", "1000", "--save-every", "2", "--bleu-sentences", "0", "--quiet",
]  # fmt: skip


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state, ppid, ...; start time is [19]), None when gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _descendants(pid: int) -> dict[int, str]:
    """Every process below `pid`, with its start time (so that a reused pid is not taken for it)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found: dict[int, str] = {}
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if (fields := _stat(child)) is not None:
                found[child] = fields[19]
                todo.append(child)
    return found


def _running(processes: dict[int, str]) -> list[int]:
    return [
        pid
        for pid, started in processes.items()
        if (fields := _stat(pid)) is not None and fields[19] == started and fields[0] not in "ZX"
    ]


def _start(run: Path, *extra: str, nproc: int = 2) -> tuple[subprocess.Popen[str], dict[int, str]]:
    """`train --nproc N` once it has written a checkpoint; the launcher and its processes."""
    command = [sys.executable, "-m", "blockgraph.cli", *map(str, RUN), "--nproc", str(nproc), "--out", str(run), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "400"}
    launcher = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run / checkpoint.NAME / checkpoint.TRAINER).is_file():
        if launcher.poll() is not None or time.monotonic() > deadline:
            launcher.kill()
            pytest.fail("the run did not start: " + "".join(launcher.communicate(timeout=30)))
        time.sleep(0.1)
    processes = _descendants(launcher.pid)
    assert len(processes) >= (nproc if nproc > 1 else 0), processes
    return launcher, processes


def _gone(processes: dict[int, str], seconds: float) -> list[int]:
    """The processes still running after up to `seconds`."""
    deadline = time.monotonic() + seconds
    while (left := _running(processes)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _holds(pid: int, path: Path) -> bool:
    """Whether process `pid` has `path` open."""
    folder = Path(f"/proc/{pid}/fd")
    return any(os.readlink(folder / fd) == str(path) for fd in os.listdir(folder))


def _lock_is_free(run: Path) -> bool:
    try:
        with rundir.exclusive(run):
            return True
    except Exception:
        return False


@pytest.mark.parametrize(("signum", "strategy"), [(signal.SIGINT, "ddp"), (signal.SIGTERM, "fsdp")])
def test_a_signal_to_the_launcher_stops_every_worker_in_one_line(tmp_path, signum, strategy):
    run = tmp_path / "run"
    launcher, processes = _start(run, "--strategy", strategy)
    assert all(_holds(pid, run / rundir.LOCK) for pid in processes)  # the lock lasts as long as the last of them
    launcher.send_signal(signum)
    _, stderr = launcher.communicate(timeout=60)
    assert not _running(processes), processes  # the launcher waited for them all
    assert launcher.returncode == 128 + signum, stderr
    assert stderr.splitlines() == [
        "launching 2 processes (127.0.0.1)",
        f"interrupted: the last complete checkpoint is in {run / checkpoint.NAME}",
    ], stderr  # no traceback, no warning of a worker
    assert _lock_is_free(run)
    assert checkpoint.is_checkpoint(run / checkpoint.NAME)


def test_sigterm_interrupts_one_process_as_ctrl_c_does(tmp_path):
    run = tmp_path / "run"
    launcher, _ = _start(run, nproc=1)
    launcher.terminate()
    _, stderr = launcher.communicate(timeout=60)
    assert launcher.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.splitlines() == [f"interrupted: the last complete checkpoint is in {run / checkpoint.NAME}"], stderr


def test_workers_die_with_a_killed_launcher_and_the_run_resumes(tmp_path, run_cli):
    run = tmp_path / "run"
    launcher, processes = _start(run)
    launcher.kill()
    launcher.communicate(timeout=30)
    assert not _gone(processes, 10), "workers outlived their launcher"
    assert _lock_is_free(run)
    step = json.loads((run / checkpoint.NAME / checkpoint.TRAINER).read_text())["step"]
    resumed = run_cli("train", "--resume", run, "--max-steps", step + 1)
    assert resumed.code == 0, resumed.stderr
    assert f"resuming {run} at epoch" in resumed.stderr and f"step {step}" in resumed.stderr


def test_a_crashed_worker_stops_the_run_in_one_line(tmp_path):
    run = tmp_path / "run"
    launcher, processes = _start(run)
    ranks = {pid: Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") for pid in processes}
    (second,) = [pid for pid, env in ranks.items() if b"RANK=1" in env]
    os.kill(second, signal.SIGKILL)
    _, stderr = launcher.communicate(timeout=60)
    assert not _running(processes)
    assert launcher.returncode == 1
    assert stderr.splitlines()[-1] == (
        f"stopped: process 1 of 2 was killed by SIGKILL; the last complete checkpoint is in {run / checkpoint.NAME}"
    )
    assert "Traceback" not in stderr and "error" not in stderr, stderr
    assert _lock_is_free(run)


def _tiny(**changes: object) -> TrainConfig:
    return tiny_reverse_config(**{"bleu_sentences": 0, **changes})


def test_a_resumed_run_says_so_and_its_progress_goes_on(tmp_path):
    """6 batches an epoch: stopped at step 3 of 12, the resumed run's bar starts at 3/12, not 0/9."""
    train(_tiny(epochs=2, max_steps=3), tmp_path / "run", quiet=True)
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=200, color_system=None)
    train(TrainConfig(epochs=2, max_steps=None), resume=tmp_path / "run", console=console)
    shown = screen.getvalue()
    assert f"resuming {tmp_path / 'run'} at epoch 1, step 3" in shown
    assert "3/12" in shown and "0/9" not in shown, shown


def test_a_corrupt_epoch_sums_is_a_located_error(tmp_path, run_cli):
    train(_tiny(epochs=2, max_steps=3), tmp_path / "run", quiet=True)
    path = tmp_path / "run" / checkpoint.NAME / checkpoint.TRAINER
    record = json.loads(path.read_text())
    assert record["epoch_sums"]["tokens"] > 0  # what the epoch trained before the save
    path.write_text(json.dumps({**record, "epoch_sums": {"loss": "many"}}))
    result = run_cli("train", "--resume", tmp_path / "run")
    assert result.code == 1 and result.exception is None, result.stderr
    assert "trainer.json: field epoch_sums.loss" in " ".join(result.stderr.split()), result.stderr
