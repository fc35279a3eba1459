"""What one process holds when a model trains over several: DDP's whole copy, or FSDP's shards.

Counted from the parameters' shapes (a model on `meta` will do), for Adam in float32 (`trainer.schedule`):

- DDP: every process holds every parameter, its gradient and Adam's two moments (and its step count, one
  float32 per parameter tensor).
- FSDP (FSDP2, as `train --strategy fsdp` wraps a model): each parameter is split along its first dimension
  into N equal pieces (the last padded), so a process holds ceil(d₀ / N) · d₁ · … elements of each, and of
  its gradient and moments. While it computes, a process also holds gathered parameters whole: the root's
  own (embeddings, final norm, generator) and, with the next one prefetched, two repeated layers (the
  largest); `gathered` counts those, in the compute dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from torch import nn

ADAM_MOMENTS = 2

Strategy = Literal["ddp", "fsdp"]


@dataclass(frozen=True)
class RankMemory:
    """Bytes one process holds (activations aside)."""

    strategy: Strategy
    ranks: int
    parameters: int
    gradients: int
    optimizer: int
    gathered: int  # FSDP: parameters gathered whole while a unit computes (0 for DDP)

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.gathered


def per_rank(model: nn.Module, ranks: int, strategy: Strategy, *, compute_bytes: int = 4) -> RankMemory:
    """The memory of one of `ranks` processes training `model` with `strategy` (see the module notes)."""
    if ranks < 1:
        raise ValueError("ranks must be at least 1")
    kept = {id(p): p for p in model.parameters()}  # a tied parameter once
    if strategy == "ddp":
        elements = sum(p.numel() for p in kept.values())
        size = elements * 4
        return RankMemory(strategy, ranks, size, size, ADAM_MOMENTS * size + 4 * len(kept), 0)
    local = sum(_shard(p.shape, ranks) for p in kept.values()) * 4
    layers = [layer for module in model.modules() if isinstance(module, nn.ModuleList) for layer in module]
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    root = sum(p.numel() for p in kept.values() if id(p) not in in_layers)
    largest = max((sum(p.numel() for p in layer.parameters()) for layer in layers), default=0)
    gathered = (root + min(2, len(layers)) * largest) * compute_bytes if ranks > 1 else 0
    return RankMemory(strategy, ranks, local, local, ADAM_MOMENTS * local + 4 * len(kept), gathered)


def _shard(shape: tuple[int, ...], ranks: int) -> int:
    if not shape:
        return 1  # a scalar is not split
    return math.ceil(shape[0] / ranks) * math.prod(shape[1:])
