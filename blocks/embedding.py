"""Token embeddings: integer ids to dense vectors, optionally initialised from Word2Vec/GloVe text files."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from blockgraph.blocks.flops import no_flops
from blockgraph.blocks.registry import Block, BlockParams, Port, register, weights_follow
from blockgraph.blocks.stepping import by_position
from blockgraph.blocks.types import TensorType
from blockgraph.common.errors import BlockgraphError, SpecError
from blockgraph.common.files import FileKind, GiB, KiB, MiB, read_lines

VECTORS_FILE = FileKind("pretrained vectors file", SpecError, limit=64 * GiB, max_line=1 * MiB)
VOCAB_FILE = FileKind("vocabulary file", SpecError, limit=1 * GiB, max_line=64 * KiB)


class PretrainedFileError(ValueError):
    """A pretrained-vector or vocabulary file is unreadable or malformed; the message names the file and line.

    A spec names these files, which may hold anything: messages say where and what was expected, never what the
    file holds.
    """

    def __init__(self, path: str | Path, line: int | None, problem: str):
        where = f"{path} line {line}" if line is not None else str(path)
        super().__init__(f"{where}: {problem}")
        self.path = str(path)
        self.line = line
        self.problem = problem


def read_vocab(path: str | Path) -> list[str]:
    """Tokens of a vocabulary file, one per line; line n (from 1) is id n-1. A final newline ends the last line."""
    tokens = []
    for number, line in _numbered_lines(path, VOCAB_FILE):
        token = _decode(line, path, number).removesuffix("\r")
        if token == "":
            raise PretrainedFileError(path, number, f"empty line; every line holds one token (it is id {number - 1})")
        tokens.append(token)
    if not tokens:
        raise PretrainedFileError(path, None, "the vocabulary file is empty")
    return tokens


def read_vectors(path: str | Path, dim: int, wanted: set[str] | None = None) -> dict[str, list[float]]:
    """Word → vector from a Word2Vec/GloVe text file (`word v1 … v_dim` per line, optional `count dim` header).

    Every line must hold exactly `dim` values. Values are parsed only for words in `wanted` (all words if None);
    a word's first occurrence wins. A word may contain spaces (as in GloVe 840B) as long as none of its
    later pieces is a number.
    """
    vectors: dict[str, list[float]] = {}
    header: tuple[int, int] | None = None
    count = 0
    for number, raw in _numbered_lines(path, VECTORS_FILE):
        line = _decode(raw, path, number).rstrip()
        if not line:
            continue
        parts = line.split(" ")
        if number == 1 and len(parts) == 2 and dim != 1 and all(map(_is_int, parts)):
            header = (int(parts[0]), int(parts[1]))
            if header[1] != dim:
                raise PretrainedFileError(path, number, f"header says {header[1]} values per word, expected dim={dim}")
            continue
        count += 1
        word, values = _split_line(parts, dim, path, number)
        if word in vectors or (wanted is not None and word not in wanted):
            continue
        vectors[word] = [_parse_value(v, i, path, number) for i, v in enumerate(values, 1)]
    if header is not None and header[0] != count:
        raise PretrainedFileError(path, 1, f"header says {header[0]} words, but the file has {count} vector lines")
    if count == 0:
        raise PretrainedFileError(path, None, "no vectors in the file")
    return vectors


def _numbered_lines(path: str | Path, kind: FileKind) -> Iterator[tuple[int, bytes]]:
    """(line number from 1, the line's bytes) of a file, streamed and bounded (see common.files)."""
    try:
        yield from read_lines(path, kind)
    except BlockgraphError as error:
        problem = error.problems[0]
        raise PretrainedFileError(path, problem.location.line, problem.message) from None


def _split_line(parts: list[str], dim: int, path: str | Path, number: int) -> tuple[str, list[str]]:
    n_word = len(parts) - dim
    if n_word < 1 or any(_is_number(piece) for piece in parts[1:n_word]):
        found = len(parts) - 1
        raise PretrainedFileError(path, number, f"{found} values after the word, expected dim={dim}")
    return " ".join(parts[:n_word]), parts[n_word:]


def _parse_value(text: str, index: int, path: str | Path, number: int) -> float:
    try:
        value = float(text)
    except ValueError:
        raise PretrainedFileError(path, number, f"value {index} after the word is not a number") from None
    if not math.isfinite(value):
        raise PretrainedFileError(path, number, f"value {index} after the word is not finite; vectors must be finite")
    return value


def _decode(raw: bytes, path: str | Path, number: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PretrainedFileError(
            path, number, "not UTF-8 text (binary word2vec files are not supported; save them as text)"
        ) from None


def _is_int(text: str) -> bool:
    return text.lstrip("+-").isdigit()


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@register("token_embedding", family="embedding")
class TokenEmbedding(Block):
    """Look up a learned vector per token id, optionally scaled by √dim as in the Transformer paper.

    With `pretrained`, rows are initialised from a Word2Vec/GloVe text file (`word v1 … v_dim` per line, an
    optional `count dim` header line as word2vec writes it). `vocab_file` (one token per line; line n is id
    n-1) maps words to ids; without it the file's n-th vector is id n-1. Ids whose token is not in the file
    get `missing`: `normal` draws N(0, σ²) with σ the standard deviation of all values loaded, so new rows
    match the pretrained scale; `zeros` leaves them zero. The `padding_idx` row is zero either way. Paths are
    relative to the spec's folder and must stay in it unless external files are allowed (docs/security.md).
    Files are read when the block is built, not on the `meta` device; a malformed file raises
    `PretrainedFileError` (a `ValueError`) naming the file, the line and what was expected.
    """

    class Params(BlockParams):
        vocab: int = Field(gt=0, description="number of token ids (ids run from 0 to vocab-1)")
        dim: int = Field(gt=0, description="embedding width (d_model)")
        padding_idx: int | None = Field(None, ge=0, description="id whose vector stays zero and gets no gradient")
        scale: bool = Field(
            False, description="multiply by √dim (Vaswani et al., section 3.4); the table then starts as N(0, 1/dim)"
        )
        round_scale: bool = Field(
            False,
            description="with scale: √dim rounded to the table's dtype first, as Gemma does (bfloat16: √3072 → 55.5)",
        )
        pretrained: str | None = Field(
            None,
            description="Word2Vec/GloVe text file of initial vectors (relative to the spec's folder)",
            json_schema_extra={"format": "path"},
        )
        vocab_file: str | None = Field(
            None,
            description="token per line (line n = id n-1) mapping the file's words to ids; needs pretrained",
            json_schema_extra={"format": "path"},
        )
        freeze: bool = Field(False, description="keep the embedding table fixed (requires_grad False)")
        missing: Literal["normal", "zeros"] = Field(
            "normal",
            description="rows of tokens absent from the file: normal = N(0, σ²) with σ the loaded vectors' std; "
            "zeros = 0",
        )

        @model_validator(mode="after")
        def _consistent(self) -> TokenEmbedding.Params:
            if self.padding_idx is not None and self.padding_idx >= self.vocab:
                raise ValueError(f"padding_idx ({self.padding_idx}) must be below vocab ({self.vocab})")
            if self.vocab_file is not None and self.pretrained is None:
                raise ValueError("vocab_file maps the words of a pretrained file; set pretrained too, or drop it")
            if self.round_scale and not self.scale:
                raise ValueError("round_scale rounds the √dim factor: set scale: true too, or drop it")
            return self

    in_ports = (Port("tokens", dtype="int", doc="token ids [...], each in [0, vocab)"),)
    out_ports = (Port("y", doc="embeddings [..., dim]"),)
    example = {"vocab": 32000, "dim": 512, "scale": True}

    def __init__(self, p: Params):
        super().__init__()
        self.lut = nn.Embedding(p.vocab, p.dim, padding_idx=p.padding_idx)
        self.scale = math.sqrt(p.dim) if p.scale else 1.0
        self.round_scale = p.round_scale
        if p.scale:  # N(0, 1/dim), so that the √dim-scaled output has unit variance instead of dim
            nn.init.normal_(self.lut.weight, std=p.dim**-0.5)
            if p.padding_idx is not None:
                nn.init.zeros_(self.lut.weight[p.padding_idx])
        if p.pretrained is not None and not self.lut.weight.is_meta and not weights_follow():
            with torch.no_grad():
                self.lut.weight.copy_(pretrained_table(p))
        if p.freeze:
            self.lut.weight.requires_grad_(False)

    @classmethod
    def infer(cls, p: Params, tokens: TensorType) -> TensorType:
        """integer ids [...] → float32 [..., dim]."""
        return TensorType((*tokens.shape, p.dim), torch.float32)

    flops = no_flops

    stepping = by_position

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.lut(tokens)
        if self.scale == 1.0:
            return x
        return x * (rounded(self.scale, x.dtype) if self.round_scale else self.scale)


@functools.cache
def rounded(value: float, dtype: torch.dtype) -> float:
    """`value` as a tensor of `dtype` holds it: multiplying by it is multiplying by that tensor."""
    return torch.tensor(value, dtype=dtype, device="cpu").item()


def pretrained_table(p: TokenEmbedding.Params) -> torch.Tensor:
    """The [vocab, dim] float32 table `p` asks for: file vectors by id, `missing` rows elsewhere, padding zero."""
    assert p.pretrained is not None
    if p.vocab_file is not None:
        tokens = read_vocab(p.vocab_file)
        if len(tokens) != p.vocab:
            raise PretrainedFileError(
                p.vocab_file, None, f"{len(tokens)} tokens (lines), but vocab is {p.vocab}; set vocab: {len(tokens)}"
            )
        vectors = read_vectors(p.pretrained, p.dim, set(tokens))
        rows = [vectors.get(token) for token in tokens]
        if not vectors:
            raise PretrainedFileError(p.pretrained, None, f"none of the {len(tokens)} tokens of {p.vocab_file} occur")
    else:
        vectors = read_vectors(p.pretrained, p.dim)
        if len(vectors) != p.vocab:
            raise PretrainedFileError(
                p.pretrained,
                None,
                f"{len(vectors)} distinct words, but vocab is {p.vocab}; set vocab: {len(vectors)} "
                "or give a vocab_file mapping tokens to ids",
            )
        rows = list(vectors.values())
    found = [i for i, row in enumerate(rows) if row is not None]
    loaded = torch.tensor([rows[i] for i in found], dtype=torch.float64)
    table = torch.zeros(p.vocab, p.dim, dtype=torch.float64)
    if p.missing == "normal":
        table.normal_(0.0, 1.0).mul_(loaded.std(correction=0))
    table[found] = loaded
    if p.padding_idx is not None:
        table[p.padding_idx] = 0.0
    return table.float()
