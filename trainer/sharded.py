"""Models bigger than one process: FSDP2 (`torch.distributed.fsdp.fully_shard`) and sharded checkpoints.

`train --strategy fsdp` shards every parameter over the processes of a one-dimensional device mesh: each copy
of a `repeat:` stack (the spec's layers, which the compiled model holds in a ModuleList) is a unit, then the
root takes what is left (embeddings, final norm, generator). A unit's parameters are gathered for its forward
and backward and freed after; gradients are reduce-scattered (averaged, as DDP's all-reduce does, so the
trainer's loss scaling gives the one-process gradient), and Adam keeps its moments of the local shard only.
A mixed `--precision` (bf16-mixed, 16-mixed) casts each unit's parameters to bfloat16 or float16 for its forward
and backward, with float32 gradient reduction and float32 outputs at the root (MixedPrecisionPolicy: FSDP's
own casts, in place of the autocast of one process or DDP; 16-mixed adds the trainer's gradient scaler, whose
overflow check DTensor gradients reduce over the mesh); `--checkpoint-activations` recomputes each unit's
activations in the backward pass.

Checkpoints are written with `torch.distributed.checkpoint` (DCP): every rank writes its shards into
`checkpoint/sharded/`, rank 0 the metadata, the standalone `spec.yaml` and the records of an ordinary
checkpoint (trainer.json, vocab.json), all into a temporary directory swapped into place once whole (as
common.atomic does for one process). DCP reshards on load, so a run resumes on any number of processes, one
included. `blockgraph consolidate` turns such a checkpoint into an ordinary one (safetensors) for
`translate`, `export` and `inspect`.

A DCP checkpoint's metadata is a pickle. It is read here as data: the unpickler hands the pickle stand-ins
for the classes and functions it may name (DCP's records, torch sizes and dtypes, and what DCP pickles beside
them), never the real ones, and only a stand-in for one of DCP's records takes state, so that nothing in the
file can reach a class, a function or a module (replace `Path.is_symlink`, say). DCP's metadata is then made from
what the pickle described, each field checked first (`_Records`): tensors only (no pickled objects), each chunk
once and within its tensor, one byte range per chunk in a shard file of the checkpoint (named as DCP names them,
a regular file by lstat), ranges that do not overlap and lie within their file. So the work of a load is the
model's and the shard files', whatever the metadata claims. The tensors themselves are read by
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import io
import itertools
import math
import os
import pickle
import re
import stat
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

from blockgraph.builder.model import GraphModel
from blockgraph.builder.source import dump_yaml
from blockgraph.common.atomic import check_directory_target, write_directory
from blockgraph.common.errors import CheckpointError, Location, Problem, UsageError
from blockgraph.common.files import FileKind, MiB, read_bytes
from blockgraph.trainer import checkpoint, distributed, fits
from blockgraph.trainer.checkpoint import METADATA, SHARD_FILE, SHARDED
from blockgraph.trainer.checkpoint import SHARDED_SPEC as SPEC
from blockgraph.trainer.config import TrainConfig
from blockgraph.trainer.distributed import Context
from blockgraph.trainer.text import RECORD, TOKENIZER, TOKENIZER_FILES

RNG = re.compile(r"rng\.(cpu|cuda)\.\d{1,6}")  # the generator states a checkpoint may hold (distributed.gather_rng)
METADATA_FILE = FileKind("sharded checkpoint's .metadata", CheckpointError, limit=256 * MiB)


def check(config: TrainConfig) -> None:
    """The FSDP options apply to --strategy fsdp only."""
    if config.strategy != "fsdp" and config.checkpoint_activations:
        raise UsageError(Problem("--checkpoint-activations applies to --strategy fsdp", hint="add --strategy fsdp"))


def shard(model: nn.Module, config: TrainConfig, context: Context) -> None:
    """Shard `model` in place over the processes: each repeated layer a unit (innermost first), then the root."""
    from torch.distributed._composable import checkpoint as recompute
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not context.distributed:
        distributed.single_group(context)
    mesh = init_device_mesh(context.device.type, (context.world,))
    policy, root = MixedPrecisionPolicy(), MixedPrecisionPolicy()
    compute = config.compute_dtype
    if compute is not None:  # the loss is computed from float32 outputs
        policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
        root = MixedPrecisionPolicy(compute, torch.float32, output_dtype=torch.float32)
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
    model: GraphModel,
    optimizer: torch.optim.Optimizer,
    records: checkpoint.Records,
    rng: dict[str, torch.Tensor],
    context: Context,
) -> Path | None:
    """Every rank: write the sharded checkpoint `directory` (see the module notes); its path, or None on the
    ranks whose rank 0 could not write it (rank 0 raises the error)."""
    state = {**_state(model, optimizer), **rng}
    spec_text = dump_yaml(model.typed_graph.graph.standalone)
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
           if RNG.fullmatch(name) and isinstance(meta, dcp_metadata.TensorStorageMetadata)
           and tuple(meta.size) == tuple(generator.shape)
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
            described = _MetadataUnpickler(io.BytesIO(data)).load()
        except CheckpointError:
            raise
        except Exception:  # a truncated or foreign pickle; an object given state twice, or where it takes none
            described = None
        return _Records(folder, where).metadata(described, self.load_id)


class _Refused(Exception):
    """What the pickle asked for is not what DCP's metadata does: the file is not such metadata."""


