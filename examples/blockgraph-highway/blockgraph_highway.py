"""A blockgraph plugin: the highway gate (Srivastava et al., 2015) as a residual connection."""

import torch
from pydantic import Field
from torch import nn

from blockgraph.blocks import Block, BlockParams, Port, TensorType, expect_last, expect_same_shape, register
from blockgraph.blocks.stepping import by_position


@register("highway", family="residual")
class Highway(Block):
    """Gated residual: y = g ⊙ sublayer + (1 − g) ⊙ x, with the gate g = σ(W_g x + b_g)."""

    class Params(BlockParams):
        dim: int = Field(gt=0, description="feature size of x and sublayer")
        gate_bias: float = Field(-1.0, description="initial b_g; negative favours carrying x through")

    in_ports = (Port("x"), Port("sublayer"))
    example = {"dim": 512}
    stepping = by_position  # decoding step by step: each position's output depends on that position alone

    def __init__(self, p: Params):
        super().__init__()
        self.w_g = nn.Linear(p.dim, p.dim)
        nn.init.constant_(self.w_g.bias, p.gate_bias)

    @classmethod
    def infer(cls, p: Params, x: TensorType, sublayer: TensorType) -> TensorType:
        """x and sublayer are both [..., dim]; the output has their shape."""
        expect_same_shape(x, sublayer, ("x", "sublayer"))
        expect_last(x, p.dim, "dim")
        return x

    def forward(self, x: torch.Tensor, sublayer: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.w_g(x))
        return g * sublayer + (1 - g) * x
