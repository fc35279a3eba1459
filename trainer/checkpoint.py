"""Training checkpoints: one directory, written atomically, that `--resume` continues from exactly.

    RUN/checkpoint/
      model/              the model as builder.persist saves it (model.safetensors, spec.yaml, blockgraph.json)
      vocab.json          the source and target vocabularies (tokens in id order, tokenizer); a classifier's
                          labels in class order
      trainer.json        training options, input roles, epoch, batch within the epoch, optimizer step,
                          metrics history, the optimizer's hyper-parameters (and 16-mixed's loss scale)
      state.safetensors   Adam's moment estimates and step counts, each rank's random-number generator states

The weights and Adam's state are float32 whatever the run's `--precision` (a mixed precision casts the forward
only), so a run resumes under any precision.

A fine-tuned imported model's checkpoint has the import's pretrained.json and tokenizer/ (trainer.pretrained)
instead of vocab.json, so that it reads as an imported model too.

Everything is written to a temporary sibling directory that is swapped into place once complete (common.atomic),
so an interrupted write (Ctrl-C, a crash, a full disk) leaves the previous checkpoint as it was. Loading
unpickles nothing and runs nothing: every JSON file is checked field by field, and a user tokenizer
(MODULE:FUNCTION) the run was trained with is imported only when `--tokenizer` names it again.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from blockgraph.builder import persist
from blockgraph.builder.model import GraphModel
from blockgraph.common.atomic import owned_directory, write_directory
from blockgraph.common.errors import CheckpointError, DataError, Location, Problem, SpecError, UsageError
from blockgraph.common.files import FileKind, MiB
from blockgraph.common.records import read_record
from blockgraph.common.tensorfile import read_header, write_safetensors
from blockgraph.trainer import subword
from blockgraph.trainer.roles import ROLE_NAMES, Roles, find_roles
from blockgraph.trainer.text import RECORD, TOKENIZER, tokenizer_folder
from blockgraph.trainer.vocab import Vocab, resolve_tokenizer

FORMAT = "blockgraph-checkpoint"
FORMAT_VERSION = 1
NAME = "checkpoint"
TRAINER = "trainer.json"
STATE = "state.safetensors"
VOCAB = "vocab.json"
MODEL = "model"
SHARDED, SHARDED_SPEC = "sharded", "spec.yaml"  # a sharded checkpoint's DCP folder and spec (trainer.sharded)
METADATA = ".metadata"  # in SHARDED, with one shard file per rank and storage (DCP's names)
SHARD_FILE = re.compile(r"__\d{1,6}_\d{1,6}\.distcp")
WHAT = "training checkpoint"
TRAINER_FILE = FileKind("checkpoint's trainer.json", CheckpointError, limit=64 * MiB)
VOCAB_FILE = FileKind("checkpoint's vocab.json", CheckpointError, limit=64 * MiB)


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow")


class AdamGroup(_Record):
    """A saved parameter group: which parameters (by index) and Adam's hyper-parameters at the save, for the
    reader; a resumed run takes its hyper-parameters from the schedule, not from the file."""

    params: list[int] = Field(min_length=1)
    lr: float = Field(ge=0, allow_inf_nan=False)
    betas: tuple[float, float]
    eps: float = Field(gt=0, allow_inf_nan=False)


class OptimizerRecord(_Record):
    param_groups: list[AdamGroup] = Field(min_length=1)


class ScalerRecord(BaseModel):
    """16-mixed's gradient scaler at the save: the loss scale and the steps since it last changed, so that a
    resumed run scales its loss as the uninterrupted run would."""

    model_config = ConfigDict(extra="forbid")

    scale: float = Field(gt=0, allow_inf_nan=False)
    growth_tracker: int = Field(strict=True, ge=0)


class TrainerRecord(_Record):
    """What `trainer.json` must hold (see the module docstring)."""

    format: Literal["blockgraph-checkpoint"]
    format_version: int = Field(strict=True, ge=1)
    config: dict[str, Any]
    roles: Roles
    epoch: int = Field(strict=True, ge=0)
    batch: int = Field(strict=True, ge=0)
    step: int = Field(strict=True, ge=0)
    world: int = Field(1, strict=True, ge=1)
    d_model: int = Field(strict=True, gt=0)
    history: list[dict[str, Any]] = Field(default_factory=list)
    optimizer: OptimizerRecord
    grad_scaler: ScalerRecord | None = None  # a run of --precision 16-mixed


#: FSDP's `dtype` of checkpoints from before --precision, as a precision
_LEGACY_DTYPES = {"float32": "32", "bfloat16": "bf16-mixed"}


def current_config(config: dict[str, Any]) -> dict[str, Any]:
    """A saved run's options as this blockgraph names them: an older checkpoint's `dtype` is its precision."""
    if "dtype" not in config:
        return config
    legacy = config["dtype"]
    rest = {name: value for name, value in config.items() if name != "dtype"}
    return {"precision": _LEGACY_DTYPES.get(legacy, legacy) if isinstance(legacy, str) else legacy, **rest}


class VocabRecord(BaseModel):
    tokenizer: str
    tokens: list[str] = Field(min_length=4)
    subword: str | None = None  # a SentencePiece tokenizer's model, base64


class VocabsRecord(_Record):
    src: VocabRecord | None = None
    tgt: VocabRecord
    labels: list[str] | None = None


@dataclass
class Checkpoint:
    """A loaded checkpoint: the rebuilt model and everything needed to go on training or to decode."""

    path: Path
    model: GraphModel
    src_vocab: Vocab | None
    tgt_vocab: Vocab | None  # None: a fine-tuned imported model, whose tokenizer reads its text
    info: dict[str, Any]  # trainer.json, checked
    tensors: dict[str, torch.Tensor]  # state.safetensors
    labels: list[str] | None = None  # a classifier's classes in index order
    sharded: bool = False  # the weights and optimizer state are in sharded/, still to load (trainer.sharded)


ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")  # per parameter, all three or none (no gradient yet)


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Adam's per-parameter state as tensors (for safetensors)."""
    return {
        f"optimizer.{pid}.{key}": torch.as_tensor(value).detach().cpu().contiguous()
        for pid, entries in optimizer.state_dict()["state"].items()
        for key, value in entries.items()
    }


