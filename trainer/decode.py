"""Greedy and beam-search decoding by re-running the whole model on the growing target (no KV cache).

Each step calls the model with the source and the target so far (bos first) and reads the log-probabilities
at the last position; the decoder's causal self-attention (or a recurrent decoder) makes that position see
only the prefix, so re-running is exact, only slower than caching. pad and bos are never generated.

A hypothesis' score is the sum of the model's log-probabilities of its tokens, eos included. Beam search
keeps the `beam` best unfinished hypotheses each step; a candidate among the `beam` best of the step that
ends with eos (or reaches `max_len`) is put aside as finished, so a beam of 1 is exactly greedy decoding.
Without a length penalty, it stops as soon as the best finished score is at least the best unfinished one
(scores only fall as hypotheses grow, so nothing better can come); with a GNMT length penalty α
(score / ((5 + length) / 6)^α), once `beam` hypotheses have finished.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from builder.shapes import TypedGraph, largest
from trainer.roles import ModelIO, Roles
from trainer.vocab import BOS_ID, EOS_ID, PAD_ID


@dataclass(frozen=True)
class Hypothesis:
    tokens: tuple[int, ...]  # generated ids, eos included when it was generated
    score: float  # sum of log-probabilities
    normalized: float  # score with the length penalty applied (= score when α = 0)


def _step(
    model: nn.Module,
    io: ModelIO,
    prefixes: torch.Tensor,
    src: torch.Tensor | None,
    src_pad: torch.Tensor | None,
) -> torch.Tensor:
    """Log-probabilities of the next token after each prefix [n, t] → [n, vocab]; pad and bos forbidden."""
    n = prefixes.shape[0]
    if src is not None and src.shape[0] != n:
        src = src.expand(n, -1)
        src_pad = None if src_pad is None else src_pad.expand(n, -1)
    log_probs = io(model, prefixes, src, src_pad)[:, -1].clone()
    log_probs[:, PAD_ID] = float("-inf")
    log_probs[:, BOS_ID] = float("-inf")
    return log_probs


def _start(prefix: list[int] | None, rows: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([[BOS_ID, *(prefix or [])]] * rows, dtype=torch.long, device=device)


def length_limits(typed: TypedGraph, roles: Roles) -> tuple[int | None, int | None]:
    """The longest source and target (in tokens, bos/eos included) the model's blocks allow, where bounded."""

    def most(name: str | None) -> int | None:
        shape = typed.graph.inputs[name].shape if name is not None else []
        return largest(typed, shape[-1]) if shape and isinstance(shape[-1], str) else None

    return most(roles.src), most(roles.tgt)


@torch.no_grad()
def greedy(
    model: nn.Module,
    io: ModelIO,
    src: torch.Tensor | None,
    src_pad: torch.Tensor | None = None,
    *,
    max_len: int = 100,
    prefix: list[int] | None = None,
    rows: int = 1,
) -> list[Hypothesis]:
    """The most likely next token each step, for every source row of a padded batch (or `rows` LM prompts)."""
    device = next(model.parameters()).device
    n = src.shape[0] if src is not None else rows
    ys = _start(prefix, n, device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    scores = torch.zeros(n, dtype=torch.float64, device=device)
    generated: list[torch.Tensor] = []
    for _ in range(max_len):
        log_probs = _step(model, io, ys, src, src_pad)
        best, token = log_probs.max(dim=-1)
        token = token.masked_fill(done, PAD_ID)
        scores += best.double().masked_fill(done, 0.0)
        generated.append(token)
        ys = torch.cat([ys, token[:, None]], dim=1)
        done |= token == EOS_ID
        if bool(done.all()):
            break
    out = []
    rows_tokens = torch.stack(generated, dim=1).tolist() if generated else [[] for _ in range(n)]
    for row, score in zip(rows_tokens, scores.tolist(), strict=True):
        tokens = tuple(t for t in row if t != PAD_ID)
        out.append(Hypothesis(tokens, score, score))
    return out


def length_penalty(length: int, alpha: float) -> float:
    return ((5 + length) / 6) ** alpha if alpha else 1.0


@torch.no_grad()
def beam_search(
    model: nn.Module,
    io: ModelIO,
    src: torch.Tensor | None,
    src_pad: torch.Tensor | None = None,
    *,
    beam: int = 4,
    max_len: int = 100,
    alpha: float = 0.0,
    prefix: list[int] | None = None,
    n_best: int = 1,
) -> list[Hypothesis]:
    """Finished hypotheses of one source sentence ([1, src_len]), best (highest normalized score) first.

    Without a length penalty the search goes on until the `n_best`-th best finished hypothesis scores at least
    as well as every unfinished one, so the first `n_best` returned are the best the beam can reach.
    """
    if beam < 1:
        raise ValueError("beam must be at least 1")
    if src is not None and src.shape[0] != 1:
        raise ValueError("beam search decodes one sentence at a time")
    device = next(model.parameters()).device
    start = _start(prefix, 1, device)
    alive: list[tuple[tuple[int, ...], float]] = [((), 0.0)]
    finished: list[Hypothesis] = []

    def finish(tokens: tuple[int, ...], score: float) -> None:
        finished.append(Hypothesis(tokens, score, score / length_penalty(len(tokens), alpha)))

    for step in range(max_len):
        grown = torch.tensor([t for t, _ in alive], dtype=torch.long, device=device).view(len(alive), step)
        ys = torch.cat([start.expand(len(alive), -1), grown], dim=1)
        log_probs = _step(model, io, ys, src, src_pad).double()
        totals = torch.tensor([s for _, s in alive], dtype=torch.float64, device=device)[:, None] + log_probs
        flat = totals.view(-1)
        finite = int(torch.isfinite(flat).sum())
        top_scores, top_index = flat.topk(min(2 * beam, finite))
        vocab = log_probs.shape[-1]
        next_alive = []
        last = step == max_len - 1
        for rank, (score, index) in enumerate(zip(top_scores.tolist(), top_index.tolist(), strict=True)):
            row, token = divmod(index, vocab)
            tokens = (*alive[row][0], token)
            if token == EOS_ID or last:
                if rank < beam:  # only the top `beam` candidates may finish, so that beam 1 is greedy
                    finish(tokens, score)
            elif len(next_alive) < beam:
                next_alive.append((tokens, score))
        alive = next_alive
        if not alive:
            break
        if len(finished) >= n_best:
            nth_best = sorted((h.normalized for h in finished), reverse=True)[n_best - 1]
            if alpha == 0 and nth_best >= max(s for _, s in alive):
                break
            if alpha != 0 and len(finished) >= max(beam, n_best):
                break
    return sorted(finished, key=lambda h: h.normalized, reverse=True)
