"""Training checkpoints: one directory, written atomically, that `--resume` continues from exactly.

    RUN/checkpoint/
      model/              the model as builder.persist saves it (model.safetensors, spec.yaml, blockgraph.json)
      vocab.json          the source and target vocabularies (tokens in id order, tokenizer); a classifier's
                          labels in class order
      trainer.json        training options, input roles, epoch, batch within the epoch, optimizer step,
                          metrics history, the optimizer's hyper-parameters
      state.safetensors   Adam's moment estimates and step counts, each rank's random-number generator states

Everything is written to a temporary sibling directory that is renamed into place once complete, so an
interrupted write (Ctrl-C, a crash) leaves the previous checkpoint as it was. Nothing is unpickled on load.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from builder.errors import Location, Problem, SpecError
from builder.validate import ValidSpec
from trainer.vocab import Vocab

FORMAT = "blockgraph-checkpoint"
FORMAT_VERSION = 1
NAME = "checkpoint"
TRAINER = "trainer.json"
STATE = "state.safetensors"
VOCAB = "vocab.json"
MODEL = "model"


@dataclass
class Checkpoint:
    """A loaded checkpoint: the rebuilt model and everything needed to go on training or to decode."""

    path: Path
    model: nn.Module
    src_vocab: Vocab | None
    tgt_vocab: Vocab
    info: dict[str, Any]  # trainer.json
    tensors: dict[str, torch.Tensor]  # state.safetensors
    labels: list[str] | None = None  # a classifier's classes in index order

    @property
    def valid_spec(self) -> ValidSpec:
        return self.model.typed_graph.graph.valid  # type: ignore[union-attr]


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer's state_dict split into tensors (for safetensors) and the rest (for JSON)."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for pid, entries in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(entries)
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save(
    directory: str | Path,
    *,
    model: nn.Module,
    valid_spec: ValidSpec,
    src_vocab: Vocab | None,
    tgt_vocab: Vocab,
    info: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    labels: list[str] | None = None,
) -> Path:
    """Write a checkpoint directory atomically (replacing an older checkpoint there only once the new one is whole)."""
    from builder import persist

    directory = Path(directory)
    if directory.exists() and not (directory / TRAINER).is_file():
        raise SpecError(
            Problem(
                f"{directory} exists and is not a checkpoint", Location(str(directory)), hint="choose another --out"
            )
        )
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    rng = torch.get_rng_state()  # building the structure check must not disturb training's random numbers
    try:
        persist.save(model, tmp / MODEL, valid_spec)
        vocabs = {"src": src_vocab.to_json() if src_vocab else None, "tgt": tgt_vocab.to_json()}
        if labels is not None:
            vocabs["labels"] = list(labels)
        _write_json(tmp / VOCAB, vocabs)
        _write_json(tmp / TRAINER, {"format": FORMAT, "format_version": FORMAT_VERSION, **info})
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / STATE))
        with (tmp / STATE).open("rb") as handle:
            os.fsync(handle.fileno())
        _replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_rng_state(rng)
    return directory


def locate(path: str | Path) -> Path:
    """A checkpoint directory from itself or from the run directory holding it (`--out` of train)."""
    path = Path(path)
    if (path / TRAINER).is_file():
        return path
    if (path / NAME / TRAINER).is_file():
        return path / NAME
    if (path / f".{NAME}.old" / TRAINER).is_file():  # interrupted between the two renames of _replace
        return path / f".{NAME}.old"
    if not path.exists():
        raise SpecError(Problem(f"checkpoint {path} does not exist", Location(str(path))))
    raise SpecError(
        Problem(
            f"{path} is not a training checkpoint (no {TRAINER})",
            Location(str(path)),
            hint="give the --out directory of `blockgraph train`, or its checkpoint/ directory",
        )
    )


def load(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    from safetensors.torch import load_file

    from builder import persist

    directory = locate(path)
    where = Location(str(directory / TRAINER))
    try:
        info = json.loads((directory / TRAINER).read_text(encoding="utf-8"))
        vocabs = json.loads((directory / VOCAB).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpecError(Problem(f"cannot read the checkpoint: {exc}", where)) from exc
    if info.get("format") != FORMAT or not isinstance(info.get("format_version"), int):
        raise SpecError(Problem(f"{TRAINER} is not a blockgraph training checkpoint", where))
    if info["format_version"] > FORMAT_VERSION:
        raise SpecError(Problem(f"checkpoint format {info['format_version']} is newer than this blockgraph", where))
    rng = torch.get_rng_state()
    try:
        model = persist.load(directory / MODEL, device=device)
    finally:
        torch.set_rng_state(rng)  # rebuilding initialises weights it then overwrites; keep the caller's stream
    tensors = load_file(str(directory / STATE)) if (directory / STATE).is_file() else {}
    src = Vocab.from_json(vocabs["src"]) if vocabs.get("src") else None
    labels = vocabs.get("labels")
    return Checkpoint(directory, model, src, Vocab.from_json(vocabs["tgt"]), info, tensors, labels)


def _write_json(path: Path, data: Any) -> None:
    with path.open("w", encoding="utf-8") as handle:
        json.dump(data, handle, ensure_ascii=False, indent=1)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


def _replace(tmp: Path, directory: Path) -> None:
    """Rename `tmp` to `directory`; an old checkpoint there is moved aside first and removed only afterwards."""
    if not directory.exists():
        os.replace(tmp, directory)
        return
    old = directory.with_name(f".{directory.name}.old")
    if old.exists():
        shutil.rmtree(old)
    os.replace(directory, old)
    try:
        os.replace(tmp, directory)
    except BaseException:
        os.replace(old, directory)
        raise
    shutil.rmtree(old, ignore_errors=True)
