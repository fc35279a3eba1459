"""Position-wise feed-forward networks."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from blocks.registry import Block, BlockParams, register
from blocks.types import TensorType, expect_last


@register("feed_forward", family="feedforward")
class FeedForward(Block):
    """Two-layer position-wise network: FFN(x) = W₂ · dropout(ReLU(W₁x + b₁)) + b₂."""

    class Params(BlockParams):
        d_model: int = Field(gt=0, description="input and output width")
        d_ff: int = Field(gt=0, description="hidden width (2048 in the base Transformer)")
        dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout after the activation")

    example = {"d_model": 512, "d_ff": 2048, "dropout": 0.1}

    def __init__(self, p: Params):
        super().__init__()
        self.w_1 = nn.Linear(p.d_model, p.d_ff)
        self.w_2 = nn.Linear(p.d_ff, p.d_model)
        self.dropout = nn.Dropout(p.dropout)

    @classmethod
    def infer(cls, p: Params, x: TensorType) -> TensorType:
        """[..., d_model] → [..., d_model]."""
        expect_last(x, p.d_model, "d_model")
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(self.dropout(self.w_1(x).relu()))
