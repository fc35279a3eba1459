"""Elementary blocks: linear projection, dropout, residual add."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

from blockgraph.blocks.flops import linear, no_flops, tokens
from blockgraph.blocks.registry import Block, BlockParams, Port, register
from blockgraph.blocks.stepping import by_position
from blockgraph.blocks.types import TensorType, expect_last, expect_same_shape


@register("linear", family="core")
class Linear(Block):
    """Affine map of the last dimension: y = x Wᵀ + b."""

    class Params(BlockParams):
        in_features: int = Field(gt=0, description="size of the input's last dimension")
        out_features: int = Field(gt=0, description="size of the output's last dimension")
        bias: bool = Field(True, description="learn an additive bias b")

    example = {"in_features": 512, "out_features": 512}

    def __init__(self, p: Params):
        super().__init__()
        self.proj = nn.Linear(p.in_features, p.out_features, bias=p.bias)

    @classmethod
    def infer(cls, p: Params, x: TensorType) -> TensorType:
        """[..., in_features] → [..., out_features]."""
        expect_last(x, p.in_features, "in_features")
        return x.with_last(p.out_features)

    @classmethod
    def flops(cls, p: Params, inputs: dict, outputs: tuple) -> Any:
        """2·tokens·in_features·out_features."""
        return linear(tokens(inputs["x"].shape), p.in_features, p.out_features)

    stepping = by_position

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


@register("dropout", family="core")
class Dropout(Block):
    """Zero each element with probability p during training, scaling the rest by 1/(1-p)."""

    class Params(BlockParams):
        p: float = Field(0.1, ge=0.0, lt=1.0, description="drop probability")

    example = {"p": 0.1}

    def __init__(self, p: Params):
        super().__init__()
        self.drop = nn.Dropout(p.p)

    flops = no_flops

    stepping = by_position

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(x)


@register("add", family="core")
class Add(Block):
    """Residual connection: y = x + sublayer, shapes must agree."""

    in_ports = (Port("x"), Port("sublayer"))
    example = {}

    @classmethod
    def infer(cls, p: BlockParams, x: TensorType, sublayer: TensorType) -> TensorType:
        """x and sublayer have the same shape, which the output keeps."""
        expect_same_shape(x, sublayer, ("x", "sublayer"))
        return x

    flops = no_flops

    stepping = by_position

    def forward(self, x: torch.Tensor, sublayer: torch.Tensor) -> torch.Tensor:
        return x + sublayer


@register("scale", family="core")
class Scale(Block):
    """Multiply by a constant: y = factor · x (T5 scales its states by d_model^-0.5 before a tied output layer)."""

    class Params(BlockParams):
        factor: float = Field(description="the constant factor")

    example = {"factor": 0.044194173824159216}

    def __init__(self, p: Params):
        super().__init__()
        self.factor = p.factor

    flops = no_flops

    stepping = by_position

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor}"
