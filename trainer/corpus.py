"""From a data file or a synthetic task to encoded training and held-out examples with their vocabularies.

Vocabularies are built from the training split only (held-out tokens never seen in training read as unk).
Examples longer than `max_len` tokens on either side are left out of both splits and counted.

A classifier's data is `label<TAB>text` lines: the text is tokenized with the target-side tokenizer into
`tgt_vocab`, and the label set is the training split's labels, sorted; held-out lines whose label never
occurs in training are left out and counted.

A language model learns a synthetic task from prompts: each example's source and the task's separator, in the
one vocabulary, are its `prompt` (read, not scored), and its target is what it predicts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from blockgraph.common.errors import DataError, Problem
from blockgraph.trainer import data, subword, tasks
from blockgraph.trainer.batching import Example
from blockgraph.trainer.config import DataOptions
from blockgraph.trainer.specials import TRAINER_SPECIALS, Specials
from blockgraph.trainer.text import ModelText
from blockgraph.trainer.vocab import EOS_ID, SPECIALS, Vocab, check_tokenizer, guess_tokenizer, tokenize


@dataclass
class Corpus:
    """Encoded examples and what reads and writes their text: the run's vocabularies, or an imported model's
    tokenizers (`text`; the vocabularies are then None)."""

    train: list[Example]
    valid: list[Example]
    src_vocab: Vocab | None
    tgt_vocab: Vocab | None
    valid_refs: list[str]  # held-out targets as written, in the order of `valid` (for BLEU and chrF)
    notes: list[str] = field(default_factory=list)
    labels: list[str] | None = None  # a classifier's classes, in index order
    text: ModelText | None = None

    @property
    def specials(self) -> Specials:
        return self.text.specials if self.text is not None else TRAINER_SPECIALS

    def target_text(self, ids: list[int] | tuple[int, ...]) -> str:
        """The text of generated target ids."""
        if self.text is not None:
            return self.text.target.decode(ids)
        return self.tgt_vocab.decode_text(ids)  # type: ignore[union-attr]

    @property
    def bleu_tokenize(self) -> str:
        """sacrebleu's tokenization of the references: `zh` for Chinese targets, `13a` otherwise."""
        if self.tgt_vocab is not None:
            chinese = self.tgt_vocab.tokenizer == "chars"
        else:
            chinese = guess_tokenizer(self.valid_refs) == "chars"
        return "zh" if chinese else "13a"


