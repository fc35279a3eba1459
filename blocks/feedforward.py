"""Position-wise feed-forward networks: the Transformer's two-layer FFN (ReLU or GELU) and SwiGLU."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from blocks.flops import linear, tokens
from blocks.registry import Block, BlockParams, Port, register
from blocks.types import TensorType, expect_last

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


@register("feed_forward", family="feedforward")
class FeedForward(Block):
    """Two-layer position-wise network: FFN(x) = W₂ · dropout(act(W₁x + b₁)) + b₂, act = ReLU (paper) or GELU.

    GELU is the exact (erf) form, as in BERT and `nn.TransformerEncoderLayer(activation="gelu")`.
    """

    class Params(BlockParams):
        d_model: int = Field(gt=0, description="input and output width")
        d_ff: int = Field(gt=0, description="hidden width (2048 in the base Transformer)")
        dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout after the activation")
        activation: Literal["relu", "gelu"] = Field("relu", description="hidden activation: relu (paper) or gelu")

    in_ports = (Port("x", doc="[..., d_model]"),)
    out_ports = (Port("y", doc="[..., d_model]"),)
    example = {"d_model": 512, "d_ff": 2048, "dropout": 0.1}

    def __init__(self, p: Params):
        super().__init__()
        self.w_1 = nn.Linear(p.d_model, p.d_ff)
        self.w_2 = nn.Linear(p.d_ff, p.d_model)
        self.dropout = nn.Dropout(p.dropout)
        self.activation = ACTIVATIONS[p.activation]

    @classmethod
    def infer(cls, p: Params, x: TensorType) -> TensorType:
        """[..., d_model] → [..., d_model]."""
        expect_last(x, p.d_model, "d_model")
        return x

    @classmethod
    def flops(cls, p: Params, inputs: dict, outputs: tuple) -> Any:
        """W_1 and W_2: 2 · 2·tokens·d_model·d_ff."""
        return 2 * linear(tokens(inputs["x"].shape), p.d_model, p.d_ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.activation(self.w_1(x))
        if self.dropout.training and self.dropout.p > 0:  # an inactive dropout is skipped: no module call per forward
            h = self.dropout(h)
        return self.w_2(h)


@register("swiglu", family="feedforward")
class SwiGLU(Block):
    """SwiGLU feed-forward (Shazeer, 2020): FFN(x) = W₂ · dropout(SiLU(W₁x) ⊙ W₃x).

    W₁ is the gated branch, W₃ the linear one. With d_ff = ⅔ · 4 · d_model it has the parameter count of a
    4 · d_model two-layer FFN (LLaMA rounds it up to a multiple of 256).
    """

    class Params(BlockParams):
        d_model: int = Field(gt=0, description="input and output width")
        d_ff: int = Field(gt=0, description="hidden width")
        dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the gated hidden units")
        bias: bool = Field(False, description="biases in W₁, W₃, W₂ (LLaMA and PaLM use none)")

    in_ports = (Port("x", doc="[..., d_model]"),)
    out_ports = (Port("y", doc="[..., d_model]"),)
    example = {"d_model": 512, "d_ff": 1376}

    def __init__(self, p: Params):
        super().__init__()
        self.w_1 = nn.Linear(p.d_model, p.d_ff, bias=p.bias)
        self.w_3 = nn.Linear(p.d_model, p.d_ff, bias=p.bias)
        self.w_2 = nn.Linear(p.d_ff, p.d_model, bias=p.bias)
        self.dropout = nn.Dropout(p.dropout)

    @classmethod
    def infer(cls, p: Params, x: TensorType) -> TensorType:
        """[..., d_model] → [..., d_model]."""
        expect_last(x, p.d_model, "d_model")
        return x

    @classmethod
    def flops(cls, p: Params, inputs: dict, outputs: tuple) -> Any:
        """W, V and W_2: 3 · 2·tokens·d_model·d_ff."""
        return 3 * linear(tokens(inputs["x"].shape), p.d_model, p.d_ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.w_1(x)) * self.w_3(x)
        if self.dropout.training and self.dropout.p > 0:
            h = self.dropout(h)
        return self.w_2(h)
