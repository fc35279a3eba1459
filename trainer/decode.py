"""Greedy decoding, beam search and sampling over whole batches, each step computing only the new positions.

A `Decoder` runs the model through its step program (builder.incremental): the source is encoded once per
batch, and every step feeds only the newest token of every row; a model with a block that cannot step re-runs
on the prefix instead (`Decoder.reason` says why), with the same results. The first step reads the start
tokens (bos for the trainer's vocabularies, a pretrained model's decoder start) and the prompt (a language
model's prefix) at once. The `Specials` say which ids start, end (eos) and are never generated (pad, bos).

A hypothesis' score is the sum of the model's log-probabilities of its tokens, eos included. Beam search keeps
the `beam` best unfinished hypotheses of every sentence; a candidate among the `beam` best of the step that
ends with eos (or reaches the sentence's `max_len`) is put aside as finished, so a beam of 1 is exactly greedy
decoding. Without a length penalty a sentence stops as soon as its `n_best`-th best finished score is at least
its best unfinished one (scores only fall as hypotheses grow, so nothing better can come); with a GNMT length
penalty α (score / ((5 + length) / 6)^α), once `max(beam, n_best)` hypotheses have finished. The sentences of a
batch search side by side in one tensor of batch × beam rows; a sentence that is done leaves the batch.

Sampling draws each token from softmax(log p / temperature), restricted to the `top_k` most likely tokens and
to the smallest set whose probability reaches `top_p`, from a seeded generator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from blockgraph.builder.incremental import DecodeState, step_program
from blockgraph.builder.model import GraphModel
from blockgraph.builder.shapes import TypedGraph, largest
from blockgraph.trainer.roles import ModelIO, Roles
from blockgraph.trainer.specials import TRAINER_SPECIALS, Specials


@dataclass(frozen=True)
class Hypothesis:
    tokens: tuple[int, ...]  # generated ids, eos included when it was generated
    score: float  # sum of log-probabilities
    normalized: float  # score with the length penalty applied (= score when α = 0)


class Decoder:
    """A model ready to decode: its roles, its step program, and its output read as log-probabilities."""

    def __init__(
        self, model: GraphModel, roles: Roles, *, specials: Specials = TRAINER_SPECIALS, compiled: bool = False
    ):
        self.model, self.roles, self.io, self.specials = model, roles, ModelIO(roles), specials
        graph = model.typed_graph.graph
        pad = roles.tgt_pad
        self.pad_required = pad is not None and not graph.inputs[pad].optional
        growing = [roles.tgt] + ([pad] if pad is not None else [])
        self.program = step_program(model, growing, roles.output, compiled=compiled)
        self.device = next(iter(model.state_dict().values())).device
        # the longest source and target the model's blocks allow (None: unbounded)
        self.source_positions, self.positions = length_limits(model.typed_graph, roles)

    @property
    def reason(self) -> str | None:
        """Why the model is re-run at every step (a block that cannot step), or None."""
        return self.program.reason

    def start(self, src: torch.Tensor | None, src_pad: torch.Tensor | None, capacity: int) -> DecodeState:
        """Encode the batch's sources once; `capacity`: the most target positions the decoding will reach (the
        last token generated is never read: at most the model's positions + 1)."""
        if self.positions is not None and capacity - 1 > self.positions:
            raise ValueError(
                f"the model reads at most {self.positions} target positions; this decoding would read {capacity - 1}"
                " (lower max_len)"
            )
        fixed = {}
        if self.roles.src is not None:
            fixed[self.roles.src] = src
        if self.roles.src_pad is not None:
            fixed[self.roles.src_pad] = src_pad
        return self.program.start(capacity, **fixed)

    def next_log_probs(self, state: DecodeState, tokens: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of the token after `tokens` [rows, new] (appended to the state) → [rows, vocab]."""
        growing = {self.roles.tgt: tokens}
        if self.pad_required:
            growing[self.roles.tgt_pad] = torch.zeros_like(tokens, dtype=torch.bool)  # type: ignore[index]
        log_probs = self.io.log_probs(self.program.step(state, **growing)[:, -1])
        log_probs[:, list(self.specials.never)] = float("-inf")
        return log_probs

    def most_new(self, prompt: int) -> int | None:
        """The most tokens the model's positions leave after a prompt of `prompt` tokens (None: unbounded); the
        start tokens, the prompt and every generated token but the last are read."""
        return None if self.positions is None else self.positions - prompt - len(self.specials.start) + 1

    def begin(self, prompt: torch.Tensor | None, rows: int) -> torch.Tensor:
        """The start tokens, then the prompt's ([rows, p], the same length for every row): what the first step reads."""
        start = torch.tensor([self.specials.start] * rows, dtype=torch.long, device=self.device).view(rows, -1)
        begin = start if prompt is None else torch.cat((start, prompt.to(self.device)), dim=1)
        if begin.size(1) == 0:
            raise ValueError("nothing to decode from: this model has no start token, give a prompt")
        return begin


def length_limits(typed: TypedGraph, roles: Roles) -> tuple[int | None, int | None]:
    """The longest source and target (in tokens, bos/eos included) the model's blocks allow, where bounded."""

    def most(name: str | None) -> int | None:
        shape = typed.graph.inputs[name].shape if name is not None else []
        return largest(typed, shape[-1]) if shape and isinstance(shape[-1], str) else None

    return most(roles.src), most(roles.tgt)


def length_penalty(length: int, alpha: float) -> float:
    return ((5 + length) / 6) ** alpha if alpha else 1.0


def _limits(max_len: int | torch.Tensor, rows: int, device: torch.device) -> torch.Tensor:
    """Each row's most generated tokens, [rows]."""
    if isinstance(max_len, int):
        limits = torch.full((rows,), max_len, dtype=torch.long, device=device)
    else:
        limits = max_len.to(device=device, dtype=torch.long)
    if bool((limits < 1).any()):
        raise ValueError("max_len must be at least 1 for every row")
    return limits


def _rows(src: torch.Tensor | None, prompt: torch.Tensor | None, rows: int) -> int:
    return src.shape[0] if src is not None else prompt.shape[0] if prompt is not None else rows


@torch.no_grad()
def greedy(
    decoder: Decoder,
    src: torch.Tensor | None = None,
    src_pad: torch.Tensor | None = None,
    *,
    max_len: int | torch.Tensor = 100,
    prompt: torch.Tensor | None = None,
    rows: int = 1,
) -> list[Hypothesis]:
    """The most likely next token each step, for every row of a padded batch of sources (or of prompts)."""
    return _pick(decoder, src, src_pad, max_len, prompt, rows, lambda log_probs: log_probs.argmax(dim=-1))


@torch.no_grad()
def sample(
    decoder: Decoder,
    src: torch.Tensor | None = None,
    src_pad: torch.Tensor | None = None,
    *,
    max_len: int | torch.Tensor = 100,
    prompt: torch.Tensor | None = None,
    rows: int = 1,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> list[Hypothesis]:
    """A token drawn from the (filtered) distribution each step; scores are the model's own log-probabilities.

    The draws come from `generator` (so that batch after batch continues one stream), else one seeded by `seed`.
    """
    check_sampling(temperature, top_k, top_p)
    generator = generator or seeded(seed, decoder.device)

    def draw(log_probs: torch.Tensor) -> torch.Tensor:
        logits = log_probs / temperature
        if top_k is not None and top_k < logits.size(-1):
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p is not None and top_p < 1.0:
            ordered, order = logits.sort(dim=-1, descending=True)
            probs = ordered.softmax(-1)
            above = probs.cumsum(-1) - probs  # the probability of the tokens ranked higher
            drop = torch.zeros_like(above, dtype=torch.bool).scatter(-1, order, above >= top_p)
            logits = logits.masked_fill(drop, float("-inf"))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)

    return _pick(decoder, src, src_pad, max_len, prompt, rows, draw)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError for settings that leave nothing to sample from."""
    if temperature <= 0:
        raise ValueError("temperature must be above 0 (for the most likely token, decode greedily)")
    if top_k is not None and top_k < 1:
        raise ValueError("top_k must be at least 1")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError("top_p must be above 0 and at most 1")


def seeded(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded by `seed`, or freshly when None."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def _pick(
    decoder: Decoder,
    src: torch.Tensor | None,
    src_pad: torch.Tensor | None,
    max_len: int | torch.Tensor,
    prompt: torch.Tensor | None,
    rows: int,
    choose: Callable[[torch.Tensor], torch.Tensor],
) -> list[Hypothesis]:
    """One token per row per step, by `choose(log_probs) → tokens`; a finished row leaves the batch."""
    n = _rows(src, prompt, rows)
    device = decoder.device
    limits = _limits(max_len, n, device)
    begin = decoder.begin(prompt, n)
    state = decoder.start(src, src_pad, capacity=begin.size(1) + int(limits.max()))
    log_probs = decoder.next_log_probs(state, begin)
    tokens = torch.full((n, int(limits.max())), -1, dtype=torch.long, device=device)  # -1: nothing generated
    scores = torch.zeros(n, dtype=torch.float64, device=device)
    active = torch.arange(n, device=device)  # the rows still generating, by their index in the batch
    for step in range(int(limits.max())):
        token = choose(log_probs)
        tokens[active, step] = token
        scores[active] += log_probs.gather(1, token[:, None]).squeeze(1).double()
        going = (token != decoder.specials.eos) & (limits[active] > step + 1)
        if not bool(going.any()):
            break
        if not bool(going.all()):
            kept = going.nonzero().squeeze(1)
            state.reorder(kept)
            active, token = active[kept], token[kept]
        log_probs = decoder.next_log_probs(state, token[:, None])
    return [
        Hypothesis(tuple(t for t in row if t >= 0), score, score)
        for row, score in zip(tokens.tolist(), scores.tolist(), strict=True)
    ]


@torch.no_grad()
def beam_search(
    decoder: Decoder,
    src: torch.Tensor | None = None,
    src_pad: torch.Tensor | None = None,
    *,
    beam: int = 4,
    max_len: int | torch.Tensor = 100,
    alpha: float = 0.0,
    prompt: torch.Tensor | None = None,
    rows: int = 1,
    n_best: int = 1,
) -> list[list[Hypothesis]]:
    """For every sentence of the batch, its finished hypotheses, best (highest normalized score) first.

    Without a length penalty a sentence's search goes on until its `n_best`-th best finished hypothesis scores
    at least as well as every unfinished one, so the first `n_best` are the best the beam can reach.
    """
    if beam < 1 or n_best < 1:
        raise ValueError("beam and n_best must be at least 1")
    n = _rows(src, prompt, rows)
    device = decoder.device
    limits = _limits(max_len, n, device)
    begin = decoder.begin(prompt, n)
    state = decoder.start(src, src_pad, capacity=begin.size(1) + int(limits.max()))
    log_probs = decoder.next_log_probs(state, begin).double()
    sentence = torch.arange(n, device=device)  # the sentences still searching
    scores = torch.zeros(n, 1, dtype=torch.float64, device=device)  # [sentences, hypotheses]: one to begin with
    history = torch.empty(n, 0, dtype=torch.long, device=device)  # tokens of every hypothesis row
    best = torch.full((n, n_best), float("-inf"), dtype=torch.float64, device=device)  # best normalized finished
    count = torch.zeros(n, dtype=torch.long, device=device)  # finished hypotheses per sentence
    finished: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for step in range(int(limits.max())):
        alive, width = scores.shape
        vocab = log_probs.size(-1)
        totals = (scores[:, :, None] + log_probs.view(alive, width, vocab)).view(alive, width * vocab)
        top, index = totals.topk(min(2 * beam, width * vocab), dim=1)  # candidates, best first
        parent, token = index // vocab, index % vocab
        valid = torch.isfinite(top)
        last = limits[sentence] <= step + 1
        ends = (token == decoder.specials.eos) | last[:, None]
        rank = torch.arange(top.size(1), device=device)[None, :]
        finishing = ends & valid & (rank < beam)  # only the `beam` best may finish, so that beam 1 is greedy
        if bool(finishing.any()):
            who, which = finishing.nonzero(as_tuple=True)
            rows_of = parent[who, which] + who * width
            tokens = torch.cat((history[rows_of], token[who, which][:, None]), dim=1)
            normalized = top[who, which] / length_penalty(step + 1, alpha)
            finished.append((sentence[who], tokens, top[who, which], normalized))
            this_step = torch.full_like(top, float("-inf"))
            this_step[who, which] = normalized
            best = torch.cat((best, this_step), dim=1).topk(n_best, dim=1).values
            count = count + finishing.sum(1)
        going = valid & ~ends
        chosen = going & (going.cumsum(1) <= beam)  # the first `beam` that go on, in rank order
        pick = torch.where(chosen, rank, rank + top.size(1)).argsort(dim=1)[:, :beam]
        kept = chosen.gather(1, pick)
        next_scores = torch.where(kept, top.gather(1, pick), float("-inf"))
        if alpha == 0:
            enough = (count >= n_best) & (best[:, -1] >= next_scores.max(1).values)
        else:
            enough = count >= max(beam, n_best)
        searching = kept.any(1) & ~enough & ~last
        if not bool(searching.any()):
            break
        go = searching.nonzero().squeeze(1)
        rows_of = (parent.gather(1, pick) + torch.arange(alive, device=device)[:, None] * width)[go].reshape(-1)
        next_tokens = token.gather(1, pick)[go].reshape(-1)
        state.reorder(rows_of)
        history = torch.cat((history[rows_of], next_tokens[:, None]), dim=1)
        sentence, scores, best, count = sentence[go], next_scores[go], best[go], count[go]
        log_probs = decoder.next_log_probs(state, next_tokens[:, None]).double()
    results: list[list[Hypothesis]] = [[] for _ in range(n)]
    for who, tokens, score, normalized in finished:
        for s, t, sc, nz in zip(who.tolist(), tokens.tolist(), score.tolist(), normalized.tolist(), strict=True):
            results[s].append(Hypothesis(tuple(t), sc, nz))
    return [sorted(found, key=lambda h: h.normalized, reverse=True) for found in results]
