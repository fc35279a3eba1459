"""What training minimises and counts: the (label-smoothed) negative log-likelihood of the target tokens or of a
classifier's labels, how many of them the model gets right, and the objective that adds the outputs a spec
declares as losses (`roles: loss:`, trainer.roles) to the cross-entropy, each times its weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blockgraph.trainer.batching import Batch
from blockgraph.trainer.roles import Outputs
from blockgraph.trainer.vocab import PAD_ID


def smoothed_nll(
    log_probs: torch.Tensor, target: torch.Tensor, keep: torch.Tensor, smoothing: float, pad: int | None = PAD_ID
) -> torch.Tensor:
    """Summed label-smoothed negative log-likelihood over the target tokens where `keep` is True.

    The smoothed target puts 1 - ε on the gold token and spreads ε evenly over the other tokens except
    padding (as in the Annotated Transformer; `pad` None: a model without a padding token spreads it over
    all the others), so ε = 0 is plain cross-entropy. Returns a scalar sum; divide by the token count.
    """
    vocab = log_probs.shape[-1]
    log_probs = log_probs.reshape(-1, vocab)
    target = target.reshape(-1)
    gold = log_probs.gather(1, target.unsqueeze(1)).squeeze(1)
    loss = -gold
    spread = vocab - 1 - (pad is not None)
    if smoothing > 0 and spread > 0:
        others = log_probs.sum(dim=1) - gold - (log_probs[:, pad] if pad is not None else 0.0)
        loss = (1 - smoothing) * loss - smoothing / spread * others
    return loss.masked_fill(~keep.reshape(-1), 0.0).sum()


def correct_tokens(log_probs: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> int:
    """How many kept target tokens are the model's most likely token."""
    return int(((log_probs.argmax(dim=-1) == target) & keep).sum())


def class_nll(log_probs: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Summed label-smoothed negative log-likelihood of a classifier's [batch, classes] log-probabilities.

    1 - ε on the gold class and ε spread evenly over the others (every index is a class: none is padding).
    """
    classes = log_probs.shape[-1]
    gold = log_probs.gather(1, labels.unsqueeze(1)).squeeze(1)
    loss = -gold
    if smoothing > 0 and classes > 1:
        loss = (1 - smoothing) * loss - smoothing / (classes - 1) * (log_probs.sum(dim=1) - gold)
    return loss.sum()


def correct_labels(log_probs: torch.Tensor, labels: torch.Tensor) -> int:
    """How many examples' most likely class is their label."""
    return int((log_probs.argmax(dim=-1) == labels).sum())


def batch_nll(log_probs: torch.Tensor, batch: Batch, smoothing: float, pad: int | None) -> torch.Tensor:
    """Summed (label-smoothed) NLL of a batch's scored target tokens (`pad`: the token smoothing leaves out; a
    prompt is read, not scored), or of a classifier's labels."""
    if batch.labels is not None:
        return class_nll(log_probs, batch.labels, smoothing)
    return smoothed_nll(log_probs, batch.tgt_out, batch.keep, smoothing, pad)


def batch_correct(log_probs: torch.Tensor, batch: Batch) -> int:
    """How many of a batch's scored target tokens (a classifier's labels) the model ranks first."""
    if batch.labels is not None:
        return correct_labels(log_probs, batch.labels)
    return correct_tokens(log_probs, batch.tgt_out, batch.keep)


def objective(
    nll: torch.Tensor, scale: float, extras: dict[str, torch.Tensor], weights: dict[str, float]
) -> torch.Tensor:
    """The loss to minimise: the summed cross-entropy times `scale` (1 / the tokens it is averaged over), plus
    each declared loss output times its weight; without declared losses, the scaled cross-entropy as it is."""
    total = nll * scale
    for name, weight in weights.items():
        total = total + weight * extras[name]
    return total


@dataclass(frozen=True)
class Loss:
    """One batch's loss: the objective to minimise, the summed cross-entropy in it, and the model's outputs."""

    objective: torch.Tensor
    nll: torch.Tensor
    outputs: Outputs


def of(
    outputs: Outputs, batch: Batch, smoothing: float, pad: int | None, scale: float, weights: dict[str, float]
) -> Loss:
    """The loss of the model's `outputs` on `batch`: see `objective`."""
    nll = batch_nll(outputs.log_probs, batch, smoothing, pad)
    return Loss(objective(nll, scale, outputs.losses, weights), nll, outputs)
