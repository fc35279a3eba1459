"""Convolutions over channels-first signals: `conv1d` over [batch, channels, length] (Whisper's audio front end)
and `conv2d` over [batch, channels, height, width] (images), each computing exactly what torch.nn.Conv1d and
torch.nn.Conv2d compute, with their initialisation. Output sizes are expressions of the named input sizes, so
`inspect` reads a spectrogram of `frames` frames or an image of `height` × `width` without any size given."""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar

import sympy
import torch
from pydantic import Field, model_validator
from torch import nn

from blockgraph.blocks.registry import Block, BlockParams, Port, register
from blockgraph.blocks.types import Dim, ShapeError, TensorType, dims_equal, format_dim

Positive = Annotated[int, Field(gt=0)]
NonNegative = Annotated[int, Field(ge=0)]


class ConvParams(BlockParams):
    """What every convolution takes: channels in and out, their grouping, the bias."""

    in_channels: int = Field(gt=0, description="channels of the input (its dimension 1)")
    out_channels: int = Field(gt=0, description="channels of the output (filters)")
    groups: int = Field(
        1, gt=0, description="split the channels into this many groups convolved apart (in_channels: depthwise)"
    )
    bias: bool = Field(True, description="learn one added bias per output channel")

    @model_validator(mode="after")
    def _groups_divide(self) -> ConvParams:
        for name in ("in_channels", "out_channels"):
            if getattr(self, name) % self.groups:
                raise ValueError(
                    f"{name} ({getattr(self, name)}) must be divisible by groups ({self.groups}); "
                    f"change groups to a divisor of both in_channels and out_channels"
                )
        return self


def output_size(size: Dim, kernel: int, stride: int, padding: int, dilation: int, what: str) -> Dim:
    """⌊(size + 2·padding − dilation·(kernel − 1) − 1) / stride⌋ + 1, as torch computes it; an expression of
    the named sizes where `size` is one (at least 1 is checked on a trial run), refused where a number is not."""
    span = dilation * (kernel - 1) + 1
    if isinstance(size, int):
        out = (size + 2 * padding - span) // stride + 1
        if out < 1:
            raise ShapeError(
                f"the {what} ({size}, padded by {padding} on each side) is shorter than the kernel's span {span} "
                f"(kernel {kernel}, dilation {dilation})",
                hint="use a smaller kernel or dilation, more padding, or a longer input",
                at=("params", "kernel"),
            )
        return out
    return sympy.floor((size + 2 * padding - span) / sympy.Integer(stride)) + 1


