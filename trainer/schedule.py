"""The Transformer paper's optimisation recipe: Adam and the warm-up/inverse-square-root schedule (the losses
are in trainer.losses).

lrate(step) = factor · d_model^-0.5 · min(step^-0.5, step · warmup^-1.5)   (Vaswani et al. 2017, section 5.3)

with factor 1 in the paper. `peak_lr` sets the factor so that the rate peaks (at step = warmup) at that value.
"""

from __future__ import annotations

import torch
from torch import nn

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
