"""Position-wise feed-forward networks: the Transformer's two-layer FFN, its gated variants (GLU), and SwiGLU."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

from blockgraph.blocks.activations import ACTIVATIONS, ActivationName
from blockgraph.blocks.flops import linear, tokens
from blockgraph.blocks.registry import Block, BlockParams, Port, register
from blockgraph.blocks.stepping import by_position
from blockgraph.blocks.types import TensorType, expect_last


class FeedForwardParams(BlockParams):
    """The parameters of a position-wise feed-forward network (also those of the Transformer layers' FFN)."""

    d_model: int = Field(gt=0, description="input and output width")
    d_ff: int = Field(gt=0, description="hidden width (2048 in the base Transformer)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout after the activation")
    activation: ActivationName = Field(
        "relu",
        description="hidden activation: relu (paper), gelu (exact), gelu_tanh (GPT-2), quick_gelu (CLIP), silu, tanh "
        "or sigmoid",
    )
    gated: bool = Field(False, description="GLU: act(W₁x) ⊙ W₃x (GEGLU with gelu, SwiGLU with silu)")
    bias: bool = Field(True, description="biases in W₁ (W₃) and W₂")


@register("feed_forward", family="feedforward")
class FeedForward(Block):
    """Two-layer position-wise network: FFN(x) = W₂ · dropout(act(W₁x + b₁)) + b₂, act = ReLU (paper) or another.

    `gated` multiplies the activation by a second projection: FFN(x) = W₂ · dropout(act(W₁x) ⊙ W₃x) (Shazeer,
    2020: GEGLU with gelu, SwiGLU with silu). GELU is the exact (erf) form, as in BERT; `gelu_tanh` is GPT-2's.
    """

    Params = FeedForwardParams
    in_ports = (Port("x", doc="[..., d_model]"),)
    out_ports = (Port("y", doc="[..., d_model]"),)
    example = {"d_model": 512, "d_ff": 2048, "dropout": 0.1}

    def __init__(self, p: FeedForwardParams):
        super().__init__()
        self.w_1 = nn.Linear(p.d_model, p.d_ff, bias=p.bias)
        self.w_3 = nn.Linear(p.d_model, p.d_ff, bias=p.bias) if p.gated else None
        self.w_2 = nn.Linear(p.d_ff, p.d_model, bias=p.bias)
        self.dropout = nn.Dropout(p.dropout)
        self.activation = ACTIVATIONS[p.activation]

    @classmethod
    def infer(cls, p: FeedForwardParams, x: TensorType) -> TensorType:
        """[..., d_model] → [..., d_model]."""
        expect_last(x, p.d_model, "d_model")
        return x

    @classmethod
    def flops(cls, p: FeedForwardParams, inputs: dict, outputs: tuple) -> Any:
        """W_1 and W_2 (and W_3 when gated): 2 (3) · 2·tokens·d_model·d_ff."""
        return (3 if p.gated else 2) * linear(tokens(inputs["x"].shape), p.d_model, p.d_ff)

    stepping = by_position

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.activation(self.w_1(x))
        if self.w_3 is not None:
            h = h * self.w_3(x)
        if self.dropout.training and self.dropout.p > 0:  # an inactive dropout is skipped: no module call per forward
            h = self.dropout(h)
        return self.w_2(h)


@register("swiglu", family="feedforward")
class SwiGLU(FeedForward):
    """SwiGLU feed-forward (Shazeer, 2020): FFN(x) = W₂ · dropout(SiLU(W₁x) ⊙ W₃x).

    W₁ is the gated branch, W₃ the linear one: a `feed_forward` with `gated: true, activation: silu`, biases off
    by default. With d_ff = ⅔ · 4 · d_model it has the parameter count of a 4 · d_model two-layer FFN (LLaMA
    rounds it up to a multiple of 256).
    """

    class Params(BlockParams):
        d_model: int = Field(gt=0, description="input and output width")
        d_ff: int = Field(gt=0, description="hidden width")
        dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the gated hidden units")
        bias: bool = Field(False, description="biases in W₁, W₃, W₂ (LLaMA and PaLM use none)")

    example = {"d_model": 512, "d_ff": 1376}

    def __init__(self, p: Params):
        super().__init__(self.feed_forward_params(p))

    @staticmethod
    def feed_forward_params(p: Params) -> FeedForwardParams:
        """The `feed_forward` this is: gated, with SiLU."""
        return FeedForwardParams(
            d_model=p.d_model, d_ff=p.d_ff, dropout=p.dropout, activation="silu", gated=True, bias=p.bias
        )

    @classmethod
    def flops(cls, p: Params, inputs: dict, outputs: tuple) -> Any:  # type: ignore[override]  # given its own Params
        """W₁, W₃ and W₂: 3 · 2·tokens·d_model·d_ff."""
        return super().flops(cls.feed_forward_params(p), inputs, outputs)
