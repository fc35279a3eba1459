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
import re
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

from blockgraph.builder.source import dump_yaml
from blockgraph.common.atomic import check_directory_target, write_directory
from blockgraph.common.errors import CheckpointError, Location, Problem, UsageError
from blockgraph.common.files import FileKind, MiB, read_bytes
from blockgraph.trainer import checkpoint, distributed
from blockgraph.trainer.checkpoint import METADATA, SHARD_FILE, SHARDED
from blockgraph.trainer.checkpoint import SHARDED_SPEC as SPEC
from blockgraph.trainer.config import TrainConfig
from blockgraph.trainer.distributed import Context
from blockgraph.trainer.text import RECORD, TOKENIZER, TOKENIZER_FILES

RNG = re.compile(r"rng\.(cpu|cuda)\.\d{1,6}")  # the generator states a checkpoint may hold (distributed.gather_rng)
METADATA_FILE = FileKind("sharded checkpoint's .metadata", CheckpointError, limit=256 * MiB)


def check(config: TrainConfig) -> None:
    """The FSDP options apply to --strategy fsdp only."""
    if config.strategy != "fsdp":
        given = [flag for flag, on in (("--dtype", config.dtype != "float32"),
                 ("--checkpoint-activations", config.checkpoint_activations)) if on]  # fmt: skip
        if given:
            raise UsageError(Problem(f"{given[0]} applies to --strategy fsdp", hint="add --strategy fsdp"))


def shard(model: nn.Module, config: TrainConfig, context: Context) -> None:
    """Shard `model` in place over the processes: each repeated layer a unit (innermost first), then the root."""
    from torch.distributed._composable import checkpoint as recompute
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not context.distributed:
        distributed.single_group(context)
    mesh = init_device_mesh(context.device.type, (context.world,))
    policy, root = MixedPrecisionPolicy(), MixedPrecisionPolicy()
    if config.dtype == "bfloat16":  # the loss is computed from float32 outputs
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        root = MixedPrecisionPolicy(torch.bfloat16, torch.float32, output_dtype=torch.float32)
    for blocks in units(model):
        if config.checkpoint_activations:
            for block in blocks:
                recompute(block)
        fully_shard(blocks, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=root)


def units(model: nn.Module) -> list[list[nn.Module]]:
    """The blocks of each repeated layer, deepest repeats first (FSDP wraps inside out). A layer is one block,
    or a sub-graph's copy (a ModuleDict, which has no forward of its own): its blocks, those of repeats nested
    in it left to their own units."""
    copies = [(name.count("."), copy) for name, module in model.named_modules() if isinstance(module, nn.ModuleList)
              for copy in module]  # fmt: skip
    nested = {id(copy) for _, copy in copies}

    def blocks(module: nn.Module) -> list[nn.Module]:
        if not isinstance(module, nn.ModuleDict | nn.ModuleList):
            return [module]
        return [b for child in module.children() if id(child) not in nested for b in blocks(child)]

    found = [[copy] if not isinstance(copy, nn.ModuleDict) else blocks(copy)
             for _, copy in sorted(copies, key=lambda item: -item[0])]  # fmt: skip
    return [group for group in found if group]


def _state(model: nn.Module, optimizer: torch.optim.Optimizer, *, prime: bool = False) -> dict[str, Any]:
    """The model's and optimizer's state dicts as DCP writes and reads them (the optimizer's hyper-parameters
    are the schedule's, in trainer.json). `prime`: create a fresh optimizer's state first, to load into (a step
    of zero gradients at learning rate 0 leaves every parameter as it is)."""
    if prime and not optimizer.state:
        rates = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = 0.0
        for parameter in model.parameters():
            if parameter.requires_grad:  # a frozen one has no state, in training as here
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
) -> Path | None:
    """Every rank: write the sharded checkpoint `directory` (see the module notes); its path, or None on the
    ranks whose rank 0 could not write it (rank 0 raises the error)."""
    state = {**_state(model, optimizer), **rng}
    spec_text = dump_yaml(model.typed_graph.graph.standalone)  # type: ignore[union-attr]
    if not context.main:
        (folder,) = _broadcast([None])
        if folder is not None:
            dcp.save(state, checkpoint_id=Path(folder) / SHARDED)
        dist.barrier()
        return None if folder is None else directory
    sent = []

    def fill(tmp: Path) -> None:
        tmp.mkdir(exist_ok=True)
        sent.append(_broadcast([str(tmp)]))
        dcp.save(state, checkpoint_id=tmp / SHARDED)
        dist.barrier()
        records.write(tmp)
        (tmp / SPEC).write_text(spec_text, encoding="utf-8")

    try:
        return write_directory(directory, fill, owned=checkpoint.replaceable, what=checkpoint.WHAT)
    except BaseException:
        if not sent:  # refused before the shards were asked for: the others stop waiting
            _broadcast([None])
            dist.barrier()
        raise


def _broadcast(values: list[Any]) -> list[Any]:
    dist.broadcast_object_list(values, src=0)
    return values


