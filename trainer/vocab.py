"""Tokenizers and vocabularies: text ↔ tokens ↔ ids, with the special tokens pad, bos, eos and unk.

The tokenizers, chosen per side of the data:

- `chars`: one token per CJK character (Chinese, Japanese kana, Korean), runs of Latin letters or digits as one
  token, every other non-space character on its own; spaces are dropped. For Chinese.
- `words`: words (letters, digits, inner apostrophes and hyphens: `don't`, `well-known`) and single
  punctuation marks. For English and other space-separated languages.
- `space`: split on whitespace only (the synthetic tasks, pre-tokenized text).
- `spm-<hash>`: a SentencePiece model's pieces (trainer.subword): learned from the training data with
  `--subword-vocab N`, or given as a file, `--tokenizer FILE.model`; checkpoints carry the model.
- `MODULE:FUNCTION`: a Python callable `str -> list[str]` the user names (`--tokenizer mytok:split`). It is
  imported only because the user named it on the command line (or in the API) in this invocation: never
  from a spec, and never from a checkpoint, which only records the name (`resolve_tokenizer`); tokens are
  joined back with spaces.

`auto` picks `chars` when more than a third of the lines contain a CJK character, `words` otherwise.
"""

from __future__ import annotations

import importlib
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from blockgraph.common.errors import CheckpointError, DataError, Location, Problem
from blockgraph.common.text import excerpt
from blockgraph.trainer import subword

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

TOKENIZERS = ("chars", "words", "space")

_CJK = (
    "\u2e80-\u2fff\u3040-\u30ff\u3100-\u312f\u3190-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
    "\uac00-\ud7af\uf900-\ufaff\U00020000-\U0002fa1f"
)
_CJK_CHAR = re.compile(f"[{_CJK}]")
_CHARS = re.compile(f"[{_CJK}]|[^\\W_{_CJK}]+|\\S")
_WORDS = re.compile(r"[^\W_]+(?:['’\-][^\W_]+)*|\S")
_NO_SPACE_BEFORE = re.compile(r" ([.,!?;:%)\]}”’])")
_NO_SPACE_AFTER = re.compile(r"([(\[{“$]) ")


def is_custom(kind: str) -> bool:
    """Whether `kind` names a user tokenizer (`MODULE:FUNCTION`) rather than a built-in one."""
    return ":" in kind


def user_tokenizer(name: str) -> Callable[[str], list[str]]:
    """The callable `name` (`MODULE:FUNCTION`, dotted names allowed on both sides), imported on demand.

    A name that is malformed, a module that cannot be imported and a missing or non-callable function are
    user errors.
    """
    module_name, _, attr = name.partition(":")
    hint = "name a Python callable str -> list[str] as MODULE:FUNCTION, with MODULE importable (on sys.path)"
    if not module_name.strip() or not attr.strip() or ":" in attr:
        raise DataError(Problem(f"tokenizer {name!r} is not MODULE:FUNCTION", hint=hint))
    try:
        target: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise DataError(
            Problem(f"tokenizer {name!r}: no module named {exc.name or module_name!r}", hint=hint)
        ) from None
    except Exception as exc:  # the user's module is user code: report its crash, not ours
        raise DataError(
            Problem(f"tokenizer {name!r}: importing {module_name} failed: {type(exc).__name__}: {exc}", hint=hint)
        ) from None
    for part in attr.split("."):
        if not hasattr(target, part):
            raise DataError(Problem(f"tokenizer {name!r}: module {module_name} has no {attr!r}", hint=hint))
        target = getattr(target, part)
    if not callable(target):
        raise DataError(Problem(f"tokenizer {name!r}: {attr} is not callable", hint=hint))
    return target


def is_model_file(kind: str) -> bool:
    """Whether `kind` names a SentencePiece model file (`--tokenizer zh.model`)."""
    return kind.endswith((".model", ".spm")) and not is_custom(kind)


def check_tokenizer(kind: str, *, auto: bool = True) -> str:
    """The tokenizer `kind` names (built-in, `auto` when allowed, an importable MODULE:FUNCTION, a
    SentencePiece model file: its `spm-` kind)."""
    if is_model_file(kind):
        return subword.register_file(kind)
    if subword.is_subword(kind) and subword.known(kind):
        return kind
    if is_custom(kind):
        user_tokenizer(kind)
    elif kind not in TOKENIZERS and not (auto and kind == "auto"):
        choices = ", ".join([*TOKENIZERS, *(["auto"] if auto else [])])
        raise DataError(Problem(f"unknown tokenizer {kind!r}", hint=f"use one of {choices}, or MODULE:FUNCTION"))
    return kind