def optimizer_groups(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's parameter groups (for trainer.json): which parameters, and the hyper-parameters."""
    return {"param_groups": optimizer.state_dict()["param_groups"]}


def restore_optimizer(
    optimizer: torch.optim.Optimizer, meta: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path
) -> None:
    """Load the saved moments and step counts into `optimizer`, after checking they are Adam's, for this
    model's parameters, each parameter's complete; the hyper-parameters stay the optimizer's own."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    groups = meta["param_groups"]
    where = Location(str(path / TRAINER))
    listed = [pid for group in groups for pid in group["params"]]
    if len(groups) != len(optimizer.param_groups) or listed != list(range(len(params))):
        raise CheckpointError(
            Problem(
                "field optimizer.param_groups does not list this model's parameters once each, in order",
                where,
                hint="the checkpoint is corrupt, or from another spec",
            )
        )
    state: dict[int, dict[str, Any]] = {}
    wrong = []
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, pid, key = (*name.split(".", 2), "", "")[:3]
            index = int(pid) if pid.isdigit() and len(pid) < 10 else -1
            expected = () if key == "step" else (params[index].shape if 0 <= index < len(params) else None)
            if key not in ADAM_STATE or expected is None or not value.is_floating_point() or value.shape != expected:
                wrong.append(name)
            else:
                state.setdefault(index, {})[key] = value
    wrong += [f"optimizer.{pid}.*" for pid, entries in sorted(state.items()) if len(entries) != len(ADAM_STATE)]
    if wrong:
        raise CheckpointError(
            Problem(
                f"{len(wrong)} optimizer tensor(s) are not Adam's state of this model's parameters: "
                + ", ".join(wrong[:5]),
                Location(str(path / STATE)),
                hint="the checkpoint is corrupt, or from another spec",
            )
        )
    try:
        optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        message = f"field optimizer: cannot restore the optimizer ({type(exc).__name__})"
        raise CheckpointError(Problem(message, where)) from None


def is_checkpoint(path: Path) -> bool:
    return (path / TRAINER).is_file()


def replaceable(path: Path) -> bool:
    """A directory `save` may replace: a checkpoint and nothing else (no file of the user's would be lost)."""
    rules = {MODEL: persist.replaceable, TOKENIZER: tokenizer_folder, SHARDED: _shards_only}
    return owned_directory(path, TRAINER, {VOCAB, TRAINER, STATE, RECORD, SHARDED_SPEC}, rules)


def _shards_only(path: Path) -> bool:
    """A sharded checkpoint's DCP folder: its metadata and shard files, nothing else."""
    try:
        return all(
            entry.is_file(follow_symlinks=False) and (entry.name == METADATA or SHARD_FILE.fullmatch(entry.name))
            for entry in os.scandir(path)
        )
    except OSError:
        return False


@dataclass(frozen=True)
class Records:
    """What a checkpoint holds besides its tensors: the run's record (trainer.json) and what reads its text
    (the vocabularies and a classifier's labels, or an imported model's carried record and tokenizer files,
    relative path → bytes)."""

    info: dict[str, Any]
    src_vocab: Vocab | None
    tgt_vocab: Vocab | None
    labels: list[str] | None = None
    carried: dict[str, bytes] | None = None

    def write(self, folder: Path) -> None:
        if self.tgt_vocab is not None:
            vocabs: dict[str, Any] = {"src": self.src_vocab.to_json() if self.src_vocab else None}
            vocabs["tgt"] = self.tgt_vocab.to_json()
            if self.labels is not None:
                vocabs["labels"] = list(self.labels)
            _write_json(folder / VOCAB, vocabs)
        for name, data in (self.carried or {}).items():
            (folder / name).parent.mkdir(exist_ok=True)
            (folder / name).write_bytes(data)
        _write_json(folder / TRAINER, {"format": FORMAT, "format_version": FORMAT_VERSION, **self.info})


def save(directory: str | Path, *, model: nn.Module, records: Records, tensors: dict[str, torch.Tensor]) -> Path:
    """Write a checkpoint directory atomically (replacing an older checkpoint there only once the new one is
    whole): the model, its records, and the optimizer's and generators' `tensors`."""
    directory = Path(directory)
    rng = torch.get_rng_state()  # building the structure check must not disturb training's random numbers
    try:
        write_model = persist.model_files(model, Location(str(directory)))
    finally:
        torch.set_rng_state(rng)
    state = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}

    def write(folder: Path) -> None:
        write_model(folder / MODEL)
        records.write(folder)
        write_safetensors(folder / STATE, state)

    return write_directory(directory, write, owned=replaceable, what=WHAT)


def find(path: Path) -> Path | None:
    """The checkpoint directory `path` itself, or the one in the run directory `path` (`--out` of train)."""
    return next((p for p in (path, path / NAME) if is_checkpoint(p)), None)


def is_sharded(directory: Path) -> bool:
    """Whether the checkpoint `directory` holds shards (--strategy fsdp) instead of a whole model."""
    return not (directory / MODEL).exists() and (directory / SHARDED).is_dir()


def consolidate_first(given: str | Path, directory: Path) -> CheckpointError:
    """What refuses a sharded checkpoint where the whole model is needed: the command that gathers it."""
    return CheckpointError(
        Problem(
            "this checkpoint is sharded (--strategy fsdp): its weights are spread over shard files",
            Location(str(directory)),
            hint=f"consolidate it first: blockgraph consolidate {given} --out DIR, then give DIR",
        )
    )


def locate(path: str | Path) -> Path:
    """A checkpoint directory from itself or from the run directory holding it (`--out` of train)."""
    path = Path(path)
    found = find(path)
    if found is not None:
        return found
    if not path.exists():
        raise CheckpointError(Problem(f"checkpoint {path} does not exist", Location(str(path))))
    raise CheckpointError(
        Problem(
            f"{path} is not a training checkpoint (no {TRAINER})",
            Location(str(path)),
            hint="give the --out directory of `blockgraph train`, or its checkpoint/ directory",
        )
    )


def load(
    path: str | Path,
    device: str | torch.device = "cpu",
    *,
    tokenizers: tuple[str | None, str | None] = (None, None),
    plugins: tuple[str, ...] = (),
    sharded_ok: bool = False,
) -> Checkpoint:
    """Read a checkpoint; nothing in it is run. A user tokenizer it was trained with (MODULE:FUNCTION) is used
    only when this call names it again in `tokenizers` (source, target), as `--tokenizer` does. A sharded
    checkpoint's weights are still to load (trainer.sharded): only `sharded_ok` callers take one."""
    directory = locate(path)
    sharded = is_sharded(directory)
    if sharded and not sharded_ok:
        raise consolidate_first(path, directory)
    record = read_record(directory / TRAINER, TrainerRecord, TRAINER_FILE)
    where = Location(str(directory / TRAINER))
    if record.format_version > FORMAT_VERSION:
        raise CheckpointError(
            Problem(f"checkpoint format {record.format_version} is newer than this blockgraph", where)
        )
    src = tgt = labels = None
    if not (directory / RECORD).is_file() or (directory / VOCAB).exists():  # else: trainer.pretrained reads it
        vocabs = read_record(directory / VOCAB, VocabsRecord, VOCAB_FILE)
        vocab_where = Location(str(directory / VOCAB))
        src = _vocab(vocabs.src, tokenizers[0], vocab_where, "src") if vocabs.src is not None else None
        tgt = _vocab(vocabs.tgt, tokenizers[1], vocab_where, "tgt")
        labels = vocabs.labels
    rng = torch.get_rng_state()
    try:
        if sharded:
            model = persist.rebuild(directory / SHARDED_SPEC, device, plugins=plugins)
        else:
            model = persist.load(directory / MODEL, device=device, plugins=plugins)
    finally:
        torch.set_rng_state(rng)  # rebuilding initialises weights it then overwrites; keep the caller's stream
    _check_roles(record.roles, model, where)
    tensors = _state_tensors(directory / STATE) if (directory / STATE).exists() else {}
    info = record.model_dump()
    return Checkpoint(directory, model, src, tgt, info, tensors, labels, sharded)


def _check_roles(roles: Roles, model: GraphModel, where: Location) -> None:
    """The saved roles must be what the saved spec's inputs and output give for them."""
    typed = model.typed_graph
    given = {name: getattr(roles, name) for name in ROLE_NAMES if getattr(roles, name) is not None}
    try:
        found = find_roles(typed.graph, given, typed.types)
    except (SpecError, UsageError) as exc:
        raise CheckpointError([Problem(f"field roles: {p.message}", where) for p in exc.problems]) from None
    if found != roles:
        raise CheckpointError(
            Problem("field roles does not match the checkpoint's spec", where, hint="the checkpoint is corrupt")
        )


def _vocab(record: VocabRecord, given: str | None, where: Location, side: str) -> Vocab:
    if record.subword is not None:  # the model this side was trained with, named by its content
        try:
            kind = subword.register(subword.deserialized(record.subword), f"field {side}.subword")
        except DataError as exc:
            raise CheckpointError([Problem(p.message, where) for p in exc.problems]) from None
        if kind != record.tokenizer:
            raise CheckpointError(Problem(f"field {side}.subword is not the model {side}.tokenizer names", where))
    tokenizer = resolve_tokenizer(record.tokenizer, given, where, f"{side}.tokenizer")
    try:
        return Vocab(record.tokens, tokenizer)
    except ValueError as exc:
        raise CheckpointError(Problem(f"checkpoint's vocab.json: field {side}.tokens: {exc}", where)) from None


def _state_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    read_header(str(path), "checkpoint's state.safetensors")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(Problem(f"cannot read {path}: {type(exc).__name__}", Location(str(path)))) from None


def _write_json(path: Path, data: Any) -> None:
    with path.open("w", encoding="utf-8") as handle:
        json.dump(data, handle, ensure_ascii=False, indent=1)
        handle.write("\n")