class _Record:
    """One of DCP's records as the pickle describes it: the state BUILD gives it, once, kept as data. Only such an
    instance takes state: the classes and functions the pickle may name are never the real ones (`_Call`)."""

    __slots__ = ("state",)
    kind = ""

    def __setstate__(self, state: object) -> None:
        if hasattr(self, "state"):
            raise _Refused("state given twice")
        self.state = state


_RECORDS = {
    (module, name): type(name, (_Record,), {"__slots__": (), "kind": name})
    for module, names in (
        ("torch.distributed.checkpoint.metadata", ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                                   "TensorStorageMetadata", "ChunkStorageMetadata",
                                                   "BytesStorageMetadata")),
        ("torch.distributed.checkpoint.filesystem", ("_StorageInfo",)),
    )
    for name in names
}  # fmt: skip
_PATHS = ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")  # a checkpoint_id, never used
_CALLS = {
    ("torch", "Size"): "Size",
    ("torch.serialization", "_get_layout"): "layout",
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"): "memory format",
    **{("pathlib", name): "path" for name in _PATHS},
}


class _Call:
    """A value the pickle asks torch or pathlib for (a size, a dtype, a layout, a path), kept as its name and
    arguments and made only once checked (`_Records`); called (REDUCE), it records the call. It takes no state."""

    __slots__ = ("args", "name")

    def __init__(self, name: str, args: tuple[object, ...] | None = None):
        self.name, self.args = name, args  # args: None until called

    def __call__(self, *args: object) -> _Call:
        if self.args is not None:
            raise _Refused(f"a {self.name} called")
        return _Call(self.name, args)

    def __setstate__(self, state: object) -> None:
        raise _Refused(f"state given to {self.name}")


