"""The pointwise nonlinearities blocks offer, by name: one table for the activation block, the feed-forwards and
the Transformer layers.

`gelu` is the exact form x·Φ(x) (BERT, `nn.GELU()`); `gelu_tanh` its tanh approximation
0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), which GPT-2 and T5 v1.1 use (Hugging Face calls it `gelu_new`);
`silu` is x·σ(x), also called swish (Marian, LLaMA's gate); `quick_gelu` is x·σ(1.702·x), the sigmoid approximation
of GELU that CLIP was trained with.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F

ActivationName = Literal["relu", "gelu", "gelu_tanh", "quick_gelu", "silu", "tanh", "sigmoid"]


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x·σ(1.702·x) (CLIP's `quick_gelu`)."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "quick_gelu": quick_gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}
