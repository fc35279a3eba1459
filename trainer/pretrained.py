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

import functools
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from blockgraph.builder import persist
from blockgraph.builder import precision as precisions
from blockgraph.builder.families import FAMILIES
from blockgraph.builder.hf_export import Exported, export_hf
from blockgraph.builder.hf_import import import_directory
from blockgraph.builder.hf_mappings import TOKENIZERS, TokenizerKind
from blockgraph.builder.model import GraphModel
from blockgraph.builder.pipeline import typed_graph
from blockgraph.common.atomic import check_directory_target, owned_directory, write_directory
from blockgraph.common.errors import CheckpointError, DataError, Location, Problem, WriteError
from blockgraph.common.files import FileKind, MiB, parse_json, read_bytes
from blockgraph.common.records import read_record
from blockgraph.trainer import checkpoint, subword
from blockgraph.trainer.generation import Translator
from blockgraph.trainer.roles import Roles, find_roles, sizes
from blockgraph.trainer.specials import Specials
from blockgraph.trainer.text import RECORD, TOKENIZER, ModelText, TextSide, tokenizer_folder
from blockgraph.trainer.tokenizer_json import TokenizerJson

FORMAT = "blockgraph-pretrained"
SPEC, MODEL = "spec.yaml", "model"
TOKENIZER_FILE = FileKind("tokenizer file", CheckpointError, limit=256 * MiB)
RECORD_FILE = FileKind("pretrained.json", CheckpointError, limit=1 * MiB)
WHAT = "imported model"