def load(
    options: DataOptions,
    kind: str,
    *,
    shared_vocab: bool = False,
    vocabs: tuple[Vocab | None, Vocab] | None = None,
    labels: list[str] | None = None,
    text: ModelText | None = None,
) -> Corpus:
    """Read or generate the text, tokenize, build (or reuse) the vocabularies, encode and split.

    `kind` is the model's (seq2seq, lm or classify); `shared_vocab` builds one vocabulary of both sides;
    `text`: an imported model's tokenizers read the data instead (no vocabulary is built).
    """
    notes: list[str] = []
    if text is not None:
        return _load_with(text, options, kind == "seq2seq", notes)
    named = [f"--{flag} {value}" for flag, value in (("tokenizer", options.tokenizer),
             ("src-tokenizer", options.src_tokenizer), ("tgt-tokenizer", options.tgt_tokenizer))
             if value not in (None, "auto")]  # fmt: skip
    if options.subword_vocab is not None and vocabs is None and (options.task is not None or named):
        what = f"--task {options.task}" if options.task is not None else named[0]
        raise DataError(Problem(f"--subword-vocab learns the tokenizer from --data: leave out {what}"))
    if kind == "classify":
        return _load_labelled(options, vocabs[1] if vocabs is not None else None, labels, notes)
    seq2seq = kind == "seq2seq"
    train_text: Sequence[tuple[str, ...]]  # (source, target) pairs, or a target alone
    valid_text: Sequence[tuple[str, ...]]
    if options.task is not None:
        task_options = tasks.task_options(options.task_options, "the task options")
        train_text, valid_text = tasks.make_pairs(options.task, task_options, options.seed)
        tokenizers = ("space", "space")
    else:
        train_text, valid_text = _splits(options, seq2seq, notes, "pass --data FILE, or --task copy / --task reverse")
        if vocabs is not None:  # resuming: the sides tokenize as their vocabularies were built
            tokenizers = (vocabs[0].tokenizer if vocabs[0] is not None else "space", vocabs[1].tokenizer)
        else:
            tokenizers = (
                _tokenizer(options.source_tokenizer, [r[0] for r in train_text], options) if seq2seq else "space",
                _tokenizer(options.target_tokenizer, [r[-1] for r in train_text], options),
            )
    sources = seq2seq or options.task is not None  # a language model's task: the source is its prompt
    train_tokens = _tokenize(train_text, tokenizers, sources)
    valid_tokens = _tokenize(valid_text, tokenizers, sources)
    if vocabs is not None:
        src_vocab, tgt_vocab = vocabs
    elif options.task is not None:
        tokens = [*SPECIALS, *tasks.symbols(task_options, separator=not seq2seq)]
        src_vocab, tgt_vocab = (Vocab(tokens, "space") if seq2seq else None), Vocab(tokens, "space")
    else:
        src_vocab, tgt_vocab = _vocabs(train_tokens, tokenizers, options, seq2seq, shared_vocab)
    train, dropped = _encode(train_tokens, src_vocab, tgt_vocab, options.max_len)
    valid, dropped_valid = _encode(valid_tokens, src_vocab, tgt_vocab, options.max_len)
    if dropped or dropped_valid:
        notes.append(f"left out {dropped + dropped_valid} example(s) longer than --max-len {options.max_len}")
    if not train:
        raise DataError(Problem("no training examples left", hint="check the data and --max-len"))
    refs = [
        text[-1] for text, (src, tgt) in zip(valid_text, valid_tokens, strict=True) if _fits(src, tgt, options.max_len)
    ]
    return Corpus(train, valid, src_vocab, tgt_vocab, refs, notes)


def _load_labelled(options: DataOptions, vocab: Vocab | None, labels: list[str] | None, notes: list[str]) -> Corpus:
    if options.task is not None:
        raise DataError(
            Problem(f"--task {options.task} needs an encoder–decoder or a language-model spec, not a classifier")
        )
    if options.data is None:
        raise DataError(Problem("no training data", hint="pass --data FILE of label<TAB>text lines"))

    def read(path: str) -> list[tuple[str, ...]]:
        text = data.read_labelled(path, skip_bad=options.skip_bad_lines)
        if text.bad:
            notes.append(text.summary())
        return text.records

    records = read(options.data)
    if options.valid_data is not None:
        train_text, valid_text = records, read(options.valid_data)
    else:
        train_text, valid_text = data.split(records, options.valid_fraction, options.seed)
    if vocab is None:
        tokenizer = _tokenizer(options.target_tokenizer, [r[1] for r in train_text], options)
        vocab = Vocab.build(
            [tokenize(r[1], tokenizer) for r in train_text],
            tokenizer,
            min_freq=options.min_freq,
            max_size=options.max_vocab,
        )
    if labels is None:
        labels = sorted({r[0] for r in train_text})
    index = {label: i for i, label in enumerate(labels)}

    def encode(records: list[tuple[str, ...]]) -> tuple[list[Example], int, int]:
        examples, too_long, unknown = [], 0, 0
        for label, text in records:
            tokens = tokenize(text, vocab.tokenizer)
            if label not in index:
                unknown += 1
            elif not 0 < len(tokens) <= options.max_len:
                too_long += 1
            else:
                examples.append(Example(vocab.encode(tokens), label=index[label]))
        return examples, too_long, unknown

    train, too_long, unknown = encode(train_text)
    valid, too_long_valid, unknown_valid = encode(valid_text)
    if too_long or too_long_valid:
        notes.append(
            f"left out {too_long + too_long_valid} example(s) empty or longer than --max-len {options.max_len}"
        )
    if unknown or unknown_valid:
        notes.append(f"left out {unknown + unknown_valid} example(s) whose label is not among the training labels")
    if len(labels) < 2:
        raise DataError(
            Problem(
                f"the training data has {len(labels)} label(s) ({', '.join(labels) or 'none'}); a classifier needs 2+",
                hint="check the label<TAB>text lines of --data",
            )
        )
    if not train:
        raise DataError(Problem("no training examples left", hint="check the data and --max-len"))
    return Corpus(train, valid, None, vocab, [], notes, labels)


