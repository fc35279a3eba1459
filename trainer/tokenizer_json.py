"""tokenizer.json, the `tokenizers` library's format, read as data and checked where the library is not.

The library is Rust, and a file can make it abort the whole process (a Precompiled normalizer whose charsmap
declares a trie of 4 GiB: it asks for 8 GB at once), allocate without bound on every text (a template
post-processor of 10⁷ special ids) or panic, which Python sees as a `BaseException` (a template naming a
special token it lacks, a pre-tokenizer regex past Oniguruma's retry limit). So, before the library sees a file:

- it is parsed by the one bounded JSON reader (common.files.parse_json: no key twice, no number that
  overflows), and the library is handed that parse written out again: it reads what was checked;
- a Precompiled normalizer's charsmap is checked as the library indexes it: the trie it declares within its
  bytes, every step of the trie inside the array, every replacement inside its strings, starting on a
  character and at most REPLACEMENT bytes long;
- what the pipeline inserts into a text is bounded: a template names only special tokens it defines (and the
  sequence A, or A and B for pairs), each of at most SPECIAL_IDS ids with a token for each, in at most
  TEMPLATE_PIECES pieces; every string of the normalizer, pre-tokenizer, post-processor and decoder (a
  replacement, a prefix, a token) is at most INSERTED characters, a pattern at most PATTERN, a list (the
  steps of a Sequence) at most ITEMS long;

and every call into the library is common.native.guarded: a panic, on loading or on a text, is a located error.
So encoding costs what the text costs, a bounded factor of its length.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from blockgraph.common.errors import BlockgraphError, CheckpointError, DataError, Location, Problem
from blockgraph.common.files import FileKind, MiB, parse_json
from blockgraph.common.native import guarded

COMPONENTS = ("normalizer", "pre_tokenizer", "post_processor", "decoder")  # the pipeline around the model
CHARSMAP = 4 * MiB  # bytes of a Precompiled charsmap (T5's: 240 KB)
REPLACEMENT = 256  # bytes a charsmap may put in place of one character (NFKC's longest: 33)
SPECIAL_IDS = 16  # ids of one special token of a template
TEMPLATE_PIECES = 32  # pieces of one template
INSERTED = 256  # characters of a string the pipeline may insert into a text
PATTERN = 4096  # characters of a regex or literal the pipeline searches for
PATTERNS = {"Regex", "String"}  # the keys of a pattern's text
ITEMS = 64  # items of a list in the pipeline (the steps of a Sequence)


class TokenizerJson:
    """A checked tokenizer.json loaded by the library, truncation and padding off, no dropout: the ids of a text
    are its tokens', every time."""

    def __init__(self, data: bytes, path: Path, kind: FileKind):
        self.path = path
        parsed = parse_json(data, path, kind)
        if not isinstance(parsed, dict):
            raise self._refused("it is not a JSON object")
        check(parsed, self._refused)
        from tokenizers import Tokenizer

        text = json.dumps(parsed, ensure_ascii=False)
        with guarded(lambda failure: self._refused(f"the tokenizers library cannot read it ({failure})")):
            self._tokenizer = Tokenizer.from_str(text)
            dropout = getattr(self._tokenizer.model, "dropout", None)
            self._tokenizer.no_truncation()
            self._tokenizer.no_padding()
            self.unk = next((i for t in ("<unk>", "[UNK]") if (i := self._tokenizer.token_to_id(t)) is not None), None)
        if dropout:
            raise self._refused(f"it samples its pieces (BPE dropout {dropout})")

    def encode(self, text: str) -> list[int]:
        with guarded(lambda failure: self._failed("encode a text", failure)):
            return list(self._tokenizer.encode(text).ids)

    def unknown(self, text: str) -> list[str]:
        """The tokens of `text` the vocabulary lacks (its unk token's), made into strings only when there are any."""
        if self.unk is None:
            return []
        with guarded(lambda failure: self._failed("encode a text", failure)):
            found = self._tokenizer.encode(text)
            ids = found.ids
            return [t for t, i in zip(found.tokens, ids, strict=True) if i == self.unk] if self.unk in ids else []

    def decode(self, ids: Sequence[int]) -> str:
        with guarded(lambda failure: self._failed("decode the model's ids", failure)):
            return str(self._tokenizer.decode(list(ids), skip_special_tokens=True))

    @property
    def _where(self) -> Location:
        return Location(str(self.path))

    def _refused(self, why: str) -> CheckpointError:
        return CheckpointError(Problem(f"tokenizer.json is not a tokenizer blockgraph reads: {why}", self._where))

    def _failed(self, what: str, failure: str) -> DataError:
        return DataError(Problem(f"tokenizer.json cannot {what}: {failure} in the tokenizers library", self._where))


Refuse = Callable[[str], BlockgraphError]  # the error to raise, with why