def resolve_tokenizer(saved: str, given: str | None, where: Location, field: str) -> str:
    """The tokenizer for data saved with the tokenizer `saved`: `given` if the user names one now, else `saved`.

    A checkpoint is data: a user tokenizer (MODULE:FUNCTION) recorded in it is imported only when the user
    names it again, so that opening a downloaded checkpoint never runs code it names.
    """
    if given is not None:
        return check_tokenizer(given, auto=False)
    if is_custom(saved):
        raise CheckpointError(
            Problem(
                f"this checkpoint was trained with the user tokenizer {excerpt(saved, 80)}, which is Python code "
                "that blockgraph imports only when you name it",
                where,
                hint=f"pass --tokenizer {saved} to use it again (if you trust that module), or another tokenizer",
            )
        )
    if subword.is_subword(saved) and not subword.known(saved):
        raise CheckpointError(
            Problem(f"field {field}: a subword tokenizer whose model the checkpoint does not hold", where)
        )
    if saved not in TOKENIZERS and not subword.is_subword(saved):
        raise CheckpointError(
            Problem(
                f"field {field}: not a tokenizer this blockgraph has", where, hint=f"one of {', '.join(TOKENIZERS)}"
            )
        )
    return saved


def tokenize(text: str, kind: str) -> list[str]:
    """`text` split into tokens by the tokenizer `kind` (chars, words, space, spm-<hash> or MODULE:FUNCTION)."""
    if kind == "chars":
        return _CHARS.findall(text)
    if kind == "words":
        return _WORDS.findall(text)
    if kind == "space":
        return text.split()
    if subword.is_subword(kind):
        return subword.pieces(text, kind)
    if is_custom(kind):
        try:
            tokens = user_tokenizer(kind)(text)
        except DataError:
            raise
        except Exception as exc:  # the user's code: its failure is reported as theirs, with its own words
            raise DataError(
                Problem(
                    f"tokenizer {kind!r} failed: {type(exc).__name__}: {excerpt(str(exc), 200)}",
                    hint="it is your code (--tokenizer MODULE:FUNCTION): fix it, or name another tokenizer",
                )
            ) from None
        if not isinstance(tokens, list | tuple) or not all(isinstance(t, str) for t in tokens):
            raise DataError(
                Problem(f"tokenizer {kind!r} returned {type(tokens).__name__} for {text[:40]!r}, not a list of strings")
            )
        return [t for t in tokens if t]
    raise ValueError(f"unknown tokenizer {kind!r}; use one of {', '.join(TOKENIZERS)}")


def detokenize(tokens: Sequence[str], kind: str) -> str:
    """Tokens joined back into text: no spaces between characters (`chars`), spaces mended around punctuation,
    subwords decoded by their model."""
    if subword.is_subword(kind):
        return subword.join(tokens, kind)
    if kind == "chars":
        out = ""
        for token in tokens:
            if (
                out
                and _is_word(out[-1])
                and _is_word(token[0])
                and not (_CJK_CHAR.match(token) or _CJK_CHAR.match(out[-1]))
            ):
                out += " "
            out += token
        return out
    text = " ".join(tokens)
    if kind == "words":
        text = _NO_SPACE_AFTER.sub(r"\1", _NO_SPACE_BEFORE.sub(r"\1", text))
    return text


def _is_word(char: str) -> bool:
    return char.isalnum()


def guess_tokenizer(lines: Iterable[str]) -> str:
    """`chars` when more than a third of the (first 1000) lines hold a CJK character, else `words`."""
    sample = [line for _, line in zip(range(1000), lines, strict=False)]
    cjk = sum(1 for line in sample if _CJK_CHAR.search(line))
    return "chars" if sample and cjk * 3 > len(sample) else "words"


@dataclass
class Vocab:
    """Tokens ↔ ids. Ids 0-3 are always pad, bos, eos, unk; then tokens by decreasing frequency (ties by text)."""

    tokens: list[str]
    tokenizer: str = "space"
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if tuple(self.tokens[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a vocabulary starts with {', '.join(SPECIALS)}")
        self.index = {token: i for i, token in enumerate(self.tokens)}

    @classmethod
    def build(
        cls, sentences: Iterable[Sequence[str]], tokenizer: str, *, min_freq: int = 1, max_size: int | None = None
    ) -> Vocab:
        """A vocabulary of the tokens seen at least `min_freq` times, the `max_size` most frequent at most."""
        counts = Counter(token for sentence in sentences for token in sentence)
        ranked = sorted(
            (t for t, c in counts.items() if c >= min_freq and t not in SPECIALS), key=lambda t: (-counts[t], t)
        )
        if max_size is not None:
            ranked = ranked[: max(0, max_size - len(SPECIALS))]
        return cls([*SPECIALS, *ranked], tokenizer)

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, tokens: Sequence[str]) -> list[int]:
        return [self.index.get(token, UNK_ID) for token in tokens]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Ids → tokens, stopping at the first eos and leaving out pad and bos; unknown ids read as unk."""
        out = []
        for i in ids:
            if i == EOS_ID:
                break
            if i in (PAD_ID, BOS_ID):
                continue
            out.append(self.tokens[i] if 0 <= i < len(self.tokens) else UNK)
        return out

    def encode_text(self, text: str) -> list[int]:
        return self.encode(tokenize(text, self.tokenizer))

    def decode_text(self, ids: Iterable[int]) -> str:
        return detokenize(self.decode(ids), self.tokenizer)

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {"tokenizer": self.tokenizer, "tokens": self.tokens}
        if subword.is_subword(self.tokenizer):
            record["subword"] = subword.serialized(self.tokenizer)
        return record
