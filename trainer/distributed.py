"""Data-parallel training over processes: DistributedDataParallel with gloo (CPU) or nccl (CUDA).

`blockgraph train ... --nproc N` starts N processes `python -m blockgraph.trainer JOB.json FD` on the loopback
interface and supervises them (`torchrun --nproc-per-node N --no-python blockgraph train ...` does the same by
hand, on any number of nodes): each reads RANK, WORLD_SIZE and LOCAL_RANK from its
environment, joins the process group, trains on its shard of every global batch (see trainer.batching) and
all-reduces gradients. The loss of a rank is its summed token loss divided by the *global* token count and
multiplied by N, so DDP's gradient average equals the single-process gradient of the same global batch.
Only rank 0 prints and writes checkpoints; it evaluates alone under DDP, with the others under FSDP
(trainer.sharded), whose forward takes every rank. The workers load the plugins the launcher was given.

The launcher is the workers' only owner (no torchrun agent between them, whose own signal handling and
tracebacks would stand in the way): each worker runs in its own session, so a Ctrl-C reaches the launcher
alone, which asks every worker to stop (SIGTERM); the workers agree to stop at the same step (`loop.Run.train_step`), so
that none is left waiting in a collective, and any that has not ended `GRACE_S` later (or at a second signal)
is killed. A worker cannot outlive the launcher, however the launcher ends (SIGKILL included): it dies with it
(Linux: PR_SET_PDEATHSIG; everywhere: FD, a pipe only the launcher holds open, reads end-of-file). The workers
inherit the launcher's lock of the run directory, which the kernel releases when the last of them has ended.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict

from blockgraph.common import memory
from blockgraph.common.errors import Problem, UsageError
from blockgraph.trainer.config import TrainConfig


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # this process initialised the process group (and tears it down)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup(device: str = "cpu") -> Context:
    """This process's rank, world size and device; joins the process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    try:
        where = torch.device(device)
    except RuntimeError:
        raise UsageError(Problem(f"--device {device!r} is not a device", hint="use cpu, cuda or cuda:N")) from None
    if where.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(Problem("--device cuda: no CUDA device is available here", hint="use --device cpu"))
        if world > 1:
            where = torch.device("cuda", local)
        torch.cuda.set_device(where)
    elif where.type != "cpu":
        raise UsageError(Problem(f"--device {device}: training runs on cpu or cuda"))
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if where.type == "cuda" else "gloo", rank=rank, world_size=world)
        owns = True
    return Context(rank, world, where, owns)


_SINGLE = {"group": False}  # a one-process group this module started for FSDP (see single_group)


def single_group(context: Context) -> None:
    """A process group of this process alone, when there is none: FSDP shards over a mesh, of one process too
    (a sharded run resumed on one process)."""
    if not dist.is_initialized():
        backend = "nccl" if context.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        _SINGLE["group"] = True


def teardown(context: Context) -> None:
    if (context.owns_group or _SINGLE["group"]) and dist.is_initialized():
        dist.destroy_process_group()
        _SINGLE["group"] = False


def all_sum(context: Context, *values: float) -> list[float]:
    """Element-wise sums over the ranks (the values themselves in a single process)."""
    if not context.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def barrier(context: Context) -> None:
    if context.distributed:
        dist.barrier()


def gather_rng(context: Context) -> dict[str, torch.Tensor]:
    """Every rank's random-number generator states, for rank 0 to save (`rng.cpu.R`, `rng.cuda.R`)."""
    states = {"cpu": torch.get_rng_state()}
    if context.device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(context.device)
    gathered: list[dict[str, torch.Tensor]] = [states]
    if context.distributed:
        gathered = [{} for _ in range(context.world)]
        dist.all_gather_object(gathered, states)
    return {f"rng.{kind}.{rank}": state for rank, per in enumerate(gathered) for kind, state in per.items()}