def _load_with(text: ModelText, options: DataOptions, seq2seq: bool, notes: list[str]) -> Corpus:
    """The data read by an imported model's tokenizers: a source as its tokenizer encodes it (eos included), a
    target as its ids without a final eos (the `Specials` frame it, as the model's own training did)."""
    given = [flag for flag, value in (("--task", options.task), ("--tokenizer", options.tokenizer != "auto" or None),
             ("--src-tokenizer", options.src_tokenizer), ("--tgt-tokenizer", options.tgt_tokenizer),
             ("--subword-vocab", options.subword_vocab), ("--max-vocab", options.max_vocab),
             ("--min-freq", options.min_freq != 1 or None)) if value is not None]  # fmt: skip
    if given:
        raise DataError(
            Problem(f"an imported model reads text with its own tokenizer and vocabulary: leave out {given[0]}")
        )
    train_text, valid_text = _splits(options, seq2seq, notes, "pass --data FILE")
    eos = text.specials.eos

    def target_ids(line: str) -> list[int]:
        ids = text.target.encode(line)
        return ids[:-1] if ids and ids[-1] == eos else ids

    def encode(records: list[tuple[str, ...]]) -> tuple[list[Example], list[str], int]:
        examples, refs, dropped = [], [], 0
        for record in records:
            src = text.source.encode(record[0]) if seq2seq and text.source is not None else None
            tgt = target_ids(record[-1]) if record[-1].strip() else []
            if not tgt or len(tgt) > options.max_len or (src is not None and not 0 < len(src) <= options.max_len):
                dropped += 1
                continue
            examples.append(Example(tgt, src))
            refs.append(record[-1])
        return examples, refs, dropped

    train, _, dropped = encode(train_text)
    valid, refs, dropped_valid = encode(valid_text)
    if dropped or dropped_valid:
        notes.append(f"left out {dropped + dropped_valid} example(s) empty or longer than --max-len {options.max_len}")
    if not train:
        raise DataError(Problem("no training examples left", hint="check the data and --max-len"))
    return Corpus(train, valid, None, None, refs, notes, text=text)


def fit_positions(corpus: Corpus, source: int | None, target: int | None) -> None:
    """Leave out the examples longer than the model reads (`source`, `target`: its most positions, None:
    unbounded), with a note: a learned position table has no row for them."""
    start = 0 if corpus.labels is not None else len(corpus.specials.start)  # a classifier's text has no bos

    def fits(example: Example) -> bool:
        src_ok = source is None or example.src is None or len(example.src) <= source
        return src_ok and (target is None or start + len(example.prompt or ()) + len(example.tgt) <= target)

    train = [e for e in corpus.train if fits(e)]
    keep = [fits(e) for e in corpus.valid]
    dropped = len(corpus.train) - len(train) + keep.count(False)
    if not dropped:
        return
    corpus.train = train
    corpus.valid = [e for e, kept in zip(corpus.valid, keep, strict=True) if kept]
    if corpus.valid_refs:
        corpus.valid_refs = [r for r, kept in zip(corpus.valid_refs, keep, strict=True) if kept]
    limits = ", ".join(f"{n} {side}" for side, n in (("source", source), ("target", target)) if n is not None)
    corpus.notes.append(f"left out {dropped} example(s) longer than the model's positions ({limits})")
    if not corpus.train:
        raise DataError(Problem("no training examples left", hint="the model's positions are fewer than the data's"))