def load(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, *, distributed: bool) -> dict:
    """Fill `model` (sharded or whole) and `optimizer` from the sharded checkpoint `directory`; returns the
    saved random-number generator states of the ranks. Every rank calls it when `distributed`."""
    from torch.distributed.checkpoint.api import CheckpointException

    folder = directory / SHARDED
    reader = SafeReader(folder)
    metadata = reader.read_metadata()
    state = _state(model, optimizer, prime=True)
    generator = torch.get_rng_state()  # a saved generator state has this one's shape and dtype, or is ignored
    rng = {name: torch.empty_like(generator) for name, meta in metadata.state_dict_metadata.items()
           if RNG.fullmatch(name) and tuple(meta.size) == tuple(generator.shape)
           and meta.properties.dtype == generator.dtype}  # fmt: skip
    state.update(rng)
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=reader, no_dist=not distributed)
    except CheckpointError:
        raise
    except CheckpointException as exc:  # a rank failed to read: its error quotes tracebacks and torch's advice
        first = next(iter(getattr(exc, "failures", {}).values()), None)
        kind = type(getattr(first, "exc", first)).__name__
        message = f"the sharded checkpoint does not fit this model: a shard cannot be read ({kind})"
        raise CheckpointError(Problem(message, Location(str(folder)), hint="it is corrupt or truncated")) from None
    except Exception as exc:  # DCP's message names what is missing or mis-shaped: keep that
        text = " ".join(str(exc).split())[:300]
        message = f"the sharded checkpoint does not fit this model: {type(exc).__name__}: {text}"
        hint = "it is corrupt, or of another spec"
        raise CheckpointError(Problem(message, Location(str(folder)), hint=hint)) from None
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
        _check_tensors(metadata.state_dict_metadata, where)
        _check_storage(metadata.storage_data, folder, where)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _sizes(value: object) -> bool:
    return isinstance(value, torch.Size) and all(type(d) is int and d >= 0 for d in value)


def _check_tensors(entries: object, where: Location) -> None:
    """Every entry a tensor's, with sizes, dtype and chunks of the right types (DCP trusts them)."""
    if not isinstance(entries, dict) or not all(isinstance(name, str) for name in entries):
        raise CheckpointError(Problem("the metadata's entries are not a mapping of names", where))
    for name, meta in entries.items():
        if not isinstance(meta, dcp_metadata.TensorStorageMetadata):
            raise CheckpointError(Problem(f"{name} is a pickled object; a checkpoint holds tensors only", where))
        properties, chunks = meta.properties, meta.chunks
        well_formed = (
            _sizes(meta.size)
            and isinstance(properties, dcp_metadata.TensorProperties)
            and isinstance(properties.dtype, torch.dtype)
            and isinstance(chunks, list)
            and all(isinstance(c, dcp_metadata.ChunkStorageMetadata) and _sizes(c.offsets) and _sizes(c.sizes)
                    for c in chunks)
        )  # fmt: skip
        if not well_formed:
            raise CheckpointError(Problem(f"the metadata of {name} is not a tensor's", where))


def _check_storage(storage: object, folder: Path, where: Location) -> None:
    """Every read in a shard file of the checkpoint, within the file, as it was written (no transforms)."""
    if not isinstance(storage, dict):
        raise CheckpointError(Problem("the metadata's storage is not a mapping", where))
    for info in storage.values():
        name = getattr(info, "relative_path", None)
        shard = folder / name if isinstance(name, str) else folder
        if not isinstance(name, str) or not SHARD_FILE.fullmatch(name) or not shard.is_file() or shard.is_symlink():
            raise CheckpointError(Problem("the metadata names a shard file that is not the checkpoint's", where))
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if type(offset) is not int or type(length) is not int or not 0 <= offset <= offset + length:
            raise CheckpointError(Problem(f"the metadata's byte range in {name} is not a range", where))
        if offset + length > shard.stat().st_size:
            raise CheckpointError(Problem(f"the metadata reads beyond the end of {name}", where))
        if getattr(info, "transform_descriptors", None):  # blockgraph never writes compressed shards
            raise CheckpointError(Problem(f"the metadata transforms what it reads from {name}", where))


_DCP_CLASSES = {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING"}  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata records and nothing else: any other class or function is refused."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = (
            (module == "torch.distributed.checkpoint.metadata" and name in _DCP_CLASSES)
            or (module == "torch.distributed.checkpoint.filesystem" and name == "_StorageInfo")
            or (module == "torch" and (name == "Size" or isinstance(vars(torch).get(name), torch.dtype)))
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
    from blockgraph.trainer import schedule

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
        for name in (RECORD, *(f"{TOKENIZER}/{n}" for n in TOKENIZER_FILES))
        if (saved.path / name).is_file()
    }
    records = checkpoint.Records(info, saved.src_vocab, saved.tgt_vocab, saved.labels, carried or None)
    tensors = {**checkpoint.optimizer_state(optimizer), **rng}
    return checkpoint.save(out, model=saved.model, records=records, tensors=tensors)
