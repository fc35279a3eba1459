"""Pretrained models imported from Hugging Face-format directories: written as a spec, a saved model and the
model's own tokenizers, and read back to translate and generate.

`blockgraph import HF_DIR --out OUT` writes OUT atomically:

    OUT/spec.yaml        the family's spec, its variables from config.json (edit it, build it, train it)
    OUT/model/           the saved model (builder.persist) holding the pretrained weights
    OUT/tokenizer/       tokenizer.json, or Marian's source.spm, target.spm and vocab.json, copied
    OUT/pretrained.json  model type, special-token ids, which tokenizer

A tokenizer is data: `tokenizer.json` is read by the `tokenizers` library, SentencePiece models by
`sentencepiece`; neither runs code from the files. Text goes through them as the original does: a Marian
source's pieces map to ids through vocab.json and end with eos; a tokenizer.json applies its own
post-processing (bos, eos) when encoding, and decoding leaves special tokens out.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from builder import persist
from builder.hf_import import import_directory
from common.atomic import check_directory_target, owned_directory, write_directory
from common.errors import CheckpointError, Location, Problem
from common.files import FileKind, MiB, read_bytes, read_json, read_text
from common.records import read_record
from trainer.decode import Specials
from trainer.generation import TextSide, Translator
from trainer.roles import Roles, find_roles

FORMAT = "blockgraph-pretrained"
RECORD = "pretrained.json"
SPEC, MODEL, TOKENIZER = "spec.yaml", "model", "tokenizer"
MARIAN_FILES = ("source.spm", "target.spm", "vocab.json")
TOKENIZER_FILE = FileKind("tokenizer file", CheckpointError, limit=256 * MiB)
RECORD_FILE = FileKind("pretrained.json", CheckpointError, limit=1 * MiB)
WHAT = "imported model"


class PretrainedRecord(BaseModel):
    """pretrained.json: what `translate` and `generate` need besides the model."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["blockgraph-pretrained"]
    format_version: int = Field(1, ge=1, le=1)
    model_type: str
    specials: dict[Literal["pad", "bos", "eos", "decoder_start"], int | None]
    tokenizer: Literal["tokenizer.json", "marian"] | None


@dataclass(frozen=True)
class Report:
    """What an import wrote."""

    out: Path
    model_type: str
    tensors: int
    parameters: int
    tokenizer: str | None
    variables: dict[str, Any]


def import_pretrained(directory: str | Path, out: str | Path) -> Report:
    """Import the Hugging Face-format `directory` into `out` (see the module's docstring): complete, or nothing."""
    directory, out = Path(directory), Path(out)
    check_directory_target(out, owned=replaceable, what=WHAT)  # before the work: a wrong --out fails at once
    imported = import_directory(directory)
    kind = tokenizer_kind(directory)
    _sides(directory, kind, imported.specials)  # parsed before anything is written: a bad file stops here
    record = PretrainedRecord(format=FORMAT, model_type=imported.model_type, specials=imported.specials, tokenizer=kind)
    write_model = persist.model_files(imported.model, Location(str(out / MODEL)))

    def fill(folder: Path) -> None:
        folder.mkdir(exist_ok=True)
        write_model(folder / MODEL)
        (folder / SPEC).write_text(imported.spec_text, encoding="utf-8")
        if kind is not None:
            (folder / TOKENIZER).mkdir()
            for name in _tokenizer_files(kind):
                shutil.copyfile(directory / name, folder / TOKENIZER / name)
        (folder / RECORD).write_text(record.model_dump_json(indent=2) + "\n", encoding="utf-8")

    write_directory(out, fill, owned=replaceable, what=WHAT)
    parameters = sum(p.numel() for p in imported.model.parameters())
    return Report(out, imported.model_type, imported.tensors, parameters, kind, imported.variables)


def replaceable(path: Path) -> bool:
    """An imported model's directory, and nothing of the user's, may be replaced by another import."""
    files = set(_tokenizer_files("tokenizer.json")) | set(MARIAN_FILES)
    return owned_directory(
        path,
        RECORD,
        {RECORD, SPEC},
        {MODEL: persist.replaceable, TOKENIZER: lambda p: owned_directory(p, None, files)},
    )


def is_pretrained(path: str | Path) -> bool:
    return (Path(path) / RECORD).is_file()


def tokenizer_kind(directory: Path) -> Literal["tokenizer.json", "marian"] | None:
    """Which tokenizer the Hugging Face directory holds: tokenizer.json, Marian's SentencePiece files, or none."""
    if (directory / "tokenizer.json").is_file():
        return "tokenizer.json"
    if all((directory / name).is_file() for name in MARIAN_FILES):
        return "marian"
    return None


def _tokenizer_files(kind: str) -> tuple[str, ...]:
    return ("tokenizer.json",) if kind == "tokenizer.json" else MARIAN_FILES


@dataclass(frozen=True)
class Loaded:
    """An imported model read back: the model, what its inputs mean, its special tokens, its record."""

    model: nn.Module
    roles: Roles
    specials: Specials
    record: PretrainedRecord


