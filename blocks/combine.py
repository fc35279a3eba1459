"""Small blocks that combine or reduce tensors: concatenation of features, masked mean pooling, and a
pointwise activation (for Luong's attentional state tanh(W_c[c_t; h_t]) and similar heads)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from blocks.registry import Block, BlockParams, Port, register
from blocks.types import ShapeError, TensorType, dims_equal, format_dim, format_shape


@register("concat", family="combine")
class Concat(Block):
    """Concatenate two to four tensors along the last (feature) dimension, as torch.cat(..., dim=-1).

    All inputs must have the same rank and agree on every dimension but the last, which adds up; e.g.
    Luong's [c_t; h_t] from an attention context [batch, tgt_len, d_memory] and decoder states
    [batch, tgt_len, d_query]. The output has the first input's dtype (inputs must share it).
    """

    in_ports = (
        Port("a", doc="[..., d_a]"),
        Port("b", doc="[..., d_b], same leading dimensions as a"),
        Port("c", optional=True, doc="[..., d_c], same leading dimensions as a"),
        Port("d", optional=True, doc="[..., d_d], same leading dimensions as a"),
    )
    out_ports = (Port("y", doc="[..., d_a + d_b (+ d_c + d_d)]"),)
    example = {}

    @classmethod
    def infer(
        cls, p: BlockParams, a: TensorType, b: TensorType, c: TensorType | None = None, d: TensorType | None = None
    ) -> TensorType:
        """[..., d_a], [..., d_b], … → [..., d_a + d_b + …]; all but the last dimension must agree."""
        parts = [(name, t) for name, t in (("a", a), ("b", b), ("c", c), ("d", d)) if t is not None]
        for name, t in parts[1:]:
            same = t.rank == a.rank and all(dims_equal(x, y) for x, y in zip(t.shape[:-1], a.shape[:-1], strict=True))
            if not same:
                raise ShapeError(
                    f"concat input {name!r} {t.described()} does not match 'a' {a.described()} on the leading "
                    f"dimensions {format_shape(a.shape[:-1])}",
                    hint="only the last (feature) dimension may differ",
                    at=("in", name),
                )
            if t.dtype != a.dtype:
                raise ShapeError(
                    f"concat input {name!r} is {t.described()}, but 'a' is {a.described()}", at=("in", name)
                )
        return a.with_last(sum((t.shape[-1] for _, t in parts[1:]), a.shape[-1]))

    @classmethod
    def flops(cls, params: BlockParams, inputs: dict, outputs: tuple) -> int:
        """No matrix multiplication: 0 (torch's counter counts none)."""
        return 0

    def forward(
        self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None, d: torch.Tensor | None = None
    ) -> torch.Tensor:
        return torch.cat([t for t in (a, b, c, d) if t is not None], dim=-1)


@register("mean_pool", family="combine")
class MeanPool(Block):
    """Average over the sequence: y = Σ_t x_t / T, counting only non-padding positions when `mask` is given.

    With mask (True = padding, as `key_padding_mask`), padded positions are left out of both the sum and
    the count, so padding never changes the result; a sequence that is all padding gives zeros (not NaN).
    """

    in_ports = (
        Port("x", rank=3, doc="[batch, seq, dim]"),
        Port("mask", rank=2, dtype="bool", optional=True, doc="[batch, seq], True = padding"),
    )
    out_ports = (Port("y", doc="[batch, dim]"),)
    example = {}

    @classmethod
    def infer(cls, p: BlockParams, x: TensorType, mask: TensorType | None = None) -> TensorType:
        """[batch, seq, dim] (mask [batch, seq]) → [batch, dim]."""
        if mask is not None and not (dims_equal(mask.shape[0], x.shape[0]) and dims_equal(mask.shape[1], x.shape[1])):
            raise ShapeError(
                f"mask {mask.described()} must be [batch, seq] = "
                f"[{format_dim(x.shape[0])}, {format_dim(x.shape[1])}] of x {x.described()}",
                hint="feed the padding mask of the tokens x was computed from",
                at=("in", "mask"),
            )
        return x.with_shape(x.shape[0], x.shape[2])

    @classmethod
    def flops(cls, params: BlockParams, inputs: dict, outputs: tuple) -> int:
        """No matrix multiplication: 0 (torch's counter counts none)."""
        return 0

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            return x.mean(1)
        keep = (~mask).unsqueeze(-1).to(x.dtype)
        return (x * keep).sum(1) / keep.sum(1).clamp_min(1.0)


ACTIVATIONS = {"tanh": torch.tanh, "relu": F.relu, "gelu": F.gelu, "sigmoid": torch.sigmoid, "silu": F.silu}


@register("activation", family="combine")
class Activation(Block):
    """Apply a pointwise nonlinearity: y = f(x), f one of tanh, relu, gelu, sigmoid, silu.

    Follows a `linear` node to make a one-layer network, e.g. Luong's attentional hidden state
    h̃_t = tanh(W_c[c_t; h_t]) is concat → linear (bias: false) → activation (tanh).
    """

    class Params(BlockParams):
        function: Literal["tanh", "relu", "gelu", "sigmoid", "silu"] = Field(
            "tanh", description="the nonlinearity: tanh, relu, gelu (exact erf form), sigmoid or silu"
        )

    in_ports = (Port("x", doc="[...]"),)
    out_ports = (Port("y", doc="f(x), same shape as x"),)
    example = {"function": "tanh"}

    def __init__(self, p: Params):
        super().__init__()
        self.function = p.function

    @classmethod
    def infer(cls, p: Params, x: TensorType) -> TensorType:
        """[...] → [...], the same shape."""
        return x

    @classmethod
    def flops(cls, params: BlockParams, inputs: dict, outputs: tuple) -> int:
        """No matrix multiplication: 0 (torch's counter counts none)."""
        return 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ACTIVATIONS[self.function](x)

    def extra_repr(self) -> str:
        return self.function
