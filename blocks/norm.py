"""Normalisation blocks: LayerNorm, BatchNorm, RMSNorm and the Transformer's Add & Norm (post- or pre-norm)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from blockgraph.blocks.flops import no_flops
from blockgraph.blocks.registry import Block, BlockParams, Port, register
from blockgraph.blocks.stepping import by_position
from blockgraph.blocks.types import TensorType, expect_last, expect_same_shape


@register("layer_norm", family="norm")
class LayerNorm(Block):
    """Normalise the last dimension to zero mean and unit variance, then scale (γ) and shift (β).

    Also the first half of a pre-norm residual: x → layer_norm → sublayer → add_norm(norm: pre) with x.
    """

    class Params(BlockParams):
        dim: int = Field(gt=0, description="size of the normalised (last) dimension")
        eps: float = Field(1e-5, gt=0, description="added to the variance for stability")
        bias: bool = Field(True, description="learn the shift β (false: scale only, as OLMo)")

    in_ports = (Port("x", doc="[..., dim]"),)
    out_ports = (Port("y", doc="[..., dim], normalised over the last dimension"),)
    example = {"dim": 512}

    def __init__(self, p: Params):
        super().__init__()
        self.norm = nn.LayerNorm(p.dim, eps=p.eps, bias=p.bias)

    @classmethod
    def infer(cls, p: Params, x: TensorType) -> TensorType:
        """[..., dim] → [..., dim]."""
        expect_last(x, p.dim, "dim")
        return x

    flops = no_flops

    stepping = by_position

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


@register("add_norm", family="norm")
class AddNorm(Block):
    """Residual with dropout: post-norm y = LayerNorm(x + dropout(sublayer)); pre-norm y = x + dropout(sublayer).

    `norm: post` (default) is the original Transformer's Add & Norm. A pre-norm residual
    y = x + dropout(sublayer(LayerNorm(x))) normalises *before* the sublayer, which a block seeing only x and
    the sublayer's output cannot do. So in a spec it is two nodes around the sublayer: a `layer_norm` node
    feeding the sublayer, and `add_norm` with `norm: pre`, which only adds the dropped-out sublayer output to
    the un-normalised x (it has no LayerNorm weights of its own). A pre-norm stack usually ends with one
    more `layer_norm` after its last layer.
    """

    class Params(BlockParams):
        dim: int = Field(gt=0, description="model width (the normalised dimension)")
        dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the sublayer output")
        eps: float = Field(1e-5, gt=0, description="LayerNorm epsilon (post-norm only)")
        bias: bool = Field(True, description="LayerNorm shift β (post-norm only)")
        norm: Literal["post", "pre"] = Field(
            "post",
            description="post: LayerNorm(x + dropout(sublayer)); pre: x + dropout(sublayer), "
            "with a layer_norm node placed before the sublayer in the spec",
        )

    in_ports = (Port("x", doc="the residual stream [..., dim]"), Port("sublayer", doc="the sublayer's output"))
    out_ports = (Port("y", doc="[..., dim]"),)
    example = {"dim": 512, "dropout": 0.1}

    def __init__(self, p: Params):
        super().__init__()
        self.norm = nn.LayerNorm(p.dim, eps=p.eps, bias=p.bias) if p.norm == "post" else None
        self.dropout = nn.Dropout(p.dropout)

    @classmethod
    def infer(cls, p: Params, x: TensorType, sublayer: TensorType) -> TensorType:
        """x and sublayer are both [..., dim]; the output has their shape."""
        expect_same_shape(x, sublayer, ("x", "sublayer"))
        expect_last(x, p.dim, "dim")
        return x

    flops = no_flops

    stepping = by_position

    def forward(self, x: torch.Tensor, sublayer: torch.Tensor) -> torch.Tensor:
        if self.dropout.training and self.dropout.p > 0:  # an inactive dropout is skipped: no module call per forward
            sublayer = self.dropout(sublayer)
        y = x + sublayer
        return y if self.norm is None else self.norm(y)


@register("batch_norm", family="norm")
class BatchNorm(Block):
    """BatchNorm1d over the feature dimension of (batch, seq, feature) or (batch, feature) tensors.

    For a (batch, seq, feature) input this is BatchNorm1d on x transposed to (batch, feature, seq): statistics
    per feature over all batch × seq positions (padding positions included), running averages used in eval
    mode. Meant for comparing against layer_norm, which normalises each position over its features.
    """

    class Params(BlockParams):
        dim: int = Field(gt=0, description="number of features (the last dimension)")
        eps: float = Field(1e-5, gt=0, description="added to the variance for stability")
        momentum: float | None = Field(
            0.1, gt=0.0, le=1.0, description="weight of the newest batch in the running statistics; null = mean"
        )
        affine: bool = Field(True, description="learn a per-feature scale γ and shift β")
        track_running_stats: bool = Field(True, description="keep running statistics for eval mode")

    in_ports = (Port("x", rank=(2, 3), doc="[batch, seq, dim] or [batch, dim]"),)
    out_ports = (Port("y", doc="same shape as x"),)
    example = {"dim": 512}

    def __init__(self, p: Params):
        super().__init__()
        self.norm = nn.BatchNorm1d(
            p.dim, eps=p.eps, momentum=p.momentum, affine=p.affine, track_running_stats=p.track_running_stats
        )

    @classmethod
    def infer(cls, p: Params, x: TensorType) -> TensorType:
        """[batch, seq, dim] or [batch, dim] → the same shape."""
        expect_last(x, p.dim, "dim")
        return x

    flops = no_flops

    stepping = by_position

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return self.norm(x)
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


@register("rms_norm", family="norm")
class RMSNorm(Block):
    """Scale the last dimension by its root mean square: y = x / √(mean(x²) + eps) · g (Zhang & Sennrich, 2019).

    No mean subtraction and no shift. The normalisation is computed in float32 for lower-precision inputs,
    then cast back before the gain g, as in LLaMA. With an `offset` the gain is offset + w, the weight w kept
    as Gemma publishes it (offset 1: a gain of 1 + w, w starting at 0), and it is applied in float32 before
    the cast back, as Gemma does.
    """

    class Params(BlockParams):
        dim: int = Field(gt=0, description="size of the normalised (last) dimension")
        eps: float = Field(1e-6, gt=0, description="added to the mean square for stability")
        offset: float = Field(
            0.0, description="the gain is offset + weight (Gemma: 1), applied in float32 before the cast back"
        )

    in_ports = (Port("x", doc="[..., dim]"),)
    out_ports = (Port("y", doc="[..., dim]"),)
    example = {"dim": 4096, "eps": 1e-6}

    def __init__(self, p: Params):
        super().__init__()
        self.eps, self.offset = p.eps, p.offset
        self.weight = nn.Parameter(torch.full((p.dim,), 1.0 - p.offset))  # a gain of 1 to start with

    @classmethod
    def infer(cls, p: Params, x: TensorType) -> TensorType:
        """[..., dim] → [..., dim]."""
        expect_last(x, p.dim, "dim")
        return x

    flops = no_flops

    stepping = by_position

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (h * (self.offset + self.weight.float())).type_as(x)
        return h.type_as(x) * self.weight
