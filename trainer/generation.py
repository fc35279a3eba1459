"""Translating and generating text with a trained checkpoint: sentences in, hypotheses out, batch by batch.

`Translator` reads sentences (sources of an encoder–decoder, prompts of a language model), encodes them with
the checkpoint's vocabularies, decodes them in batches (trainer.decode) and yields each sentence's hypotheses
as text, in the order of the input, as each batch is done. Sources of different lengths share a batch when the
model takes a source padding mask; otherwise, and for prompts (the target side has no padding while decoding),
a batch decodes the sentences of each length together, so that every result is the one the sentence gets alone.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from common.errors import DataError, Problem, UsageError
from common.text import excerpt
from trainer import checkpoint, decode
from trainer.batching import pad
from trainer.roles import Roles
from trainer.vocab import EOS_ID, UNK_ID, tokenize


@dataclass(frozen=True)
class Output:
    """One hypothesis as text, with its score (the length-normalized sum of log-probabilities)."""

    text: str
    score: float


@dataclass(frozen=True)
class Search:
    """How to choose the tokens: beam search (beam 1: greedy), or sampling."""

    beam: int = 1
    alpha: float = 0.0
    n_best: int = 1
    sampling: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None


@dataclass
class _Item:
    index: int
    ids: list[int]
    limit: int


class Translator:
    """A checkpoint ready to translate (an encoder–decoder) or to continue text (a language model)."""

    def __init__(
        self, saved: checkpoint.Checkpoint, *, compiled: bool = False, note: Callable[[str], None] | None = None
    ):
        self.saved = saved
        self.roles = Roles(**saved.info["roles"])
        self.model = saved.model.eval()
        self.note = note or (lambda text: None)
        if self.roles.kind == "classify":
            raise DataError(Problem("a classifier's checkpoint labels texts; it does not generate"))
        self.decoder = decode.Decoder(self.model, self.roles, compiled=compiled)
        if self.decoder.reason:
            self.note(f"decoding re-runs the whole model at every step: {self.decoder.reason}")
        self.src_most, self.tgt_most = decode.length_limits(self.model.typed_graph, self.roles)  # type: ignore[arg-type]
        self._capped = False

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        device: str = "cpu",
        tokenizers: tuple[str | None, str | None] = (None, None),
        compiled: bool = False,
        note: Callable[[str], None] | None = None,
    ) -> Translator:
        """The checkpoint at `path` (a run directory or its checkpoint/) on `device`."""
        return cls(checkpoint.load(path, device=device, tokenizers=tokenizers), compiled=compiled, note=note)

    @property
    def seq2seq(self) -> bool:
        return self.saved.src_vocab is not None

    def translate(
        self,
        sentences: Iterable[str],
        *,
        beam: int = 1,
        max_len: int | None = None,
        alpha: float = 0.0,
        n_best: int = 1,
        batch_size: int = 32,
    ) -> Iterator[list[Output]]:
        """Each sentence's hypotheses, best first (n_best of them), in input order. A language model continues
        the text: its output starts with the prompt. `max_len`: most new tokens (default: 2 × source + 10, or 50)."""
        return self._run(sentences, batch_size, max_len, Search(beam, alpha, n_best))

    def generate(
        self,
        prompts: Iterable[str],
        *,
        max_new: int = 50,
        beam: int = 1,
        alpha: float = 0.0,
        n_best: int = 1,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        batch_size: int = 32,
    ) -> Iterator[list[Output]]:
        """Continue each prompt by `max_new` tokens at most: greedily, with beam search, or sampling when a
        temperature, top_k or top_p is given (seeded by `seed`)."""
        sampling = temperature is not None or top_k is not None or top_p is not None
        if sampling and beam > 1:
            raise UsageError(Problem("sampling draws one continuation per prompt: give --beam or sampling, not both"))
        search = Search(beam, alpha, n_best, sampling, temperature or 1.0, top_k, top_p, seed)
        return self._run(prompts, batch_size, max_new, search)

    def _run(
        self, sentences: Iterable[str], batch_size: int, most: int | None, search: Search
    ) -> Iterator[list[Output]]:
        lines = iter(sentences)
        counter = itertools.count()
        while batch := [self._item(next(counter), s, most) for s in itertools.islice(lines, batch_size)]:
            done: dict[int, list[Output]] = {}
            for group in self._groups(batch):
                done.update(self._decode(group, search))
            for item in batch:
                yield done[item.index]

    def _item(self, index: int, sentence: str, most: int | None) -> _Item:
        """The sentence's ids (a source with eos, or a prompt) and its most new tokens."""
        side = self.saved.src_vocab if self.seq2seq else self.saved.tgt_vocab
        ids = side.encode_text(sentence)  # type: ignore[union-attr]
        if self.seq2seq:
            if not ids:
                raise DataError(Problem(f"nothing to translate in {excerpt(sentence)}"))
            if self.src_most is not None and len(ids) + 1 > self.src_most:
                raise DataError(
                    Problem(
                        f"{excerpt(sentence)} has {len(ids)} tokens; the model reads at most {self.src_most - 1}",
                        hint="split the sentence",
                    )
                )
            unknown = [t for t, i in zip(tokenize(sentence, side.tokenizer), ids, strict=True) if i == UNK_ID]  # type: ignore[union-attr]
            if unknown:
                self.note(f"not in the source vocabulary: {' '.join(unknown)}")
            return _Item(index, [*ids, EOS_ID], self._cap(most or 2 * len(ids) + 10, 0))
        return _Item(index, ids, self._cap(most or 50, len(ids)))

    def _cap(self, limit: int, prompt: int) -> int:
        """`limit`, or fewer tokens where the model's positions end (said once)."""
        if self.tgt_most is None:
            return limit
        room = self.tgt_most - prompt  # bos and the prompt, then all generated tokens but the last are read
        if room < 1:
            raise DataError(Problem(f"the prompt fills all {self.tgt_most} positions of the model", hint="shorten it"))
        if limit > room and not self._capped:
            self.note(f"outputs are capped at {room} tokens: the model has {self.tgt_most} positions")
            self._capped = True
        return min(limit, room)

    def _groups(self, batch: list[_Item]) -> list[list[_Item]]:
        """Sentences that may decode together: all sources when the model masks source padding, else by length."""
        if self.seq2seq and self.roles.src_pad is not None:
            return [batch]
        by_length: dict[int, list[_Item]] = {}
        for item in batch:
            by_length.setdefault(len(item.ids), []).append(item)
        return list(by_length.values())

    def _decode(self, group: list[_Item], search: Search) -> dict[int, list[Output]]:
        device = self.decoder.device
        limits = torch.tensor([item.limit for item in group])
        src = src_pad = prompt = None
        if self.seq2seq:
            src, src_pad = (t.to(device) for t in pad([item.ids for item in group]))
        elif group[0].ids:
            prompt = torch.tensor([item.ids for item in group], device=device)
        given = {"src": src, "src_pad": src_pad, "prompt": prompt, "rows": len(group), "max_len": limits}
        if search.sampling:
            options = {"temperature": search.temperature, "top_k": search.top_k, "top_p": search.top_p}
            found = [[h] for h in decode.sample(self.decoder, **given, **options, seed=search.seed)]
        elif search.beam == 1:
            found = [[h] for h in decode.greedy(self.decoder, **given)]
        else:
            n_best = min(search.n_best, search.beam)
            found = decode.beam_search(self.decoder, **given, beam=search.beam, alpha=search.alpha, n_best=n_best)
        vocab = self.saved.tgt_vocab
        out = {}
        for item, hypotheses in zip(group, found, strict=True):
            before = [] if self.seq2seq else item.ids  # a language model's output starts with its prompt
            texts = [Output(vocab.decode_text([*before, *h.tokens]), h.normalized) for h in hypotheses]
            out[item.index] = texts[: search.n_best]
        return out
