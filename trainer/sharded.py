"""Models bigger than one process: FSDP2 (`torch.distributed.fsdp.fully_shard`) and sharded checkpoints.

`train --strategy fsdp` shards every parameter over the processes of a one-dimensional device mesh: each copy
of a `repeat:` stack (the spec's layers, which the compiled model holds in a ModuleList) is a unit, then the
root takes what is left (embeddings, final norm, generator). A unit's parameters are gathered for its forward
and backward and freed after; gradients are reduce-scattered (averaged, as DDP's all-reduce does, so the
trainer's loss scaling gives the one-process gradient), and Adam keeps its moments of the local shard only.
`--dtype bfloat16` runs forward and backward in bfloat16 with float32 gradient reduction (MixedPrecisionPolicy);
`--checkpoint-activations` recomputes each unit's activations in the backward pass.

Checkpoints are written with `torch.distributed.checkpoint` (DCP): every rank writes its shards into
`checkpoint/sharded/`, rank 0 the metadata, the standalone `spec.yaml` and the records of an ordinary
checkpoint (trainer.json, vocab.json), all into a temporary directory swapped into place once whole (as
common.atomic does for one process). DCP reshards on load, so a run resumes on any number of processes, one
included. `blockgraph consolidate` turns such a checkpoint into an ordinary one (safetensors) for
`translate`, `export` and `inspect`.

A DCP checkpoint's metadata is a pickle. It is read here by an unpickler that builds only DCP's own metadata
records (and torch sizes, dtypes and paths), never anything else; a checkpoint may hold tensors only (no
pickled objects), each in a shard file named as DCP names them inside the checkpoint, within that file's
size; the tensors themselves are read by `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from builder.source import dump_yaml
from common.atomic import check_directory_target, write_directory
from common.errors import CheckpointError, Location, Problem, UsageError
from common.files import FileKind, MiB, read_bytes
from trainer import checkpoint, distributed
from trainer.checkpoint import METADATA, SHARD_FILE, SHARDED
from trainer.checkpoint import SHARDED_SPEC as SPEC
from trainer.config import TrainConfig
from trainer.distributed import Context
from trainer.text import MARIAN_FILES, RECORD, TOKENIZER, TOKENIZER_JSON

METADATA_FILE = FileKind("sharded checkpoint's .metadata", CheckpointError, limit=256 * MiB)


def check(config: TrainConfig) -> None:
    """The FSDP options apply to --strategy fsdp only."""
    if config.strategy != "fsdp":
        given = [flag for flag, on in (("--dtype", config.dtype != "float32"),
                 ("--checkpoint-activations", config.checkpoint_activations)) if on]  # fmt: skip
        if given:
            raise UsageError(Problem(f"{given[0]} applies to --strategy fsdp", hint="add --strategy fsdp"))


def shard(model: nn.Module, config: TrainConfig, context: Context) -> None:
    """Shard `model` in place over the processes: each repeated layer a unit, then the root."""
    from torch.distributed._composable import checkpoint as recompute
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not context.distributed:
        distributed.single_group(context)
    mesh = init_device_mesh(context.device.type, (context.world,))
    policy = MixedPrecisionPolicy()
    if config.dtype == "bfloat16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    layers = [layer for module in model.modules() if isinstance(module, nn.ModuleList) for layer in module]
    for layer in layers:
        if config.checkpoint_activations:
            recompute(layer)
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def local_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """The bytes this process holds of the parameters and of the optimizer state (its shards only)."""

    def size(tensor: torch.Tensor) -> int:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        return local.numel() * local.element_size()

    parameters = sum(size(p) for p in model.parameters())
    state = sum(size(v) for entries in optimizer.state.values() for v in entries.values() if torch.is_tensor(v))
    return parameters, state


def is_sharded(directory: Path) -> bool:
    return (directory / SHARDED / METADATA).is_file()


def _state(model: nn.Module, optimizer: torch.optim.Optimizer, *, prime: bool = False) -> dict[str, Any]:
    """The model's and optimizer's state dicts as DCP writes and reads them (the optimizer's hyper-parameters
    are the schedule's, in trainer.json). `prime`: create a fresh optimizer's state first, to load into (a step
    of zero gradients at learning rate 0 leaves every parameter as it is)."""
    if prime and not optimizer.state:
        rates = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = 0.0
        for parameter in model.parameters():
            parameter.grad = torch.zeros_like(parameter)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for group, rate in zip(optimizer.param_groups, rates, strict=True):
            group["lr"] = rate
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": {"state": optimizer_state["state"]}}


def save(
    directory: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    records: checkpoint.Records,
    rng: dict[str, torch.Tensor],
    context: Context,
) -> Path:
    """Every rank: write the sharded checkpoint `directory` (see the module notes); returns its path."""
    state = {**_state(model, optimizer), **rng}
    spec_text = dump_yaml(model.typed_graph.graph.standalone)  # type: ignore[union-attr]
    if not context.main:
        (folder,) = _broadcast([None])
        if folder is not None:
            dcp.save(state, checkpoint_id=Path(folder) / SHARDED)
        dist.barrier()
        return directory

    def fill(tmp: Path) -> None:
        tmp.mkdir(exist_ok=True)
        _broadcast([str(tmp)])
        dcp.save(state, checkpoint_id=tmp / SHARDED)
        dist.barrier()
        records.write(tmp)
        (tmp / SPEC).write_text(spec_text, encoding="utf-8")

    try:
        check_directory_target(directory, owned=checkpoint.replaceable, what=checkpoint.WHAT)
    except Exception:
        _broadcast([None])  # the others stop waiting; the error is rank 0's to report
        dist.barrier()
        raise
    return write_directory(directory, fill, owned=checkpoint.replaceable, what=checkpoint.WHAT)


def _broadcast(values: list[Any]) -> list[Any]:
    dist.broadcast_object_list(values, src=0)
    return values


def load(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, *, distributed: bool
) -> dict[str, torch.Tensor]:
    """Fill `model` (sharded or whole) and `optimizer` from the sharded checkpoint `directory`; returns the
    saved random-number generator states. Every rank calls it when `distributed`."""
    folder = directory / SHARDED
    reader = SafeReader(folder)
    metadata = reader.read_metadata()
    if optimizer is None:
        model_state, _ = get_state_dict(model, [])
        state: dict[str, Any] = {"model": model_state}
    else:
        state = _state(model, optimizer, prime=True)
    saved = metadata.state_dict_metadata
    rng = {name: torch.empty(meta.size, dtype=meta.properties.dtype) for name, meta in saved.items()
           if name.startswith("rng.") and isinstance(meta, dcp_metadata.TensorStorageMetadata)}  # fmt: skip
    state.update(rng)
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=reader, no_dist=not distributed)
    except CheckpointError:
        raise
    except Exception as exc:  # DCP's messages name what is missing or mis-shaped: keep that, say where
        message = f"the sharded checkpoint does not fit this model: {type(exc).__name__}: {str(exc)[:300]}"
        hint = "it is corrupt, or of another spec"
        raise CheckpointError(Problem(message, Location(str(folder)), hint=hint)) from None
    if optimizer is None:
        set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={})
    else:
        groups = get_state_dict(model, optimizer)[1]["param_groups"]
        optimizer_state = {"state": state["optim"]["state"], "param_groups": groups}
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=optimizer_state)
    return rng


class SafeReader(FileSystemReader):
    """DCP's file reader, its metadata read without running code (see the module notes)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        folder = Path(self.path)
        where = Location(str(folder / METADATA))
        data = read_bytes(folder / METADATA, METADATA_FILE)
        try:
            metadata = _MetadataUnpickler(io.BytesIO(data)).load()
        except CheckpointError:
            raise
        except Exception:
            metadata = None
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise CheckpointError(Problem("not a sharded checkpoint's metadata", where))
        objects = [name for name, meta in metadata.state_dict_metadata.items()
                   if not isinstance(meta, dcp_metadata.TensorStorageMetadata)]  # fmt: skip
        if objects:
            raise CheckpointError(Problem(f"{objects[0]} is a pickled object; a checkpoint holds tensors only", where))
        for info in (metadata.storage_data or {}).values():
            name = str(getattr(info, "relative_path", ""))
            shard = folder / name
            if not SHARD_FILE.fullmatch(name) or not shard.is_file() or shard.is_symlink():
                raise CheckpointError(Problem("the metadata names a shard file that is not the checkpoint's", where))
            if not (info.offset >= 0 and info.length >= 0 and info.offset + info.length <= shard.stat().st_size):
                raise CheckpointError(Problem(f"the metadata reads beyond the end of {name}", where))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


_DCP_CLASSES = {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING"}  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata records and nothing else: any other class or function is refused."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = (
            (module == "torch.distributed.checkpoint.metadata" and name in _DCP_CLASSES)
            or (module == "torch.distributed.checkpoint.filesystem" and name == "_StorageInfo")
            or (module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)))
            or (module == "torch.serialization" and name == "_get_layout")
            or (module == "pathlib" and name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"))
        )
        if not allowed:
            raise CheckpointError(
                Problem(f"the sharded checkpoint's metadata names {module}.{name}, which is not DCP's metadata")
            )
        return super().find_class(module, name)


def consolidate(path: str | Path, out: str | Path) -> Path:
    """Write the sharded checkpoint at `path` (a run directory or its checkpoint/) as an ordinary checkpoint at
    `out`: the whole model in safetensors, Adam's state, the records; it translates, exports and resumes (with
    DDP) as any checkpoint does."""
    from trainer import schedule

    out = Path(out)
    check_directory_target(out, owned=checkpoint.replaceable, what=checkpoint.WHAT)
    saved = checkpoint.load(path, sharded_ok=True)
    if not saved.sharded:
        raise UsageError(Problem(f"{saved.path} is an ordinary checkpoint already", hint="use it as it is"))
    optimizer = schedule.adam(saved.model)
    rng = load(saved.path, saved.model, optimizer, distributed=False)
    info = {k: v for k, v in saved.info.items() if k not in ("format", "format_version")}
    info["config"] = {**info["config"], "strategy": "ddp", "dtype": "float32", "checkpoint_activations": False}
    carried = {
        name: read_bytes(saved.path / name, checkpoint.VOCAB_FILE)
        for name in (RECORD, *(f"{TOKENIZER}/{n}" for n in (*TOKENIZER_JSON, *MARIAN_FILES)))
        if (saved.path / name).is_file()
    }
    records = checkpoint.Records(info, saved.src_vocab, saved.tgt_vocab, saved.labels, carried or None)
    tensors = {**checkpoint.optimizer_state(optimizer), **rng}
    return checkpoint.save(out, model=saved.model, records=records, tensors=tensors)