class _MetadataUnpickler(pickle.Unpickler):
    """Reads DCP's metadata as data: the records it names become `_Record`s, the torch and pathlib values it
    names `_Call`s; any other class or function is refused, and nothing the pickle does reaches a real class,
    function or module (BUILD gives state to records only)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _RECORDS:
            return _RECORDS[module, name]
        if (module, name) in _CALLS:
            return _Call(_CALLS[module, name])
        if module == "torch" and isinstance(vars(torch).get(name), torch.dtype):  # vars: no lazy import of torch.*
            return _Call("dtype", (name,))
        raise CheckpointError(
            Problem(f"the sharded checkpoint's metadata names {module}.{name}, which is not DCP's metadata")
        )


class _Records:
    """DCP's metadata made from what the pickle described, each field checked before it is made: tensors only,
    each chunk once and within its tensor, every chunk with one byte range in a shard file of the checkpoint,
    ranges that do not overlap and lie within their files, read as written (no transforms)."""

    def __init__(self, folder: Path, where: Location):
        self.folder, self.where = folder, where
        self.sizes: dict[str, int] = {}  # shard file → its size, from lstat

    def fail(self, message: str) -> CheckpointError:
        return CheckpointError(Problem(message, self.where))

    def metadata(self, described: object, load_id: str | None) -> dcp_metadata.Metadata:
        fields = _given(described, "Metadata")
        if fields is None or not isinstance(fields, dict) or "state_dict_metadata" not in fields:
            raise self.fail("not a sharded checkpoint's metadata")
        entries = self.entries(fields["state_dict_metadata"])
        storage = self.storage(fields.get("storage_data"), entries)
        planner = fields.get("planner_data")
        planner_ok = isinstance(planner, dict) and all(
            isinstance(k, str) and isinstance(v, tuple) and all(type(p) in (str, int) for p in v)
            for k, v in planner.items()
        )
        version = fields.get("version")
        tensors: dict[str, dcp_metadata.STORAGE_TYPES] = dict(entries)
        return dcp_metadata.Metadata(
            tensors,
            planner_data=planner if planner_ok else None,
            storage_data=storage,
            storage_meta=dcp_metadata.StorageMeta(load_id=load_id),  # nothing of the file's: DCP needs only this
            version=version if isinstance(version, str) else None,
        )

    def entries(self, described: object) -> dict[str, dcp_metadata.TensorStorageMetadata]:
        if not isinstance(described, dict) or not all(type(name) is str for name in described):
            raise self.fail("the metadata's entries are not a mapping of names")
        return {name: self.tensor(name, meta) for name, meta in described.items()}

    def tensor(self, name: str, described: object) -> dcp_metadata.TensorStorageMetadata:
        """A tensor's entry: its dtype, size and chunks (DCP trusts them)."""
        if isinstance(described, _Record) and described.kind == "BytesStorageMetadata":
            raise self.fail(f"{name} is a pickled object; a checkpoint holds tensors only")
        fields = _given(described, "TensorStorageMetadata")
        properties = _given(fields.get("properties"), "TensorProperties") if isinstance(fields, dict) else None
        if isinstance(properties, dict):  # as older torch wrote them
            properties = (properties.get("dtype"),)
        dtype = _made(properties[0]) if isinstance(properties, tuple) and properties else None
        size = _made(fields.get("size")) if isinstance(fields, dict) else None
        chunks = fields.get("chunks") if isinstance(fields, dict) else None
        if not isinstance(dtype, torch.dtype) or not isinstance(size, torch.Size) or not isinstance(chunks, list):
            raise self.fail(f"the metadata of {name} is not a tensor's")
        made, seen, volume = [], set(), 0
        for chunk in chunks:
            part = _given(chunk, "ChunkStorageMetadata")
            offsets, sizes = (
                (_made(part.get(k)) for k in ("offsets", "sizes")) if isinstance(part, dict) else (None, None)
            )
            if not (isinstance(offsets, torch.Size) and isinstance(sizes, torch.Size)) or not _inside(
                offsets, sizes, size
            ):
                raise self.fail(f"the metadata of {name} is not a tensor's")
            if not math.prod(sizes):  # an empty shard (DCP lists one per rank that holds none): nothing to read
                continue
            if offsets in seen:
                raise self.fail(f"the metadata lists a chunk of {name} twice")
            seen.add(offsets)
            volume += math.prod(sizes)
            if volume > math.prod(size):
                raise self.fail(f"the chunks of {name} hold more than the tensor")
            made.append(dcp_metadata.ChunkStorageMetadata(offsets, sizes))
        return dcp_metadata.TensorStorageMetadata(dcp_metadata.TensorProperties(dtype=dtype), size, made)

    def storage(
        self, described: object, entries: dict[str, dcp_metadata.TensorStorageMetadata]
    ) -> dict[dcp_metadata.MetadataIndex, Any]:
        """Where each chunk's bytes are: one range per chunk, in a shard file of the checkpoint (module notes).
        An entry of no chunk that holds data (an empty shard's) is left out: it is never read."""
        from torch.distributed.checkpoint.filesystem import _StorageInfo

        if not isinstance(described, dict):
            raise self.fail("the metadata's storage is not a mapping")
        wanted = {(name, c.offsets) for name, meta in entries.items() for c in meta.chunks}
        made: dict[dcp_metadata.MetadataIndex, Any] = {}
        ranges: dict[str, list[tuple[int, int]]] = {}
        for key, value in described.items():
            index = _given(key, "MetadataIndex")
            fqn, offset = (index.get("fqn"), _made(index.get("offset"))) if isinstance(index, dict) else (None, None)
            if not isinstance(fqn, str) or (fqn, offset) not in wanted:
                continue
            place = dcp_metadata.MetadataIndex(fqn, offset)  # its index, a hint for a search, is not the file's
            if place in made:
                raise self.fail(f"the metadata's storage lists the bytes of a chunk of {fqn} twice")
            name, start, length = self.read(_given(value, "_StorageInfo"))
            ranges.setdefault(name, []).append((start, start + length))
            made[place] = _StorageInfo(name, start, length)
        if len(made) < len(wanted):
            raise self.fail(f"the metadata's storage has no bytes for {len(wanted) - len(made)} chunk(s)")
        for name, spans in ranges.items():
            spans.sort()
            if any(end > start for (_, end), (start, _) in itertools.pairwise(spans)):
                raise self.fail(f"the metadata reads overlapping bytes of {name}")
        return made

    def read(self, info: object) -> tuple[str, int, int]:
        """One chunk's byte range, checked: a shard file of the checkpoint (from lstat: a regular file, not a
        link), within its size, read as written."""
        fields = info if isinstance(info, dict) else {}
        name, start, length = fields.get("relative_path"), fields.get("offset"), fields.get("length")
        if type(name) is not str or not SHARD_FILE.fullmatch(name) or self.size(name) is None:
            raise self.fail("the metadata names a shard file that is not the checkpoint's")
        if type(start) is not int or type(length) is not int or not 0 <= start <= start + length:
            raise self.fail(f"the metadata's byte range in {name} is not a range")
        if start + length > (self.size(name) or 0):
            raise self.fail(f"the metadata reads beyond the end of {name}")
        if fields.get("transform_descriptors"):  # blockgraph never writes compressed shards
            raise self.fail(f"the metadata transforms what it reads from {name}")
        return name, start, length

    def size(self, name: str) -> int | None:
        """The size of the regular file `name` in the folder (None for anything else), from one lstat."""
        if name not in self.sizes:
            try:
                info = os.lstat(os.path.join(self.folder, name))
            except OSError:
                return None
            if not stat.S_ISREG(info.st_mode):
                return None
            self.sizes[name] = info.st_size
        return self.sizes[name]


