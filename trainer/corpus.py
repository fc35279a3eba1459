"""From a data file or a synthetic task to encoded training and held-out examples with their vocabularies.

Vocabularies are built from the training split only (held-out tokens never seen in training read as unk).
Examples longer than `max_len` tokens on either side are left out of both splits and counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from builder.errors import Problem, SpecError
from trainer import data, tasks
from trainer.batching import Example
from trainer.vocab import SPECIALS, Vocab, guess_tokenizer, tokenize


@dataclass
class Corpus:
    train: list[Example]
    valid: list[Example]
    src_vocab: Vocab | None
    tgt_vocab: Vocab
    valid_refs: list[list[str]]  # held-out targets as tokens (for BLEU)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class CorpusOptions:
    kind: str  # seq2seq or lm
    data: str | None = None
    valid_data: str | None = None
    task: str | None = None
    task_options: tasks.TaskOptions = field(default_factory=tasks.TaskOptions)
    seed: int = 0
    valid_fraction: float = 0.05
    max_len: int = 100
    min_freq: int = 1
    max_vocab: int | None = None
    src_tokenizer: str = "auto"
    tgt_tokenizer: str = "auto"
    skip_bad_lines: bool = False
    shared_vocab: bool = False


def load(options: CorpusOptions, vocabs: tuple[Vocab | None, Vocab] | None = None) -> Corpus:
    """Read or generate the text, tokenize, build (or reuse) the vocabularies, encode and split."""
    notes: list[str] = []
    seq2seq = options.kind == "seq2seq"
    if options.task is not None:
        if not seq2seq:
            raise SpecError(
                Problem(f"--task {options.task} needs an encoder–decoder spec (a source and a target input)")
            )
        train_text, valid_text = tasks.make_pairs(options.task, options.task_options, options.seed)
        tokenizers = ("space", "space")
    else:
        if options.data is None:
            raise SpecError(Problem("no training data", hint="pass --data FILE, or --task copy / --task reverse"))
        records = _read(options.data, seq2seq, options.skip_bad_lines, notes)
        if options.valid_data is not None:
            train_text, valid_text = records, _read(options.valid_data, seq2seq, options.skip_bad_lines, notes)
        else:
            train_text, valid_text = data.split(records, options.valid_fraction, options.seed)
        tokenizers = (
            _tokenizer(options.src_tokenizer, [r[0] for r in train_text]) if seq2seq else "space",
            _tokenizer(options.tgt_tokenizer, [r[-1] for r in train_text]),
        )
    train_tokens = _tokenize(train_text, tokenizers, seq2seq)
    valid_tokens = _tokenize(valid_text, tokenizers, seq2seq)
    if vocabs is not None:
        src_vocab, tgt_vocab = vocabs
    elif options.task is not None:
        tokens = [*SPECIALS, *tasks.symbols(options.task_options)]
        src_vocab, tgt_vocab = Vocab(tokens, "space"), Vocab(tokens, "space")
    else:
        src_vocab, tgt_vocab = _vocabs(train_tokens, tokenizers, options, seq2seq)
    train, dropped = _encode(train_tokens, src_vocab, tgt_vocab, options.max_len)
    valid, dropped_valid = _encode(valid_tokens, src_vocab, tgt_vocab, options.max_len)
    if dropped or dropped_valid:
        notes.append(f"left out {dropped + dropped_valid} example(s) longer than --max-len {options.max_len}")
    if not train:
        raise SpecError(Problem("no training examples left", hint="check the data and --max-len"))
    refs = [tgt for src, tgt in valid_tokens if _fits(src, tgt, options.max_len)]
    return Corpus(train, valid, src_vocab, tgt_vocab, refs, notes)


def _read(path: str, seq2seq: bool, skip_bad: bool, notes: list[str]) -> list[tuple[str, ...]]:
    text = data.read_pairs(path, skip_bad=skip_bad) if seq2seq else data.read_lines(path, skip_bad=skip_bad)
    if text.bad:
        notes.append(text.summary())
    return text.records


def _tokenizer(kind: str, lines: list[str]) -> str:
    return guess_tokenizer(lines) if kind == "auto" else kind


def _tokenize(records, tokenizers: tuple[str, str], seq2seq: bool) -> list[tuple[list[str] | None, list[str]]]:
    out = []
    for record in records:
        src = tokenize(record[0], tokenizers[0]) if seq2seq else None
        out.append((src, tokenize(record[-1], tokenizers[1])))
    return out


def _vocabs(train_tokens, tokenizers, options: CorpusOptions, seq2seq: bool) -> tuple[Vocab | None, Vocab]:
    sizes = {"min_freq": options.min_freq, "max_size": options.max_vocab}
    targets = [t for _, t in train_tokens]
    if not seq2seq:
        return None, Vocab.build(targets, tokenizers[1], **sizes)
    sources = [s for s, _ in train_tokens]
    if options.shared_vocab:
        joint = Vocab.build([*sources, *targets], tokenizers[1], **sizes)
        return Vocab(joint.tokens, tokenizers[0]), joint
    return Vocab.build(sources, tokenizers[0], **sizes), Vocab.build(targets, tokenizers[1], **sizes)


def _fits(src: list[str] | None, tgt: list[str], max_len: int) -> bool:
    return len(tgt) <= max_len and (src is None or 0 < len(src) <= max_len) and len(tgt) > 0


def _encode(tokens, src_vocab: Vocab | None, tgt_vocab: Vocab, max_len: int) -> tuple[list[Example], int]:
    examples, dropped = [], 0
    for src, tgt in tokens:
        if not _fits(src, tgt, max_len):
            dropped += 1
            continue
        examples.append(Example(tgt_vocab.encode(tgt), src_vocab.encode(src) if src is not None else None))
    return examples, dropped


def describe(corpus: Corpus) -> str:
    parts = [f"{len(corpus.train)} training / {len(corpus.valid)} held-out examples"]
    if corpus.src_vocab is not None:
        parts.append(f"source vocabulary {len(corpus.src_vocab)} ({corpus.src_vocab.tokenizer})")
    parts.append(f"target vocabulary {len(corpus.tgt_vocab)} ({corpus.tgt_vocab.tokenizer})")
    return ", ".join(parts)


def data_path(path: str | None) -> str | None:
    return None if path is None else str(Path(path).resolve())