def restore_rng(context: Context, tensors: dict[str, torch.Tensor]) -> bool:
    """Put this rank's saved generator states back; False when the checkpoint has none for this rank.

    A state of the wrong size or dtype (a corrupt or foreign checkpoint) counts as none.
    """
    cpu = tensors.get(f"rng.cpu.{context.rank}")
    current = torch.get_rng_state()
    if cpu is None or cpu.dtype != current.dtype or cpu.shape != current.shape:
        return False
    torch.set_rng_state(cpu)
    cuda = tensors.get(f"rng.cuda.{context.rank}")
    if cuda is not None and context.device.type == "cuda":
        now = torch.cuda.get_rng_state(context.device)
        if cuda.dtype == now.dtype and cuda.shape == now.shape:
            torch.cuda.set_rng_state(cuda, context.device)
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Job(BaseModel):
    """What every worker of `train --nproc N` runs, handed over as JSON (not as a command line to parse again).

    `config` holds the options set on the command line only, so that the worker's `TrainConfig` has the same
    options set (what a resumed run takes from them, see loop.train).
    """

    model_config = ConfigDict(extra="forbid")

    config: dict[str, Any]
    out: str
    resume: str | None = None
    quiet: bool = False
    locked: bool = False  # the workers share the launcher's lock of the run directory (inherited, see launch)
    plugins: list[str] = []  # what the user named (--plugin, $BLOCKGRAPH_PLUGINS): the workers load them too
    debug: bool = False  # `blockgraph --debug`: a worker's unexpected error shows its traceback

    @classmethod
    def of(cls, config: TrainConfig, out: Path, resume: Path | None, quiet: bool, *, debug: bool = False) -> Job:
        from blockgraph.blocks import REGISTRY

        given = config.model_dump(mode="json", exclude_unset=True)
        resumed = None if resume is None else str(resume)
        plugins = list(REGISTRY.plugins)
        return cls(config=given, out=str(out), resume=resumed, quiet=quiet, locked=True, plugins=plugins, debug=debug)


GRACE_S = 10.0  # how long the workers have to stop at a step once asked, before they are killed
POLL_S = 0.05
STOPPED, FAILED = 130, 2  # a worker's exit status: stopped when asked (with the others); an unexpected error
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass(frozen=True)
class Ending:
    """How the workers of a launch ended."""

    codes: tuple[int, ...]  # each rank's exit status; -N: killed by signal N
    signal: int | None = None  # the first signal the launcher received (it asked the workers to stop)
    failed: int | None = None  # the rank whose unasked end stopped the others
    killed: bool = False  # some did not stop in time and were killed (rank 0's terminal state is not restored)

    @property
    def finished(self) -> bool:
        return not any(self.codes)


def launch(nproc: int, job: Job, *, lock: int | None = None, port: int | None = None) -> Ending:
    """Run `job` in `nproc` processes on 127.0.0.1 (`python -m blockgraph.trainer JOB.json FD`) until all end.

    `lock`: the descriptor of the run directory's lock (`rundir.exclusive`), which the workers inherit.
    """
    handle, name = tempfile.mkstemp(prefix="blockgraph-job-", suffix=".json")
    with os.fdopen(handle, "w", encoding="utf-8") as file:
        file.write(job.model_dump_json())
    try:
        return _run_workers(nproc, name, lock, port)
    finally:
        os.unlink(name)


def _run_workers(nproc: int, job_file: str, lock: int | None, port: int | None) -> Ending:
    received: list[int] = []
    previous = _catch(STOP_SIGNALS, lambda signum, frame: received.append(signum))
    watch, held = os.pipe()  # the workers get `watch`; only this process holds `held`, so they see EOF at its end
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port or free_port()),
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        **({memory.SKIP_ENV: "1"} if memory.skip_requested() else {}),  # --skip-memory-check reaches the workers
    }
    inherited = (watch,) if lock is None else (watch, lock)
    workers: list[subprocess.Popen[bytes]] = []
    try:
        for rank in range(nproc):
            command = [sys.executable, "-m", "blockgraph.trainer", job_file, str(watch)]
            ranked = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0"}
            workers.append(subprocess.Popen(command, env=ranked, pass_fds=inherited, start_new_session=True))
        return _supervise(workers, received)
    finally:
        for worker in workers:  # only after an error of this process: none is left behind
            if worker.poll() is None:
                _kill(worker)
                worker.wait()
        os.close(watch)
        os.close(held)
        _catch(STOP_SIGNALS, previous)


