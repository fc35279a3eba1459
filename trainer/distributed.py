"""Data-parallel training over processes: DistributedDataParallel with gloo (CPU) or nccl (CUDA).

`blockgraph train ... --nproc N` runs `python -m blockgraph.trainer JOB.json` under torchrun on the loopback interface
(`torchrun --nproc-per-node N --no-python blockgraph train ...` does the same by hand, on any number of nodes):
N processes start; each reads RANK, WORLD_SIZE and LOCAL_RANK from its
environment, joins the process group, trains on its shard of every global batch (see trainer.batching) and
all-reduces gradients. The loss of a rank is its summed token loss divided by the *global* token count and
multiplied by N, so DDP's gradient average equals the single-process gradient of the same global batch.
Only rank 0 prints and writes checkpoints; it evaluates alone under DDP, with the others under FSDP
(trainer.sharded), whose forward takes every rank. The workers load the plugins the launcher was given.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict

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
    locked: bool = False  # the launcher holds the run directory's lock until every worker has ended
    plugins: list[str] = []  # what the user named (--plugin, $BLOCKGRAPH_PLUGINS): the workers load them too

    @classmethod
    def of(cls, config: TrainConfig, out: Path, resume: Path | None, quiet: bool) -> Job:
        from blockgraph.blocks import REGISTRY

        given = config.model_dump(mode="json", exclude_unset=True)
        resumed = None if resume is None else str(resume)
        plugins = list(REGISTRY.plugins)
        return cls(config=given, out=str(out), resume=resumed, quiet=quiet, locked=True, plugins=plugins)


def launch(nproc: int, job: Job, *, port: int | None = None) -> int:
    """Run `job` in `nproc` processes under torchrun on 127.0.0.1 (`python -m blockgraph.trainer JOB.json`)."""
    handle, name = tempfile.mkstemp(prefix="blockgraph-job-", suffix=".json")
    with os.fdopen(handle, "w", encoding="utf-8") as file:
        file.write(job.model_dump_json())
    try:
        return _torchrun(nproc, [name], port)
    finally:
        os.unlink(name)


def _torchrun(nproc: int, args: list[str], port: int | None) -> int:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(port or free_port()),
        "-m",
        "blockgraph.trainer",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run(command, env=env).returncode
