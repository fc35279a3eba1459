"""Text ↔ ids, one side at a time: a trained checkpoint's vocabulary, or an imported model's tokenizer.

`TextSide` is what translating and training need of a tokenizer: the ids a model reads for a text, the text
of the ids it writes, and the pieces a vocabulary lacks. `ModelText` is an imported model's pair of sides
with its special tokens and the tokenizer files a fine-tuning checkpoint carries along (trainer.pretrained).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from blockgraph.builder.hf_mappings import TOKENIZERS
from blockgraph.common.atomic import owned_directory
from blockgraph.trainer.specials import Specials
from blockgraph.trainer.vocab import EOS_ID, UNK_ID, Vocab, tokenize

# the files that make a directory holding a model readable as an imported one (trainer.pretrained)
RECORD = "pretrained.json"  # model type, special-token ids, which tokenizer
TOKENIZER = "tokenizer"  # the folder of the tokenizer's files
TOKENIZER_FILES = tuple(name for names in TOKENIZERS.values() for name in names)  # of every kind (hf_mappings)


def tokenizer_folder(path: Path) -> bool:
    """A tokenizer/ folder as blockgraph writes it (the files of one of the layouts above, nothing else)."""
    return owned_directory(path, None, set(TOKENIZER_FILES))


@dataclass(frozen=True)
class TextSide:
    """Text ↔ the ids a model reads or writes on one side (source, or target)."""

    encode: Callable[[str], list[int]]  # the ids as the model reads them (a source with its eos)
    decode: Callable[[Sequence[int]], str]
    unknown: Callable[[str], list[str]]  # the pieces of a text the vocabulary lacks

    @classmethod
    def of_vocab(cls, vocab: Vocab, *, source: bool) -> TextSide:
        """A trainer vocabulary's side: a source ends with eos, a target starts after the decoder's bos."""

        def encode(text: str) -> list[int]:
            ids = vocab.encode_text(text)
            return [*ids, EOS_ID] if source and ids else ids

        def unknown(text: str) -> list[str]:
            tokens = tokenize(text, vocab.tokenizer)
            return [t for t, i in zip(tokens, vocab.encode(tokens), strict=True) if i == UNK_ID]

        return cls(encode, vocab.decode_text, unknown)


@dataclass(frozen=True)
class ModelText:
    """An imported model's text sides (no source for a language model), special tokens and files.

    `files` (relative path → bytes) are the record and tokenizer files that make a directory holding the model
    readable as an imported model again: a checkpoint writes them next to its model.
    """

    target: TextSide
    source: TextSide | None
    specials: Specials
    files: dict[str, bytes] = field(default_factory=dict, repr=False)
