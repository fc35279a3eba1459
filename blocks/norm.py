"""Normalisation blocks: LayerNorm and the Transformer's Add & Norm."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from blocks.registry import Block, BlockParams, Port, register
from blocks.types import TensorType, expect_last, expect_same_shape


@register("layer_norm", family="norm")
class LayerNorm(Block):
    """Normalise the last dimension to zero mean and unit variance, then scale (γ) and shift (β)."""

    class Params(BlockParams):
        dim: int = Field(gt=0, description="size of the normalised (last) dimension")
        eps: float = Field(1e-5, gt=0, description="added to the variance for stability")

    example = {"dim": 512}

    def __init__(self, p: Params):
        super().__init__()
        self.norm = nn.LayerNorm(p.dim, eps=p.eps)

    @classmethod
    def infer(cls, p: Params, x: TensorType) -> TensorType:
        """[..., dim] → [..., dim]."""
        expect_last(x, p.dim, "dim")
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


@register("add_norm", family="norm")
class AddNorm(Block):
    """Post-norm residual of the original Transformer: y = LayerNorm(x + dropout(sublayer))."""

    class Params(BlockParams):
        dim: int = Field(gt=0, description="model width (the normalised dimension)")
        dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the sublayer output")
        eps: float = Field(1e-5, gt=0, description="LayerNorm epsilon")

    in_ports = (Port("x"), Port("sublayer"))
    example = {"dim": 512, "dropout": 0.1}

    def __init__(self, p: Params):
        super().__init__()
        self.norm = nn.LayerNorm(p.dim, eps=p.eps)
        self.dropout = nn.Dropout(p.dropout)

    @classmethod
    def infer(cls, p: Params, x: TensorType, sublayer: TensorType) -> TensorType:
        """x and sublayer are both [..., dim]; the output has their shape."""
        expect_same_shape(x, sublayer, ("x", "sublayer"))
        expect_last(x, p.dim, "dim")
        return x

    def forward(self, x: torch.Tensor, sublayer: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.dropout(sublayer))
