"""The token ids training and decoding treat apart, for the trainer's vocabularies and for imported models.

A target is framed as `[*start, *tokens, eos]`: the decoder reads all but the last id and predicts all but
the first (teacher forcing), and decoding starts from `start`. The trainer's vocabularies (trainer.vocab) put
pad, bos, eos and unk at ids 0-3 and start from bos; an imported model's ids come from its config (a Marian
model starts from its pad token, a language model from its prompt alone: `start` is empty).
"""

from __future__ import annotations

from dataclasses import dataclass

from blockgraph.trainer.vocab import BOS_ID, EOS_ID, PAD_ID


@dataclass(frozen=True)
class Specials:
    """What a target starts from, what ends it, what pads a batch and what is never generated."""

    start: tuple[int, ...] = (BOS_ID,)  # read before the prompt (empty: the prompt alone, which must not be)
    eos: int = EOS_ID
    pad: int | None = PAD_ID  # None: the model has no padding token (padded positions are masked all the same)
    never: tuple[int, ...] = (PAD_ID, BOS_ID)

    @property
    def fill(self) -> int:
        """The id padded positions hold: pad, or eos for a model without one."""
        return self.eos if self.pad is None else self.pad


TRAINER_SPECIALS = Specials()
