"""The Transformer paper's optimisation recipe: Adam, the warm-up/inverse-square-root schedule, label smoothing.

lrate(step) = factor · d_model^-0.5 · min(step^-0.5, step · warmup^-1.5)   (Vaswani et al. 2017, section 5.3)

with factor 1 in the paper. `peak_lr` sets the factor so that the rate peaks (at step = warmup) at that value.
"""

from __future__ import annotations

import torch
from torch import nn

from blockgraph.trainer.vocab import PAD_ID

BETAS = (0.9, 0.98)
EPS = 1e-9


def noam_factor(d_model: int, warmup: int, peak_lr: float | None) -> float:
    """The factor of the schedule: 1 (the paper), or the one whose peak is `peak_lr`."""
    if peak_lr is None:
        return 1.0
    return peak_lr / (d_model**-0.5 * warmup**-0.5)


def noam_lr(step: int, d_model: int, warmup: int, factor: float = 1.0) -> float:
    """The learning rate of (1-based) optimizer step `step`."""
    step = max(step, 1)
    return factor * d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)


def adam(model: nn.Module) -> torch.optim.Adam:
    """Adam with the paper's β = (0.9, 0.98) and ε = 1e-9; the schedule sets the learning rate each step."""
    return torch.optim.Adam(model.parameters(), lr=0.0, betas=BETAS, eps=EPS)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


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