def load_model(path: str | Path, *, device: str = "cpu") -> Loaded:
    """The imported model at `path`, with the special tokens decoding uses (nothing of it is run)."""
    path = Path(path)
    record = read_record(path / RECORD, PretrainedRecord, RECORD_FILE)
    where = Location(str(path / RECORD))
    if record.model_type == "bert":
        raise CheckpointError(Problem(f"a {record.model_type} model encodes text; it does not generate", where))
    model = persist.load(path / MODEL, device=device).eval()  # decoding: dropout off
    roles = find_roles(model.typed_graph.graph, types=model.typed_graph.types)  # type: ignore[union-attr]
    eos, pad = record.specials.get("eos"), record.specials.get("pad")
    if eos is None:
        raise CheckpointError(Problem("field specials.eos: the model has no end-of-sequence token", where))
    never = (pad,) if pad is not None and pad != eos else ()
    start: tuple[int, ...] = ()  # a language model reads the prompt as its tokenizer encodes it (bos included)
    if roles.kind == "seq2seq":
        decoder_start = record.specials.get("decoder_start")
        if decoder_start is None:
            raise CheckpointError(Problem("field specials.decoder_start: needed to translate", where))
        start = (decoder_start,)
    return Loaded(model, roles, Specials(start=start, eos=eos, never=never), record)


def load(
    path: str | Path, *, device: str = "cpu", compiled: bool = False, note: Callable[[str], None] | None = None
) -> Translator:
    """An imported model ready to translate or generate with its own tokenizers and special tokens."""
    loaded = load_model(path, device=device)
    if loaded.record.tokenizer is None:
        raise CheckpointError(
            Problem(
                "this imported model has no tokenizer",
                Location(str(Path(path) / RECORD)),
                hint="import a directory that holds its tokenizer files",
            )
        )
    source, target = _sides(Path(path) / TOKENIZER, loaded.record.tokenizer, loaded.record.specials)
    if loaded.roles.kind != "seq2seq":
        source = None
    options = {"specials": loaded.specials, "compiled": compiled, "note": note}
    return Translator(loaded.model, loaded.roles, target, source, **options)  # type: ignore[arg-type]


def _sides(folder: Path, kind: str | None, specials: dict[str, int | None]) -> tuple[TextSide | None, TextSide]:
    """The source and target text sides of a tokenizer folder (one tokenizer.json serves both)."""
    if kind is None:
        return None, TextSide(lambda text: [], lambda ids: "", lambda text: [])
    if kind == "tokenizer.json":
        side = _tokenizer_json(folder / "tokenizer.json")
        return side, side
    return _marian(folder, specials)


def _tokenizer_json(path: Path) -> TextSide:
    from tokenizers import Tokenizer

    text = read_text(path, TOKENIZER_FILE)
    try:
        tokenizer = Tokenizer.from_str(text)
    except Exception:  # the library's error quotes the file: say where instead
        raise CheckpointError(
            Problem("tokenizer.json is not a tokenizer the tokenizers library reads", Location(str(path)))
        ) from None
    unk = next((i for t in ("<unk>", "[UNK]") if (i := tokenizer.token_to_id(t)) is not None), None)

    def encode(sentence: str) -> list[int]:
        return tokenizer.encode(sentence).ids

    def decode(ids: Sequence[int]) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=True)

    def unknown(sentence: str) -> list[str]:
        found = tokenizer.encode(sentence)
        return [t for t, i in zip(found.tokens, found.ids, strict=True) if i == unk] if unk is not None else []

    return TextSide(encode, decode, unknown)


def _marian(folder: Path, specials: dict[str, int | None]) -> tuple[TextSide, TextSide]:
    """Marian's tokenizer: SentencePiece pieces (source.spm, target.spm), ids from the shared vocab.json."""
    import sentencepiece

    processors = []
    for name in ("source.spm", "target.spm"):
        path = folder / name
        processor = sentencepiece.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(read_bytes(path, TOKENIZER_FILE))
        except Exception:
            raise CheckpointError(Problem(f"{name} is not a SentencePiece model", Location(str(path)))) from None
        processors.append(processor)
    vocab_path = folder / "vocab.json"
    vocab = read_json(vocab_path, TOKENIZER_FILE)
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise CheckpointError(Problem("vocab.json: expected a mapping of piece → id", Location(str(vocab_path))))
    pieces = {i: piece for piece, i in vocab.items()}
    unk, eos = vocab.get("<unk>"), specials.get("eos")
    skipped = {i for i in (specials.get("pad"), eos) if i is not None}
    source_pieces, target_pieces = processors

    def encode(sentence: str) -> list[int]:
        ids = [vocab.get(piece, unk) for piece in source_pieces.encode(sentence, out_type=str)]
        return [i for i in ids if i is not None] + ([eos] if eos is not None else [])

    def unknown(sentence: str) -> list[str]:
        return [piece for piece in source_pieces.encode(sentence, out_type=str) if piece not in vocab]

    def decode(ids: Sequence[int]) -> str:
        return target_pieces.decode_pieces([pieces[i] for i in ids if i not in skipped and i in pieces])

    def target_encode(sentence: str) -> list[int]:
        ids = [vocab.get(piece, unk) for piece in target_pieces.encode(sentence, out_type=str)]
        return [i for i in ids if i is not None]

    return TextSide(encode, decode, unknown), TextSide(target_encode, decode, lambda text: [])
