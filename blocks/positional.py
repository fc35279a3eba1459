"""Positional encodings added to token embeddings."""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from blocks.registry import Block, BlockParams, Port, register
from blocks.types import ShapeError, TensorType, expect_last


def sinusoid_table(max_len: int, dim: int) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)); odd `dim` keeps one more sine."""
    position = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * -(math.log(10000.0) / dim))
    pe = torch.zeros(max_len, dim)
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term[: dim // 2])
    return pe


@register("sinusoidal_position", family="positional")
class SinusoidalPosition(Block):
    """Add the fixed sine/cosine position table to x (batch, seq, dim), then dropout."""

    class Params(BlockParams):
        dim: int = Field(gt=0, description="model width; odd widths get one more sine than cosine column")
        max_len: int = Field(5000, gt=0, description="longest sequence the table covers")
        dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the sum")

    in_ports = (Port("x", rank=3),)
    example = {"dim": 512, "dropout": 0.1}

    def __init__(self, p: Params):
        super().__init__()
        self.dropout = nn.Dropout(p.dropout)
        self.register_buffer("pe", sinusoid_table(p.max_len, p.dim).unsqueeze(0), persistent=False)

    @classmethod
    def infer(cls, p: Params, x: TensorType) -> TensorType:
        """[batch, seq, dim] → [batch, seq, dim], with seq ≤ max_len."""
        expect_last(x, p.dim, "dim")
        seq = x.shape[1]
        if isinstance(seq, int) and seq > p.max_len:
            raise ShapeError(f"sequence length {seq} exceeds max_len {p.max_len}", hint=f"raise max_len to {seq}")
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(x + self.pe[:, : x.size(1)])
