"""Positional encodings added to token embeddings: the fixed sinusoid table and learned positions."""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from blocks.registry import Block, BlockParams, Port, register
from blocks.types import Limit, TensorType, expect_last


def sinusoid_table(max_len: int, dim: int) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)); odd `dim` keeps one more sine.

    Computed as in the Annotated Transformer (div_term = exp(2i · −ln(10000)/d)) but in float64, so the
    float32 result is the closed form correctly rounded even at large positions.
    """
    position = torch.arange(max_len, dtype=torch.float64).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * -(math.log(10000.0) / dim))
    pe = torch.zeros(max_len, dim, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term[: dim // 2])
    return pe.float()


@register("sinusoidal_position", family="positional")
class SinusoidalPosition(Block):
    """Add the fixed sine/cosine position table to x (batch, seq, dim), then dropout.

    PE(pos, 2i) = sin(pos / 10000^(2i/dim)) and PE(pos, 2i+1) = cos(pos / 10000^(2i/dim)) (Vaswani et al.,
    section 3.5). For an odd dim the last column is a sine. The table is a non-persistent buffer: it is not in
    the state_dict and is recomputed when the block is built.
    """

    class Params(BlockParams):
        dim: int = Field(gt=0, description="model width; odd widths get one more sine than cosine column")
        max_len: int = Field(5000, gt=0, description="longest sequence the table covers")
        dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the sum")

    in_ports = (Port("x", rank=3, doc="embeddings [batch, seq, dim], seq ≤ max_len"),)
    out_ports = (Port("y", doc="x + PE[:seq], [batch, seq, dim]"),)
    example = {"dim": 512, "dropout": 0.1}

    def __init__(self, p: Params):
        super().__init__()
        self.dropout = nn.Dropout(p.dropout)
        self.register_buffer("pe", sinusoid_table(p.max_len, p.dim).unsqueeze(0), persistent=False)

    @classmethod
    def infer(cls, p: Params, x: TensorType) -> TensorType:
        """[batch, seq, dim] → [batch, seq, dim], with seq ≤ max_len."""
        expect_last(x, p.dim, "dim")
        return x

    @classmethod
    def limits(cls, p: Params, x: TensorType) -> tuple[Limit, ...]:
        return (Limit(x.shape[1], p.max_len, "the sequence length", "max_len"),)

    @classmethod
    def flops(cls, params: BlockParams, inputs: dict, outputs: tuple) -> int:
        """No matrix multiplication: 0 (torch's counter counts none)."""
        return 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(x + self.pe[:, : x.size(1)])


@register("learned_position", family="positional")
class LearnedPosition(Block):
    """Add a learned vector per position (an nn.Embedding of max_len rows) to x (batch, seq, dim), then dropout.

    y = dropout(x + P[:seq]) with P[pos] the learned row of position pos (as in BERT and GPT-2), initialised
    N(0, init_std²).
    """

    class Params(BlockParams):
        dim: int = Field(gt=0, description="model width")
        max_len: int = Field(512, gt=0, description="number of learned positions (longest sequence)")
        dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the sum")
        init_std: float = Field(0.02, gt=0, description="standard deviation of the initial position vectors")

    in_ports = (Port("x", rank=3, doc="embeddings [batch, seq, dim], seq ≤ max_len"),)
    out_ports = (Port("y", doc="x + P[:seq], [batch, seq, dim]"),)
    example = {"dim": 768, "max_len": 512, "dropout": 0.1}

    def __init__(self, p: Params):
        super().__init__()
        self.pe = nn.Embedding(p.max_len, p.dim)
        nn.init.normal_(self.pe.weight, std=p.init_std)
        self.dropout = nn.Dropout(p.dropout)

    @classmethod
    def infer(cls, p: Params, x: TensorType) -> TensorType:
        """[batch, seq, dim] → [batch, seq, dim], with seq ≤ max_len."""
        expect_last(x, p.dim, "dim")
        return x

    @classmethod
    def limits(cls, p: Params, x: TensorType) -> tuple[Limit, ...]:
        return (Limit(x.shape[1], p.max_len, "the sequence length", "max_len"),)

    @classmethod
    def flops(cls, params: BlockParams, inputs: dict, outputs: tuple) -> int:
        """No matrix multiplication: 0 (torch's counter counts none)."""
        return 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(x + self.pe.weight[: x.size(1)])
