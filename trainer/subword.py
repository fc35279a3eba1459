"""Subword tokenizers: SentencePiece models learned from the training data (`--subword-vocab N`) or given as a
file (`--tokenizer FILE.model`), as one more tokenizer kind of trainer.vocab.

A model is named by its content: the kind `spm-<hash>` (the first 16 hex digits of its SHA-256), so that the
same bytes always give the same tokens, a checkpoint can carry its model inside vocab.json (base64) and be
checked against its name on load, and nothing but the bytes themselves decides the tokenization. The models
known to this process are kept by name (`register`); SentencePiece parses a model as data (a protobuf), it
runs nothing from it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from blockgraph.common.errors import BlockgraphError, DataError, Problem
from blockgraph.common.files import FileKind, MiB, read_bytes
from blockgraph.common.native import guarded

PREFIX = "spm-"
MODEL_FILE = FileKind("SentencePiece model", DataError, limit=16 * MiB)  # two, in base64, fit in a vocab.json
Kind = Literal["unigram", "bpe"]

_models: dict[str, Any] = {}  # kind → SentencePieceProcessor, for the models this process has seen
_bytes: dict[str, bytes] = {}  # kind → the serialized model


def is_subword(kind: str) -> bool:
    return kind.startswith(PREFIX)


def kind_of(data: bytes) -> str:
    return PREFIX + hashlib.sha256(data).hexdigest()[:16]


def register(data: bytes, where: str = "SentencePiece model") -> str:
    """Load the serialized model `data` (once) and return its kind."""
    kind = kind_of(data)
    if kind in _models and _bytes[kind] != data:  # 64 bits of SHA-256 alike: never take one for the other
        raise DataError(Problem(f"{where} shares its name {kind} with another model"))
    if kind not in _models:

        def fail(failure: str) -> DataError:
            return DataError(Problem(f"{where} is not a SentencePiece model ({failure})"))

        _models[kind], _bytes[kind] = processor(data, fail), data
    return kind


def processor(data: bytes, fail: Callable[[str], BlockgraphError]) -> Any:
    """The SentencePiece processor of the serialized model `data`: the one way blockgraph hands bytes to the
    library, its logs muted and its failure, whatever it is, `fail(failure)` (common.native)."""
    import sentencepiece

    loaded = sentencepiece.SentencePieceProcessor()
    with guarded(fail):
        loaded.LoadFromSerializedProto(data)
    return loaded


def register_file(path: str | Path) -> str:
    """A SentencePiece model file the user names (`--tokenizer FILE.model`), registered."""
    return register(read_bytes(path, MODEL_FILE), str(path))


def learn(lines: Iterable[str], size: int, model: Kind = "unigram") -> str:
    """A SentencePiece model of about `size` pieces learned from `lines` (one thread: the same data gives the
    same model), registered; its kind."""
    import sentencepiece

    text = [line for line in lines if line.strip()]
    if not text:
        raise DataError(Problem("no text to learn subwords from"))
    written = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(text), model_writer=written, vocab_size=size, model_type=model,
            character_coverage=1.0, hard_vocab_limit=False, num_threads=1, minloglevel=2,
            bos_id=-1, eos_id=-1, pad_id=-1, unk_id=0,
        )  # fmt: skip
    except RuntimeError as exc:
        needed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(exc))
        if needed:  # every character of the text is a piece of its own at least
            raise DataError(
                Problem(
                    f"--subword-vocab {size} is fewer pieces than the text has characters ({needed.group(1)})",
                    hint=f"use --subword-vocab {needed.group(1)} or more",
                )
            ) from None
        raise DataError(
            Problem(f"cannot learn {size} subwords from this text", hint="change --subword-vocab")
        ) from None
    return register(written.getvalue())


def known(kind: str) -> bool:
    return kind in _models


def pieces(text: str, kind: str) -> list[str]:
    return _models[kind].encode(text, out_type=str)


def join(tokens: Sequence[str], kind: str) -> str:
    return _models[kind].decode_pieces(list(tokens))


def serialized(kind: str) -> str:
    """The model as base64 text, as a checkpoint's vocab.json keeps it."""
    return base64.b64encode(_bytes[kind]).decode("ascii")


def deserialized(text: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except ValueError:
        raise DataError(Problem("the subword model is not base64 text")) from None