def _supervise(workers: list[subprocess.Popen[bytes]], received: list[int]) -> Ending:
    """Wait for every worker; on a signal, or a worker's unasked end, ask the rest to stop, then kill them."""
    codes: list[int | None] = [None] * len(workers)
    failed: int | None = None
    asked: float | None = None  # when the workers were asked to stop
    killed = False
    while any(code is None for code in codes):
        for rank, worker in enumerate(workers):
            if codes[rank] is None and (code := worker.poll()) is not None:
                codes[rank] = code
                if code and failed is None and asked is None:
                    failed = rank
        alive = [worker for rank, worker in enumerate(workers) if codes[rank] is None]
        if asked is None and (received or failed is not None):
            asked = time.monotonic()
            for worker in alive:
                worker.send_signal(signal.SIGTERM)
        if asked is not None and alive and (len(received) > 1 or time.monotonic() - asked > GRACE_S):
            killed = True
            for worker in alive:
                _kill(worker)
        time.sleep(POLL_S)
    return Ending(tuple(c or 0 for c in codes), received[0] if received else None, failed, killed)


def _kill(worker: subprocess.Popen[bytes]) -> None:
    """SIGKILL a worker not yet waited for, and what it started (its process group: its session's leader)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(worker.pid, signal.SIGKILL)


Handler = Callable[[int, FrameType | None], Any] | int  # as signal.signal takes them (SIG_DFL, SIG_IGN: ints)


def _catch(signals: Iterable[int], handler: Handler | dict[int, Handler]) -> dict[int, Handler]:
    """Install `handler` (one for all, or a dict of them) for `signals`; returns the previous ones. Only the
    main thread may handle signals: elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous: dict[int, Handler] = {}
    for signum in signals:
        chosen = handler.get(signum) if isinstance(handler, dict) else handler
        if chosen is not None:
            previous[signum] = signal.signal(signum, chosen) or signal.SIG_DFL  # None: not set from Python
    return previous


class Stopped(KeyboardInterrupt):
    """Every rank stops at the same step when one of them was asked to (a signal): none waits for another."""


_STOP = {"asked": False}


def _ask_stop(signum: int, frame: FrameType | None) -> None:
    _STOP["asked"] = True


def stop_asked() -> bool:
    """Whether this process was asked to stop (by SIGINT, SIGTERM or SIGHUP, see `catch_stop_signals`)."""
    return _STOP["asked"]


def catch_stop_signals() -> None:
    """Stop signals from now on only ask for a stop, which the ranks carry out together (loop.Run.train_step)."""
    _catch(STOP_SIGNALS, _ask_stop)


def wait_for_stop(seconds: float) -> bool:
    """Whether a stop is asked within `seconds`: a worker whose peer ended is asked at once by the launcher."""
    deadline = time.monotonic() + seconds
    while not _STOP["asked"] and time.monotonic() < deadline:
        time.sleep(POLL_S)
    return _STOP["asked"]


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGTERM and SIGHUP interrupt a one-process run as Ctrl-C does (KeyboardInterrupt); in a rank of a run
    torchrun started by hand, these signals ask every rank to stop at the same step instead."""
    together = os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1")
    previous = _catch(STOP_SIGNALS, _ask_stop) if together else _catch((signal.SIGTERM, signal.SIGHUP), _interrupt)
    try:
        yield
    finally:
        _catch(previous, previous)


class Interrupted(KeyboardInterrupt):
    """A signal other than SIGINT interrupted a one-process run, as Ctrl-C does."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)
