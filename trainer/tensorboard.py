"""Training curves for TensorBoard: `train --tensorboard` writes RUN/tensorboard/ beside metrics.jsonl.

Each epoch's record (metrics.jsonl's line) becomes scalars at its optimizer step, grouped as TensorBoard draws
them (`train/loss`, `train/lr`, `train/grad_norm`, `valid/bleu`, ...), and the run's options become its hparams
(`--set d_model=64` as `overrides.d_model`), so that runs compare in TensorBoard's HParams tab. Only the main
process writes (rank 0 under ddp and fsdp: the records are already summed over the ranks).

A resumed run appends to the same directory. Its first event is TensorBoard's own purge mark at the step after
the checkpoint's, so what a stopped process logged after its last checkpoint (and the resumed run logs again)
is dropped by TensorBoard's reader: no step is drawn twice. The hparams are written once, by the run's first
writer: TensorBoard keeps the first it reads of a run (a resume's changes, such as a higher --epochs, are in the
checkpoint's trainer.json). A new run in the directory removes the event files of the one before, as it does
metrics.jsonl.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blockgraph.common.atomic import check_directory_target
from blockgraph.common.errors import Problem, UsageError
from blockgraph.trainer.config import TrainConfig

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

DIRECTORY = "tensorboard"
EVENTS = "events.out.tfevents."  # how TensorBoard names its event files
AXES = ("epoch", "step")  # a record's position, not a curve
INSTALL = "pip install 'blockgraph[tensorboard]' (or pip install tensorboard)"


def is_event_directory(path: Path) -> bool:
    """A directory of TensorBoard event files alone (a run's own, which a new run may empty)."""
    try:
        return all(entry.name.startswith(EVENTS) and entry.is_file(follow_symlinks=False) for entry in os.scandir(path))
    except OSError:
        return False


def check(config: TrainConfig, out: Path | None) -> None:
    """A run with --tensorboard has somewhere to write and the package to write with; every process checks, so
    that all stop alike before any waits for another."""
    if not config.tensorboard:
        return
    try:
        import tensorboard  # noqa: F401  # torch.utils.tensorboard writes through it
    except ImportError:
        raise UsageError(
            Problem("--tensorboard needs the tensorboard package, which is not installed", hint=INSTALL)
        ) from None
    if out is None:
        raise UsageError(Problem("--tensorboard writes into the run directory: give --out DIR"))


def clear(out: Path) -> None:
    """Remove the event files a run before left in `out` (a new run starts its curves afresh)."""
    directory = out / DIRECTORY
    if stat.S_ISDIR(_mode(directory)) and is_event_directory(directory):
        for entry in os.scandir(directory):
            os.unlink(entry.path)


def _mode(path: Path) -> int:
    try:
        return os.lstat(path).st_mode
    except FileNotFoundError:
        return 0


def tag(key: str) -> str:
    """metrics.jsonl's key as a TensorBoard tag, its group before the slash: train_loss → train/loss,
    bleu → valid/bleu, tokens_per_s → train/tokens_per_s."""
    group, _, name = key.partition("_")
    if group in ("train", "valid") and name:
        return f"{group}/{name}"
    return f"valid/{key}" if key in ("bleu", "chrf") else f"train/{key}"


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A record's curves: its numbers by tag, without the step and epoch that place them."""
    return {
        tag(key): float(value)
        for key, value in record.items()
        if key not in AXES and isinstance(value, int | float) and not isinstance(value, bool)
    }


def hparams(config: TrainConfig) -> dict[str, Any]:
    """The run's options as TensorBoard hparams: numbers, strings and booleans as they are, a mapping's entries
    one by one (`overrides.d_model`), anything else as JSON; unset options (None) left out."""
    flat: dict[str, Any] = {}
    for name, value in config.model_dump(mode="json").items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for key, item in items:
            label = name if key is None else f"{name}.{key}"
            if item is None:
                continue
            flat[label] = item if isinstance(item, int | float | str | bool) else json.dumps(item, sort_keys=True)
    return flat


class Board:
    """The run's TensorBoard writer (main process only)."""

    def __init__(self, writer: SummaryWriter, config: TrainConfig, described: bool) -> None:
        self.writer = writer
        self.config = config
        self.described = described  # the directory has the run's hparams already

    @classmethod
    def open(cls, config: TrainConfig, out: Path | None, *, main: bool, step: int, resumed: bool) -> Board | None:
        """The writer of a run with --tensorboard, on the main process (None elsewhere, and without the flag);
        a resumed run's purges what was logged after its checkpoint's `step`."""
        check(config, out)
        if not config.tensorboard or not main or out is None:
            return None
        from torch.utils.tensorboard import SummaryWriter

        directory = out / DIRECTORY
        check_directory_target(directory, owned=is_event_directory, what="TensorBoard log directory")
        described = resumed and directory.is_dir() and any(directory.iterdir())
        return cls(SummaryWriter(str(directory), purge_step=step + 1 if resumed else None), config, described)

    def log(self, record: dict[str, Any]) -> None:
        """Write an epoch's record at its step (and, first, the run's hparams naming its curves as metrics)."""
        values = scalars(record)
        if not self.described:
            from torch.utils.tensorboard.summary import hparams as hparams_summaries

            writer = self.writer._get_file_writer()
            for summary in hparams_summaries(hparams(self.config), dict.fromkeys(values, 0.0)):
                writer.add_summary(summary, record["step"])
            self.described = True
        for name, value in values.items():
            self.writer.add_scalar(name, value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
