"""Translating and generating text with a trained or imported model: sentences in, hypotheses out, by batch.

`Translator` reads sentences (sources of an encoder–decoder, prompts of a language model), encodes them with
the model's text sides (a checkpoint's vocabularies, a pretrained model's tokenizers), decodes them in
batches (trainer.decode) and yields each sentence's hypotheses as text, in the order of the input, as each
batch is done. Sources of different lengths share a batch when the model takes a source padding mask;
otherwise, and for prompts (the target side has no padding while decoding), a batch decodes the sentences of
each length together, so that every result is the one the sentence gets alone. A model whose source is float
features (Whisper's log-mel spectrograms) decodes them into text instead (`decode_features`).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from blockgraph.builder import precision as precisions
from blockgraph.builder.model import GraphModel
from blockgraph.common.errors import CheckpointError, DataError, Location, Problem, UsageError
from blockgraph.common.text import excerpt
from blockgraph.trainer import attention_maps, checkpoint, decode, fits
from blockgraph.trainer.batching import pad
from blockgraph.trainer.roles import Roles
from blockgraph.trainer.text import TextSide


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


def _check_search(search: Search, most: int | None) -> None:
    if most is not None and most < 1:
        raise UsageError(Problem(f"the most new tokens must be at least 1, not {most}"))
    if search.n_best < 1 or search.beam < 1:
        raise UsageError(Problem("--beam and --n-best are at least 1"))
    if search.n_best > search.beam:
        raise UsageError(
            Problem(f"--n-best {search.n_best} needs a beam at least as wide", hint=f"add --beam {search.n_best}")
        )


@dataclass
class _Item:
    index: int
    ids: list[int]
    limit: int


class Translator:
    """A model ready to translate (an encoder–decoder) or to continue text (a language model)."""

    def __init__(
        self,
        model: GraphModel,
        roles: Roles,
        target: TextSide,
        source: TextSide | None = None,
        *,
        specials: decode.Specials = decode.TRAINER_SPECIALS,
        compiled: bool = False,
        precision: str = "float32",
        note: Callable[[str], None] | None = None,
    ):
        self.note = note or (lambda text: None)
        if roles.kind == "classify":
            raise DataError(Problem("a classifier's checkpoint labels texts; it does not generate"))
        device = next(iter(model.state_dict().values())).device
        precisions.check(precision, device)
        if precision != "float32":
            model = precisions.apply(model, precision)
            self.note(f"decoding in {precision}" + (" (int8 Linear weights)" if precision == "int8" else ""))
        self.roles, self.model, self.source, self.target = roles, model.eval(), source, target
        self.decoder = decode.Decoder(self.model, self.roles, specials=specials, compiled=compiled)
        if self.decoder.reason:
            self.note(f"decoding re-runs the whole model at every step: {self.decoder.reason}")
        self._capped = False
        self.guard = fits.DecodingGuard(self.decoder)
        fed = model.typed_graph.graph.inputs.get(roles.src or "")
        self.features = fed is not None and fed.torch_dtype.is_floating_point  # audio in, not text

    @classmethod
    def of_checkpoint(
        cls,
        saved: checkpoint.Checkpoint,
        *,
        compiled: bool = False,
        precision: str = "float32",
        note: Callable[[str], None] | None = None,
    ) -> Translator:
        if saved.tgt_vocab is None:
            raise CheckpointError(
                Problem(
                    "this checkpoint fine-tuned an imported model: its tokenizer reads the text",
                    Location(str(saved.path)),
                    hint="load it with trainer.pretrained.load",
                )
            )
        source = TextSide.of_vocab(saved.src_vocab, source=True) if saved.src_vocab is not None else None
        target = TextSide.of_vocab(saved.tgt_vocab, source=False)
        roles = Roles(**saved.info["roles"])
        return cls(saved.model, roles, target, source, compiled=compiled, precision=precision, note=note)

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        device: str = "cpu",
        tokenizers: tuple[str | None, str | None] = (None, None),
        compiled: bool = False,
        precision: str = "float32",
        note: Callable[[str], None] | None = None,
    ) -> Translator:
        """The checkpoint at `path` (a run directory or its checkpoint/) on `device`, decoding in `precision`."""
        precisions.check(precision, device)  # before the checkpoint is read
        saved = checkpoint.load(path, device=device, tokenizers=tokenizers)
        return cls.of_checkpoint(saved, compiled=compiled, precision=precision, note=note)

    @property
    def seq2seq(self) -> bool:
        return self.source is not None

    def translate(
        self,
        sentences: Iterable[str],
        *,
        beam: int = 1,
        max_len: int | None = None,
        alpha: float = 0.0,
        n_best: int = 1,
        batch_size: int = 32,
        window: int = 1,
    ) -> Iterator[list[Output]]:
        """Each sentence's hypotheses, best first (n_best of them), in input order. A language model continues
        the text: its output starts with the prompt. `max_len`: most new tokens (default: 2 × source + 10, or 50).
        `window`: batches read ahead and sorted by length (1: each batch is printed before the next is read)."""
        return self._run(sentences, batch_size, max_len, Search(beam, alpha, n_best), window)

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
        window: int = 1,
    ) -> Iterator[list[Output]]:
        """Continue each prompt by `max_new` tokens at most: greedily, with beam search, or sampling when a
        temperature, top_k or top_p is given (seeded by `seed`)."""
        sampling = temperature is not None or top_k is not None or top_p is not None
        if sampling and beam > 1:
            raise UsageError(Problem("sampling draws one continuation per prompt: give --beam or sampling, not both"))
        if sampling:
            try:
                decode.check_sampling(temperature or 1.0, top_k, top_p)
            except ValueError as exc:
                raise UsageError(Problem(str(exc))) from None
        search = Search(beam, alpha, n_best, sampling, temperature or 1.0, top_k, top_p, seed)
        return self._run(prompts, batch_size, max_new, search, window)

    def decode_features(
        self,
        features: torch.Tensor,
        *,
        beam: int = 1,
        max_len: int | None = None,
        alpha: float = 0.0,
        n_best: int = 1,
        batch_size: int = 32,
    ) -> Iterator[list[Output]]:
        """Each utterance of `features` ([utterances, …], the model's float source: Whisper's mel × frames) decoded
        into text from the decoder's start token, greedily or with beam search, its hypotheses best first.
        `max_len`: most new tokens (default: as many as the model's positions allow, else 200)."""
        search = Search(beam, alpha, n_best)
        _check_search(search, max_len)
        if not self.features:
            raise UsageError(Problem("this model reads text, not float features", hint="give it sentences"))
        most = self._cap(max_len or self.decoder.most_new(0) or 200, 0)
        dtype = next(p.dtype for p in self.model.parameters() if p.is_floating_point())
        for start in range(0, features.size(0), batch_size):
            rows = features[start : start + batch_size].to(self.decoder.device, dtype)
            self.guard.check(
                sentences=rows.size(0), rows=rows.size(0) * beam, src_len=None, prompt=0, most=most,
                features=tuple(rows.shape[1:]),
            )  # fmt: skip
            given: dict[str, Any] = {
                "src": rows,
                "src_pad": None,
                "prompt": None,
                "rows": rows.size(0),
                "max_len": most,
            }
            for hypotheses in self._search(given, search, None):
                yield [Output(self.target.decode(list(h.tokens)), h.normalized) for h in hypotheses[:n_best]]

    def attention(
        self, sentences: Iterable[str], *, beam: int = 1, max_len: int | None = None, alpha: float = 0.0
    ) -> Iterator[attention_maps.SentenceAttention]:
        """Each sentence's best translation (as `translate` gives it) with the cross-attention weights of every
        attention node of the model, from one teacher-forced run on the source and that translation
        (trainer.attention_maps); the decoding itself is unchanged."""
        search = Search(beam, alpha)
        _check_search(search, max_len)
        if not self.seq2seq or self.features:
            raise UsageError(Problem("attention maps show how a translation attends its source: this model has none"))
        assert self.source is not None
        for index, sentence in enumerate(sentences):
            item = self._item(index, sentence, max_len)
            if not item.ids:
                yield attention_maps.SentenceAttention([], [], "", [])
                continue
            src, src_pad = (t.to(self.decoder.device) for t in pad([item.ids], self.decoder.specials.fill))
            given = {"src": src, "src_pad": src_pad, "prompt": None, "rows": 1, "max_len": item.limit}
            self._fits([item], search, src, None)
            tokens = list(self._search(given, search, None)[0][0].tokens)
            read = torch.tensor([tokens[:-1]], dtype=torch.long, device=self.decoder.device)
            tgt = torch.cat((self.decoder.begin(None, 1), read), dim=1)
            tgt_pad = torch.zeros_like(tgt, dtype=torch.bool) if self.decoder.pad_required else None
            run = functools.partial(self.decoder.io, self.model, tgt, src, src_pad, tgt_pad)
            maps = attention_maps.capture(self.model, run)
            if not maps:
                raise UsageError(
                    Problem("this model has no attention node whose weights can be drawn (multi_head_attention "
                            "across to the source, global_attention, hard_attention, local_attention)")
                )  # fmt: skip
            yield attention_maps.SentenceAttention(
                [self._token(self.source, i) for i in item.ids],
                [self._token(self.target, i) for i in tokens],
                self.target.decode(tokens),
                maps,
            )

    def _token(self, side: TextSide, token: int) -> str:
        """A token id as a label: its text, or a name for the end mark and for ids that read as nothing."""
        return "</s>" if token == self.decoder.specials.eos else side.decode([token]) or f"<{token}>"

    def _run(
        self, sentences: Iterable[str], batch_size: int, most: int | None, search: Search, window: int
    ) -> Iterator[list[Output]]:
        """Decode `window` batches' worth of sentences at a time, sorted by length so that a batch pads little
        and its rows finish together; each sentence's hypotheses come out in input order."""
        _check_search(search, most)
        if self.features:
            raise UsageError(
                Problem(
                    f"this model reads float features ({self.roles.src!r}), not text",
                    hint="decode a file of them: blockgraph translate MODEL --features FILE.npy",
                )
            )
        lines = iter(sentences)
        counter = itertools.count()
        generator = decode.seeded(search.seed, self.decoder.device) if search.sampling else None
        while chunk := [self._item(next(counter), s, most) for s in itertools.islice(lines, batch_size * window)]:
            done: dict[int, list[Output]] = {}
            by_length = sorted((item for item in chunk if item.ids or not self.seq2seq), key=lambda i: len(i.ids))
            for start in range(0, len(by_length), batch_size):
                for group in self._groups(by_length[start : start + batch_size]):
                    done.update(self._decode(group, search, generator))
            for item in chunk:
                yield done.get(item.index, [Output("", 0.0)])  # an empty source: an empty line

    def _item(self, index: int, sentence: str, most: int | None) -> _Item:
        """The sentence's ids (a source, or a prompt) and its most new tokens."""
        side = self.source or self.target
        ids = side.encode(sentence)
        unknown = side.unknown(sentence)
        if unknown:
            self.note(f"not in the {'source ' if self.seq2seq else ''}vocabulary: {' '.join(unknown)}")
        if self.seq2seq:
            if not sentence.strip():
                return _Item(index, [], 0)
            src_most = self.decoder.source_positions
            if src_most is not None and len(ids) > src_most:
                raise DataError(
                    Problem(
                        f"sentence {index + 1} ({excerpt(sentence)}) has {len(ids)} tokens (its end marks "
                        f"included); the model reads at most {src_most}",
                        hint="split the sentence",
                    )
                )
            return _Item(index, ids, self._cap(2 * len(ids) + 8 if most is None else most, 0))
        if not ids and not self.decoder.specials.start:
            raise DataError(Problem(f"prompt {index + 1} is empty, and this model has no start token to continue from"))
        return _Item(index, ids, self._cap(50 if most is None else most, len(ids)))

    def _cap(self, limit: int, prompt: int) -> int:
        """`limit`, or fewer tokens where the model's positions end (said once)."""
        room = self.decoder.most_new(prompt)
        if room is None:
            return limit
        if room < 1:
            raise DataError(
                Problem(f"the prompt fills all {self.decoder.positions} positions of the model", hint="shorten it")
            )
        if limit > room and not self._capped:
            self.note(f"outputs are capped at {room} tokens: the model has {self.decoder.positions} positions")
            self._capped = True
        return min(limit, room)

    def _groups(self, batch: list[_Item]) -> list[list[_Item]]:
        """Sentences that may decode together: all sources when the model masks source padding, else by length
        (none when every source of the batch was empty)."""
        if self.seq2seq and self.roles.src_pad is not None:
            return [batch] if batch else []
        by_length: dict[int, list[_Item]] = {}
        for item in batch:
            by_length.setdefault(len(item.ids), []).append(item)
        return list(by_length.values())

    def _fits(self, group: list[_Item], search: Search, src: torch.Tensor | None, prompt: torch.Tensor | None) -> None:
        """Refuse a batch whose decoding would not fit in the memory left (trainer.fits), before decoding it."""
        self.guard.check(
            sentences=len(group), rows=len(group) * (1 if search.sampling else search.beam),
            src_len=src.size(1) if src is not None else None, prompt=prompt.size(1) if prompt is not None else 0,
            most=max(item.limit for item in group),
        )  # fmt: skip

    def _decode(self, group: list[_Item], search: Search, generator: torch.Generator | None) -> dict[int, list[Output]]:
        device = self.decoder.device
        limits = torch.tensor([item.limit for item in group])
        src = src_pad = prompt = None
        if self.seq2seq:
            src, src_pad = (t.to(device) for t in pad([item.ids for item in group], self.decoder.specials.fill))
        elif group[0].ids:
            prompt = torch.tensor([item.ids for item in group], device=device)
        given: dict[str, Any] = {
            "src": src,
            "src_pad": src_pad,
            "prompt": prompt,
            "rows": len(group),
            "max_len": limits,
        }
        self._fits(group, search, src, prompt)
        found = self._search(given, search, generator)
        out = {}
        for item, hypotheses in zip(group, found, strict=True):
            before = [] if self.seq2seq else item.ids  # a language model's output starts with its prompt
            texts = [Output(self.target.decode([*before, *h.tokens]), h.normalized) for h in hypotheses]
            out[item.index] = texts[: search.n_best]
        return out

    def _search(
        self, given: dict[str, Any], search: Search, generator: torch.Generator | None
    ) -> list[list[decode.Hypothesis]]:
        """Each row's hypotheses, by sampling, greedily or by beam search."""
        if search.sampling:
            options: dict[str, Any] = {"temperature": search.temperature, "top_k": search.top_k, "top_p": search.top_p}
            found = [[h] for h in decode.sample(self.decoder, **given, **options, generator=generator)]
        elif search.beam == 1:
            found = [[h] for h in decode.greedy(self.decoder, **given)]
        else:
            found = decode.beam_search(
                self.decoder, **given, beam=search.beam, alpha=search.alpha, n_best=search.n_best
            )
        return found