class PretrainedRecord(BaseModel):
    """pretrained.json: what `translate` and `generate` need besides the model."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["blockgraph-pretrained"]
    format_version: int = Field(1, ge=1, le=1)
    model_type: str
    specials: dict[Literal["pad", "bos", "eos", "decoder_start"], Annotated[int, Field(ge=0)] | None]
    tokenizer: TokenizerKind | None
    spec_sha256: str  # of the spec.yaml written: an edited one is the user's, and another import keeps it

    @property
    def special_ids(self) -> dict[str, int | None]:
        """The special-token ids by name, as the import read them from config.json."""
        return {str(name): token for name, token in self.specials.items()}


@dataclass(frozen=True)
class Report:
    """What an import wrote."""

    model_type: str
    tensors: int
    parameters: int
    tokenizer: str | None


def import_pretrained(directory: str | Path, out: str | Path) -> Report:
    """Import the Hugging Face-format `directory` into `out` (see the module's docstring): complete, or nothing."""
    directory, out = Path(directory), Path(out)
    _refuse_edited(out)
    check_directory_target(out, owned=replaceable, what=WHAT)  # before the work: a wrong --out fails at once
    imported = import_directory(directory)
    kind = tokenizer_kind(directory, imported.model_type)
    files = {name: read_bytes(directory / name, TOKENIZER_FILE) for name in _tokenizer_files(kind)}
    if kind is not None:  # parsed before anything is written: a bad file stops here
        _sides(files, kind, imported.specials, int(imported.variables["vocab"]), Location(str(directory)))
    digest = hashlib.sha256(imported.spec_text.encode("utf-8")).hexdigest()
    record = PretrainedRecord(
        format=FORMAT, model_type=imported.model_type, specials=imported.specials, tokenizer=kind, spec_sha256=digest
    )
    write_model = persist.model_files(imported.model, Location(str(out / MODEL)))

    def fill(folder: Path) -> None:
        folder.mkdir(exist_ok=True)
        write_model(folder / MODEL)
        (folder / SPEC).write_text(imported.spec_text, encoding="utf-8")
        standalone = imported.model.typed_graph.graph.standalone
        if typed_graph(folder / SPEC).graph.standalone != standalone:
            raise CheckpointError(Problem("the written spec.yaml would not build this model", Location(str(out))))
        if files:
            (folder / TOKENIZER).mkdir()
            for name, data in files.items():
                (folder / TOKENIZER / name).write_bytes(data)
        (folder / RECORD).write_text(record.model_dump_json(indent=2) + "\n", encoding="utf-8")

    write_directory(out, fill, owned=replaceable, what=WHAT)
    parameters = sum(p.numel() for p in imported.model.parameters())
    return Report(imported.model_type, imported.tensors, parameters, kind)


def export(
    model: GraphModel, imported: Path | None, out: str | Path, note: Callable[[str], None], *, max_shard_size: int
) -> Exported:
    """`model` as a Hugging Face directory at `out` (builder.hf_export); an import's (or a run fine-tuning one)
    record names its family and token ids, and its tokenizer files go along."""
    record = read_record(imported / RECORD, PretrainedRecord, RECORD_FILE) if imported is not None else None
    files: dict[str, bytes] = {}
    if record is not None and record.tokenizer is not None:
        folder = imported / TOKENIZER  # type: ignore[operator]
        files = {name: read_bytes(folder / name, TOKENIZER_FILE) for name in _tokenizer_files(record.tokenizer)}
    model_type, specials = (record.model_type, record.special_ids) if record is not None else (None, None)
    exported = export_hf(
        model, out, model_type=model_type, specials=specials, tokenizer=files, max_shard_size=max_shard_size
    )
    if not files and FAMILIES[exported.model_type].tokenizer is not None:  # an image model has none to carry
        note("no tokenizer files went along (the model was not imported with any): copy the original's beside them")
    return exported


def replaceable(path: Path) -> bool:
    """An imported model's directory, and nothing of the user's, may be replaced by another import: not a
    spec.yaml the user edited, nor any file of theirs."""
    owned = owned_directory(path, RECORD, {RECORD, SPEC}, {MODEL: persist.replaceable, TOKENIZER: tokenizer_folder})
    return owned and not spec_edited(path)


def spec_edited(path: Path) -> bool:
    """Whether `path`'s spec.yaml is another than the one the import wrote (an unreadable record counts)."""
    if not (path / SPEC).exists():
        return False
    try:
        record = read_record(path / RECORD, PretrainedRecord, RECORD_FILE)
        written = hashlib.sha256(read_bytes(path / SPEC, RECORD_FILE)).hexdigest()
    except CheckpointError:
        return True
    return written != record.spec_sha256


def _refuse_edited(out: Path) -> None:
    """A re-import over an import whose spec.yaml the user edited would lose the edit: say so, not "not ours"."""
    if is_pretrained(out) and spec_edited(out):
        raise WriteError(
            Problem(
                f"{out} is an imported model whose spec.yaml you edited: importing again would replace the edit",
                Location(str(out / SPEC)),
                hint="import into another directory, or move the edited spec.yaml away first",
            )
        )


def is_pretrained(path: str | Path) -> bool:
    return (Path(path) / RECORD).is_file()


def tokenizer_kind(directory: Path, model_type: str) -> TokenizerKind | None:
    """The tokenizer the family declares if the directory holds its files, else none; another kind's files
    alone are refused: the family's model would read text through a tokenizer it was not made for."""
    kind = FAMILIES[model_type].tokenizer
    if kind is None:  # a family that reads no text (images): whatever text files lie beside it stay there
        return None
    if all((directory / name).is_file() for name in TOKENIZERS[kind]):
        return kind
    for other, names in TOKENIZERS.items():
        if other != kind and all((directory / name).is_file() for name in names):
            theirs = ", ".join(TOKENIZERS[kind])
            raise CheckpointError(
                Problem(
                    f"{directory} holds {', '.join(names)} but not {theirs}, the {model_type} family's tokenizer",
                    Location(str(directory / names[0])),
                    hint=f"put the model's own {theirs} beside config.json, or remove these files to import "
                    "without a tokenizer",
                )
            )
    return None


def _tokenizer_files(kind: TokenizerKind | None) -> tuple[str, ...]:
    return () if kind is None else TOKENIZERS[kind]


@dataclass(frozen=True)
class Loaded:
    """An imported model read back: the model, what its inputs mean, its special tokens, its record."""

    model: GraphModel
    roles: Roles
    specials: Specials
    record: PretrainedRecord
    vocab: int  # the model's output vocabulary


def load_model(path: str | Path, *, device: str = "cpu") -> Loaded:
    """The imported model at `path`, with the special tokens decoding uses (nothing of it is run)."""
    path = Path(path)
    record = writer_record(path)
    model = persist.load(path / MODEL, device=device).eval()  # decoding: dropout off
    graph = model.typed_graph.graph
    roles = find_roles(graph, types=model.typed_graph.types, features=True)  # decoding reads audio features too
    vocab = sizes(graph, roles).out_vocab or 0
    specials = specials_of(record, roles.kind, vocab, Location(str(path / RECORD)))
    return Loaded(model, roles, specials, record, vocab)


def writer_record(path: Path) -> PretrainedRecord:
    """The record of the imported model at `path`, which must write text (an encoder alone does not)."""
    record = read_record(path / RECORD, PretrainedRecord, RECORD_FILE)
    where = Location(str(path / RECORD))
    family = FAMILIES.get(record.model_type)
    if family is not None and not family.generates:
        reads = "classifies images" if family.task == "image-classification" else "encodes text"
        raise CheckpointError(
            Problem(
                f"a {record.model_type} model {reads}; it does not generate",
                where,
                hint="translate, generate and fine-tune models that write text (inspect and build this one)",
            )
        )
    return record


def specials_of(record: PretrainedRecord, kind: str, vocab: int, where: Location) -> Specials:
    """The record's special-token ids as decoding and training use them, each within the model's `vocab`."""
    beyond = [name for name, i in record.specials.items() if i is not None and i >= vocab]
    if beyond:
        raise CheckpointError(
            Problem(
                f"field specials.{beyond[0]}: beyond the model's {vocab} tokens",
                where,
                hint="a model fine-tuned from an import keeps its vocabulary size (no --set of it)",
            )
        )
    eos, pad = record.specials.get("eos"), record.specials.get("pad")
    if eos is None:
        raise CheckpointError(Problem("field specials.eos: the model has no end-of-sequence token", where))
    never = (pad,) if pad is not None and pad != eos else ()
    start: tuple[int, ...] = ()  # a language model reads the prompt as its tokenizer encodes it (bos included)
    if kind == "seq2seq":
        decoder_start = record.specials.get("decoder_start")
        if decoder_start is None:
            raise CheckpointError(Problem("field specials.decoder_start: needed to translate", where))
        start = (decoder_start,)
    return Specials(start=start, eos=eos, pad=pad, never=never)


def model_text(path: str | Path, kind: str, vocab: int) -> ModelText:
    """The tokenizers and special tokens of the imported model at `path`, for a model of `kind` (seq2seq or
    lm) with `vocab` output tokens, and the files that carry them into a checkpoint."""
    path = Path(path)
    record = writer_record(path)
    where = Location(str(path / RECORD))
    if record.tokenizer is None:
        raise CheckpointError(
            Problem(
                "this imported model has no tokenizer", where, hint="import a directory that holds its tokenizer files"
            )
        )
    folder = path / TOKENIZER
    files = {name: read_bytes(folder / name, TOKENIZER_FILE) for name in _tokenizer_files(record.tokenizer)}
    source, target = _sides(files, record.tokenizer, record.special_ids, vocab, Location(str(folder)))
    carried = {
        RECORD: (record.model_dump_json(indent=2) + "\n").encode(),
        **{f"{TOKENIZER}/{name}": data for name, data in files.items()},
    }
    specials = specials_of(record, kind, vocab, where)
    return ModelText(target, source if kind == "seq2seq" else None, specials, carried)


def load(
    path: str | Path,
    *,
    device: str = "cpu",
    compiled: bool = False,
    precision: str = "float32",
    note: Callable[[str], None] | None = None,
) -> Translator:
    """An imported (or fine-tuned imported) model ready to translate or generate with its own tokenizers and
    special tokens, decoding in `precision`."""
    precisions.check(precision, device)  # before the weights are read
    loaded = load_model(path, device=device)
    if note is not None and not (Path(path) / checkpoint.TRAINER).exists() and spec_edited(Path(path)):
        note(
            f"{Path(path) / SPEC} was edited after the import; this runs the model as imported (model/): "
            f"`blockgraph train {path} --data FILE` trains the edited spec from the imported weights"
        )
    text = model_text(path, loaded.roles.kind, loaded.vocab)
    options = {"specials": text.specials, "compiled": compiled, "precision": precision, "note": note}
    return Translator(loaded.model, loaded.roles, text.target, text.source, **options)  # type: ignore[arg-type]


def _sides(
    files: dict[str, bytes], kind: str, specials: dict[str, int | None], vocab: int, where: Location
) -> tuple[TextSide, TextSide]:
    """The source and target text sides of the tokenizer files (one tokenizer.json serves both); every id
    they give is checked against the model's `vocab`."""
    if kind == "tokenizer.json":
        side = _tokenizer_json(files["tokenizer.json"], where)
        source, target = side, side
    else:
        source, target = _marian(files, specials, where)
    return _within(source, vocab), _within(target, vocab)


def _within(side: TextSide, vocab: int) -> TextSide:
    """`side`, with its ids checked to be the model's: a tokenizer with more tokens than the model is refused
    at the first text that reaches beyond."""

    def encode(sentence: str) -> list[int]:
        ids = side.encode(sentence)
        beyond = [i for i in ids if not 0 <= i < vocab]
        if beyond:
            raise DataError(Problem(f"the tokenizer gives id {beyond[0]}; the model has {vocab} tokens"))
        return ids

    return TextSide(encode, side.decode, side.unknown)


def _tokenizer_json(data: bytes, where: Location) -> TextSide:
    """A tokenizer.json, checked and read as data (trainer.tokenizer_json)."""
    tokenizer = TokenizerJson(data, Path(where.file or ".") / "tokenizer.json", TOKENIZER_FILE)
    return TextSide(tokenizer.encode, tokenizer.decode, tokenizer.unknown)


def _not_sentencepiece(name: str, where: Location, failure: str) -> CheckpointError:
    return CheckpointError(Problem(f"{name} is not a SentencePiece model ({failure})", where))


def _marian(files: dict[str, bytes], specials: dict[str, int | None], where: Location) -> tuple[TextSide, TextSide]:
    """Marian's tokenizer: SentencePiece pieces (source.spm, target.spm), ids from the shared vocab.json."""
    processors = []
    for name in ("source.spm", "target.spm"):
        fail = functools.partial(_not_sentencepiece, name, where)
        processors.append(subword.processor(files[name], fail))
    vocab = parse_json(files["vocab.json"], Path(where.file or ".") / "vocab.json", TOKENIZER_FILE)
    ids_ok = isinstance(vocab, dict) and all(type(i) is int and i >= 0 for i in vocab.values())
    if not ids_ok:
        raise CheckpointError(Problem("vocab.json: expected a mapping of piece → id (integers ≥ 0)", where))
    pieces = {i: piece for piece, i in vocab.items()}
    unk, eos = vocab.get("<unk>"), specials.get("eos")
    skipped = {i for i in (specials.get("pad"), eos, unk) if i is not None}  # as skip_special_tokens does
    source_pieces, target_pieces = processors

    def ids_of(processor: Any, sentence: str) -> list[int]:
        found = [vocab.get(piece, unk) for piece in processor.encode(sentence, out_type=str)]
        return [i for i in found if i is not None]

    def decode(ids: Sequence[int]) -> str:
        return target_pieces.decode_pieces([pieces[i] for i in ids if i not in skipped and i in pieces])

    def unknown(sentence: str) -> list[str]:
        return [piece for piece in source_pieces.encode(sentence, out_type=str) if piece not in vocab]

    source = TextSide(lambda s: [*ids_of(source_pieces, s), *([eos] if eos is not None else [])], decode, unknown)
    return source, TextSide(lambda s: ids_of(target_pieces, s), decode, lambda text: [])