def check(data: dict[str, Any], refuse: Refuse) -> None:
    """The pipeline of a parsed tokenizer.json within the bounds of the module notes."""
    for component in COMPONENTS:
        stack: list[tuple[str, Any]] = [(component, data.get(component))]
        while stack:
            key, node = stack.pop()
            if isinstance(node, dict):
                kind = node.get("type")
                if kind == "Precompiled":
                    _charsmap(node.get("precompiled_charsmap"), component, refuse)
                elif kind == "TemplateProcessing":
                    _template(node, component, refuse)
                    continue  # its strings and ids are checked
                stack.extend((k, v) for k, v in node.items() if k != "precompiled_charsmap")
            elif isinstance(node, list):
                if len(node) > ITEMS:  # a Sequence of a million normalizers runs a million passes on each text
                    raise refuse(f"its {component} holds a list of {len(node):,} items (at most {ITEMS})")
                stack.extend((key, item) for item in node)
            elif isinstance(node, str) and len(node) > (limit := PATTERN if key in PATTERNS else INSERTED):
                raise refuse(f"its {component} holds a {key} of {len(node):,} characters (at most {limit:,})")


def _template(node: dict[str, Any], component: str, refuse: Refuse) -> None:
    """A template post-processor: what it inserts is bounded, and everything it names is defined."""
    specials = node.get("special_tokens")
    if not isinstance(specials, dict):
        raise refuse(f"its {component} template has no mapping of special tokens")
    for name, entry in specials.items():
        ids = entry.get("ids") if isinstance(entry, dict) else None
        tokens = entry.get("tokens") if isinstance(entry, dict) else None
        well_formed = (
            isinstance(ids, list) and isinstance(tokens, list) and 0 < len(ids) == len(tokens) <= SPECIAL_IDS
            and all(type(i) is int and 0 <= i < 2**32 for i in ids)
            and all(isinstance(t, str) and len(t) <= INSERTED for t in (name, *tokens))
        )  # fmt: skip
        if not well_formed:
            raise refuse(
                f"a special token of its {component} template is not 1 to {SPECIAL_IDS} ids with a token for each"
            )
    for which, sequences in (("single", {"A"}), ("pair", {"A", "B"})):
        pieces = node.get(which)
        if not isinstance(pieces, list) or len(pieces) > TEMPLATE_PIECES:
            raise refuse(f"its {component} template {which} is not a list of at most {TEMPLATE_PIECES} pieces")
        for piece in pieces:
            kind, body = next(iter(piece.items())) if isinstance(piece, dict) and len(piece) == 1 else (None, None)
            named = body.get("id") if isinstance(body, dict) else None
            known = specials if kind == "SpecialToken" else sequences if kind == "Sequence" else ()
            if not isinstance(named, str) or named not in known:
                raise refuse(f"its {component} template {which} names a piece it does not define")


def _charsmap(text: object, component: str, refuse: Refuse) -> None:
    """A Precompiled normalizer's charsmap (see the module notes): [u32 trie size][trie: u32 units][strings]."""
    try:
        raw = base64.b64decode(text, validate=True) if isinstance(text, str) and len(text) <= CHARSMAP * 2 else None
    except (binascii.Error, ValueError):
        raw = None
    if raw is None or len(raw) > CHARSMAP:
        raise refuse(f"its {component}'s precompiled_charsmap is not base64 of at most {CHARSMAP // MiB} MiB")
    units = int.from_bytes(raw[:4], "little") // 4 if len(raw) >= 4 else 0
    if not units or 4 + 4 * units > len(raw):
        raise refuse(f"its {component}'s precompiled_charsmap declares a trie its bytes do not hold")
    strings = raw[4 + 4 * units :]
    try:
        strings.decode("utf-8")
    except UnicodeDecodeError:
        raise refuse(
            f"its {component}'s precompiled_charsmap replaces characters with text that is not UTF-8"
        ) from None
    parts = torch.frombuffer(bytearray(raw[4 : 4 + 4 * units]), dtype=torch.uint8).view(-1, 4).to(torch.int64)
    array = parts[:, 0] | parts[:, 1] << 8 | parts[:, 2] << 16 | parts[:, 3] << 24
    offset = (array >> 10) << ((array & (1 << 9)) >> 6)
    label = array & ((1 << 31) | 0xFF)
    stepped = (label >= 1) & (label <= 255)  # a unit a byte of a text can reach (the library checks the label)
    stepped[0] = True  # the root, where every search starts
    base = torch.arange(units) ^ offset  # where the next byte (or the leaf's value) is looked up
    if bool(((base[stepped] | 0xFF) >= units).any()):
        raise refuse(f"its {component}'s precompiled_charsmap has a trie that leads outside itself")
    leaves = (label >= 1) & (label <= 255) & ((array >> 8) & 1 == 1)
    values = array[base[leaves]] & ((1 << 31) - 1)  # where a replacement starts in the strings
    text_bytes = torch.frombuffer(bytearray(strings + b"\0"), dtype=torch.uint8)  # a NUL ends the last one too
    inside = bool((values < len(text_bytes)).all())
    if not inside or bool(((text_bytes[values] & 0xC0) == 0x80).any()):
        raise refuse(f"its {component}'s precompiled_charsmap has a replacement outside its characters")
    ends = torch.nonzero(text_bytes == 0).flatten()
    if bool((ends[torch.searchsorted(ends, values)] - values > REPLACEMENT).any()):
        raise refuse(f"its {component}'s precompiled_charsmap replaces a character by over {REPLACEMENT} bytes")