def _inside(offsets: torch.Size, sizes: torch.Size, size: torch.Size) -> bool:
    """A chunk at `offsets` of `sizes` lies within a tensor of `size`."""
    return len(offsets) == len(sizes) == len(size) and all(
        o + s <= d for o, s, d in zip(offsets, sizes, size, strict=True)
    )


def _given(described: object, kind: str) -> Any:
    """The state the pickle gave a record of `kind` (None for anything else)."""
    return getattr(described, "state", None) if isinstance(described, _Record) and described.kind == kind else None


def _made(described: object) -> Any:
    """The torch value a `_Call` stands for, made once its arguments are checked (None for anything else): a
    size of non-negative ints, a dtype torch has (the layout, memory format and path it names are not used)."""
    if not isinstance(described, _Call) or described.args is None:
        return None
    args = described.args
    if described.name == "Size":
        dims = args[0] if len(args) == 1 and isinstance(args[0], tuple) else None
        return torch.Size(dims) if dims is not None and all(type(d) is int and d >= 0 for d in dims) else None
    if described.name == "dtype":
        return vars(torch).get(str(args[0]))
    return None


def consolidate(path: str | Path, out: str | Path) -> Path:
    """Write the sharded checkpoint at `path` (a run directory or its checkpoint/) as an ordinary checkpoint at
    `out`: the whole model in safetensors, Adam's state, the records; it translates, exports and resumes (with
    DDP) as any checkpoint does."""
    from blockgraph.trainer import schedule

    out = Path(out)
    check_directory_target(out, owned=checkpoint.replaceable, what=checkpoint.WHAT)
    fits.check_checkpoint(path, Context(), action="consolidating the checkpoint")  # the whole model, in this process
    saved = checkpoint.load(path, sharded_ok=True)
    if not saved.sharded:
        raise UsageError(Problem(f"{saved.path} is an ordinary checkpoint already", hint="use it as it is"))
    optimizer = schedule.adam(saved.model)
    rng = load(saved.path, saved.model, optimizer, distributed=False)
    info = {k: v for k, v in saved.info.items() if k not in ("format", "format_version")}
    info["config"] = {**checkpoint.current_config(info["config"]), "strategy": "ddp", "checkpoint_activations": False}
    carried = {
        name: read_bytes(saved.path / name, checkpoint.VOCAB_FILE)
        for name in (RECORD, *(f"{TOKENIZER}/{n}" for n in TOKENIZER_FILES))
        if (saved.path / name).is_file()
    }
    records = checkpoint.Records(info, saved.src_vocab, saved.tgt_vocab, saved.labels, carried or None)
    tensors = {**checkpoint.optimizer_state(optimizer), **rng}
    return checkpoint.save(out, model=saved.model, records=records, tensors=tensors)
