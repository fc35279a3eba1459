"""Length-bucketed batches of padded id tensors, planned deterministically and sharded over ranks.

Each epoch's plan depends only on (seed, epoch): the examples are shuffled, cut into pools of `pool` batches,
each pool sorted by length (so a batch pads little) and cut into batches of `batch_size` examples, and the
batches are shuffled. A batch is *global*: with N distributed ranks, rank r takes examples r, r+N, r+2N, ...
of every batch, as DistributedSampler does for examples, so N processes see exactly the batches one process
sees. A last batch smaller than N is merged into the one before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from blockgraph.trainer.specials import TRAINER_SPECIALS, Specials
from blockgraph.trainer.vocab import PAD_ID


@dataclass(frozen=True)
class Example:
    """Token ids: the source as the encoder reads it, eos included (None for a language model), and the
    target without its start and end (`Specials` frame it), or a classifier's text.

    A classifier's example has the index of its label in `label`. A language model's may have a `prompt`, read
    between the start and the target but not scored (a synthetic task's source and its separator).
    """

    tgt: list[int]
    src: list[int] | None = None
    label: int | None = None
    prompt: list[int] | None = None


@dataclass
class Batch:
    """Padded tensors (right padding; masks True at padding) and the number of target tokens to predict.

    `tgt_in` is the framed target `[*start, *tokens, eos]` without its last id, `tgt_out` without its first
    (the tokens to predict, eos last). A classifier's batch has the text as it is in `tgt_in` (no bos or eos), the label
    indices [batch] in `labels`, and `tgt_out` is the same tensor as `labels`. Prompted examples frame
    `[*start, *prompt, *tokens, eos]`, and `scored` is True where `tgt_out` holds a target token or eos (None: every
    position that is not padding).
    """

    tgt_in: torch.Tensor
    tgt_out: torch.Tensor
    tgt_pad: torch.Tensor
    src: torch.Tensor | None = None
    src_pad: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    scored: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.tgt_in.shape[0]

    @property
    def keep(self) -> torch.Tensor:
        """Where `tgt_out` is predicted and counted: the scored positions, by default those that are not padding."""
        return ~self.tgt_pad if self.scored is None else self.scored

    @property
    def tokens(self) -> int:
        """The predictions the loss is averaged over: scored target tokens, or a classifier's examples."""
        if self.labels is not None:
            return int(self.labels.shape[0])
        return int(self.keep.sum())

    def to(self, device: torch.device | str) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        def moved(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=True)

        return Batch(
            moved(self.tgt_in),
            moved(self.tgt_out),
            moved(self.tgt_pad),
            move(self.src),
            move(self.src_pad),
            move(self.labels),
            move(self.scored),
        )


def pad(sequences: Sequence[Sequence[int]], fill: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, longest] ids padded with `fill` on the right, and the mask (True = padding)."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), fill, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
    lengths = torch.tensor([len(s) for s in sequences])
    return ids, torch.arange(longest)[None, :] >= lengths[:, None]


def collate(examples: Sequence[Example], specials: Specials = TRAINER_SPECIALS) -> Batch:
    fill = specials.fill
    if examples[0].label is not None:
        tokens, mask = pad([e.tgt for e in examples], fill)
        labels = torch.tensor([e.label for e in examples], dtype=torch.long)
        return Batch(tokens, labels, mask, labels=labels)
    framed = [[*specials.start, *(e.prompt or ()), *e.tgt, specials.eos] for e in examples]
    tgt_in, tgt_pad = pad([f[:-1] for f in framed], fill)
    tgt_out, _ = pad([f[1:] for f in framed], fill)
    if examples[0].src is None:
        if not any(e.prompt for e in examples):
            return Batch(tgt_in, tgt_out, tgt_pad)
        read = torch.tensor([len(specials.start) + len(e.prompt or ()) for e in examples])  # before the target
        scored = (torch.arange(tgt_out.shape[1])[None, :] >= read[:, None] - 1) & ~tgt_pad  # tgt_out[j]: framed[j+1]
        return Batch(tgt_in, tgt_out, tgt_pad, scored=scored)
    src, src_pad = pad([e.src for e in examples], fill)  # type: ignore[misc]
    return Batch(tgt_in, tgt_out, tgt_pad, src, src_pad)


def length(example: Example) -> tuple[int, int]:
    return (len(example.src) if example.src is not None else 0, len(example.prompt or ()) + len(example.tgt))


def plan(
    examples: Sequence[Example],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    pool: int = 50,
    world: int = 1,
) -> list[list[int]]:
    """The epoch's global batches as lists of example indices (see the module notes)."""
    count = len(examples)
    if shuffle:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(count, generator=generator).tolist()
    else:
        order = list(range(count))
    batches: list[list[int]] = []
    step = batch_size * pool
    for start in range(0, count, step):
        chunk = sorted(order[start : start + step], key=lambda i: length(examples[i]))
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    if len(batches) > 1 and len(batches[-1]) < world:
        batches[-2] += batches.pop()
    if shuffle:
        permutation = torch.randperm(len(batches), generator=generator).tolist()
        batches = [batches[i] for i in permutation]
    return batches


def shard(batch: Sequence[int], rank: int, world: int) -> list[int]:
    """This rank's examples of a global batch."""
    return list(batch[rank::world])