class Convolution(Block):
    """Base of conv1d and conv2d: the weights of torch's own layer, its functional form, and the shape rule over
    `spatial` trailing dimensions. A subclass sets `spatial`, `function`, `layer` and its Params."""

    spatial: ClassVar[int]
    function: ClassVar[Any]
    layer: ClassVar[type[nn.Conv1d] | type[nn.Conv2d]]
    axes: ClassVar[tuple[str, ...]]
    weight: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, p: Any):
        super().__init__()
        conv = self.layer(
            p.in_channels, p.out_channels, p.kernel, stride=p.stride, padding=p.padding, dilation=p.dilation,
            groups=p.groups, bias=p.bias,
        )  # fmt: skip
        self.weight = conv.weight  # [out_channels, in_channels / groups, *kernel], initialised as torch does
        self.bias = conv.bias  # [out_channels], or None
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, p.groups

    @classmethod
    def infer(cls, p: Any, x: TensorType) -> TensorType:
        channels = x.shape[1]
        if not dims_equal(channels, p.in_channels):
            raise ShapeError(
                f"input 'x' has {format_dim(channels)} channels (dimension 1 of {x.described()}), "
                f"but in_channels is {p.in_channels}",
                hint=f"convolutions take channels first, [batch, channels, {', '.join(cls.axes)}]: set in_channels: "
                f"{format_dim(channels)}, or transpose the input",
                at=("params", "in_channels"),
            )
        geometry = zip(*(_sizes(getattr(p, name), cls.spatial) for name in _GEOMETRY), strict=True)
        sizes = [
            output_size(x.shape[2 + axis], kernel, stride, padding, dilation, cls.axes[axis])
            for axis, (kernel, stride, padding, dilation) in enumerate(geometry)
        ]
        return x.with_shape(x.shape[0], p.out_channels, *sizes)

    @classmethod
    def flops(cls, p: Any, inputs: dict, outputs: tuple) -> Any:
        """2 · batch · out_channels · output positions · (in_channels / groups) · kernel positions, as torch counts
        a convolution (the bias not counted)."""
        y = outputs[0].shape
        kernel = math.prod(_sizes(p.kernel, cls.spatial))
        return 2 * y[0] * p.out_channels * math.prod(y[2:]) * (p.in_channels // p.groups) * kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return type(self).function(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        out, per_group, *kernel = self.weight.shape
        return (
            f"{per_group * self.groups}, {out}, kernel={tuple(kernel)}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}"
        )


_GEOMETRY = ("kernel", "stride", "padding", "dilation")


def _sizes(value: int | tuple[int, ...], spatial: int) -> tuple[int, ...]:
    """One size per spatial dimension: an int is the same along each."""
    return (value,) * spatial if isinstance(value, int) else tuple(value)


@register("conv1d", family="convolution")
class Conv1d(Convolution):
    """1-D convolution over [batch, in_channels, length] → [batch, out_channels, length′], as torch.nn.Conv1d.

    y[b, o, t] = bias[o] + Σ_c Σ_j W[o, c, j] · x_pad[b, g·C + c, t·stride + j·dilation], over the C =
    in_channels / groups channels of o's group g, x zero-padded by `padding` at both ends; length′ =
    ⌊(length + 2·padding − dilation·(kernel − 1) − 1) / stride⌋ + 1 (an expression where length is named).
    Whisper's front end is kernel 3, padding 1, stride 1, then stride 2 (halving the frames). It reads later
    positions, so a model with one on its target side re-runs at every decoding step.
    """

    class Params(ConvParams):
        kernel: int = Field(gt=0, description="kernel width")
        stride: int = Field(1, gt=0, description="step between output positions")
        padding: int = Field(0, ge=0, description="zeros added at both ends")
        dilation: int = Field(1, gt=0, description="spacing of the kernel's taps")

    in_ports = (Port("x", rank=3, doc="[batch, in_channels, length]"),)
    out_ports = (Port("y", doc="[batch, out_channels, length′]"),)
    example = {"in_channels": 80, "out_channels": 512, "kernel": 3, "padding": 1}
    spatial, function, layer, axes = 1, nn.functional.conv1d, nn.Conv1d, ("length",)

    @classmethod
    def infer(cls, p: Params, x: TensorType) -> TensorType:
        """[batch, in_channels, length] → [batch, out_channels, ⌊(length + 2·padding − dilation·(kernel − 1) − 1)
        / stride⌋ + 1]."""
        return super().infer(p, x)


@register("conv2d", family="convolution")
class Conv2d(Convolution):
    """2-D convolution over [batch, in_channels, height, width] → [batch, out_channels, height′, width′], as
    torch.nn.Conv2d.

    Each of kernel, stride, padding and dilation is one size for both dimensions or a pair [height, width]; each
    output size is ⌊(size + 2·padding − dilation·(kernel − 1) − 1) / stride⌋ + 1 along its dimension (an
    expression where the size is named). A kernel equal to its stride cuts an image into patches (ViT's
    patch embedding: kernel 16, stride 16); groups = in_channels is a depthwise convolution.
    """

    class Params(ConvParams):
        kernel: Positive | tuple[Positive, Positive] = Field(description="kernel size, or [height, width]")
        stride: Positive | tuple[Positive, Positive] = Field(1, description="step between outputs, or a pair")
        padding: NonNegative | tuple[NonNegative, NonNegative] = Field(
            0, description="zeros added on both sides, or [height, width]"
        )
        dilation: Positive | tuple[Positive, Positive] = Field(1, description="spacing of the kernel's taps, or a pair")

    in_ports = (Port("x", rank=4, doc="[batch, in_channels, height, width]"),)
    out_ports = (Port("y", doc="[batch, out_channels, height′, width′]"),)
    example = {"in_channels": 3, "out_channels": 768, "kernel": 16, "stride": 16}
    spatial, function, layer, axes = 2, nn.functional.conv2d, nn.Conv2d, ("height", "width")

    @classmethod
    def infer(cls, p: Params, x: TensorType) -> TensorType:
        """[batch, in_channels, height, width] → [batch, out_channels, height′, width′], each ⌊(size + 2·padding −
        dilation·(kernel − 1) − 1) / stride⌋ + 1."""
        return super().infer(p, x)