def _splits(
    options: DataOptions, seq2seq: bool, notes: list[str], hint: str
) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """The training and held-out records: --data and --valid, or --data split."""
    if options.data is None:
        raise DataError(Problem("no training data", hint=hint))
    records = _read(options.data, seq2seq, options.skip_bad_lines, notes)
    if options.valid_data is not None:
        return records, _read(options.valid_data, seq2seq, options.skip_bad_lines, notes)
    return data.split(records, options.valid_fraction, options.seed)


def _read(path: str, seq2seq: bool, skip_bad: bool, notes: list[str]) -> list[tuple[str, ...]]:
    text = data.read_pairs(path, skip_bad=skip_bad) if seq2seq else data.read_lines(path, skip_bad=skip_bad)
    if text.bad:
        notes.append(text.summary())
    return text.records


def _tokenizer(kind: str, lines: list[str], options: DataOptions) -> str:
    """The side's tokenizer: subwords learned from its training lines, a guess (auto), or the one named."""
    if options.subword_vocab is not None:
        return subword.learn(lines, options.subword_vocab, options.subword_model)
    return guess_tokenizer(lines) if kind == "auto" else check_tokenizer(kind)


def _tokenize(records, tokenizers: tuple[str, str], sources: bool) -> list[tuple[list[str] | None, list[str]]]:
    out = []
    for record in records:
        src = tokenize(record[0], tokenizers[0]) if sources else None
        out.append((src, tokenize(record[-1], tokenizers[1])))
    return out


def _vocabs(train_tokens, tokenizers, options: DataOptions, seq2seq: bool, shared: bool) -> tuple[Vocab | None, Vocab]:
    sizes: dict[str, Any] = {"min_freq": options.min_freq, "max_size": options.max_vocab}
    targets = [t for _, t in train_tokens]
    if not seq2seq:
        return None, Vocab.build(targets, tokenizers[1], **sizes)
    sources = [s for s, _ in train_tokens]
    if shared:
        joint = Vocab.build([*sources, *targets], tokenizers[1], **sizes)
        return Vocab(joint.tokens, tokenizers[0]), joint
    return Vocab.build(sources, tokenizers[0], **sizes), Vocab.build(targets, tokenizers[1], **sizes)


def _fits(src: list[str] | None, tgt: list[str], max_len: int) -> bool:
    return len(tgt) <= max_len and (src is None or 0 < len(src) <= max_len) and len(tgt) > 0


def _encode(tokens, src_vocab: Vocab | None, tgt_vocab: Vocab, max_len: int) -> tuple[list[Example], int]:
    """Examples of the token pairs that fit; a source without a source vocabulary is a language model's prompt,
    followed by the task's separator."""
    examples, dropped = [], 0
    for src, tgt in tokens:
        if not _fits(src, tgt, max_len):
            dropped += 1
        elif src is None:
            examples.append(Example(tgt_vocab.encode(tgt)))
        elif src_vocab is None:
            examples.append(Example(tgt_vocab.encode(tgt), prompt=tgt_vocab.encode([*src, tasks.SEPARATOR])))
        else:
            examples.append(Example(tgt_vocab.encode(tgt), [*src_vocab.encode(src), EOS_ID]))
    return examples, dropped


def describe(corpus: Corpus) -> str:
    parts = [f"{len(corpus.train)} training / {len(corpus.valid)} held-out examples"]
    if corpus.src_vocab is not None:
        parts.append(f"source vocabulary {len(corpus.src_vocab)} ({corpus.src_vocab.tokenizer})")
    if corpus.labels is not None:
        if corpus.tgt_vocab is not None:
            parts.append(f"vocabulary {len(corpus.tgt_vocab)} ({corpus.tgt_vocab.tokenizer})")
        parts.append(
            f"{len(corpus.labels)} labels ({', '.join(corpus.labels[:8])}{', …' if len(corpus.labels) > 8 else ''})"
        )
        return ", ".join(parts)
    if corpus.tgt_vocab is None:
        return ", ".join([*parts, "the imported model's tokenizer"])
    parts.append(f"target vocabulary {len(corpus.tgt_vocab)} ({corpus.tgt_vocab.tokenizer})")
    return ", ".join(parts)
