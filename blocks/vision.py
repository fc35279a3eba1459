"""Images in: a patch embedding that turns an image into a sequence of patch vectors, learned tokens put before
that sequence ([CLS], registers), and learned positions of the 2-D patch grid, interpolated when an image's grid
is not the trained one. Together they are the front of ViT (Dosovitskiy et al. 2021, "An image is worth 16x16
words"), DeiT, DINOv2 and the vision towers of CLIP and SigLIP; the rest is a pre-norm `encoder_layer` stack.

Height and width are named dimensions like any other: a grid of `floor(height / patch)` × `floor(width / patch)`
patches is a sympy expression of them, so `inspect` and `export` keep the image size symbolic.
"""

from __future__ import annotations

from typing import Any

import sympy
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from blockgraph.blocks.flops import linear, no_flops
from blockgraph.blocks.registry import Block, BlockParams, Port, register
from blockgraph.blocks.types import Dim, ShapeError, TensorType, dims_equal, expect_last, format_dim


def patches_along(size: Dim, patch: int) -> Dim:
    """How many whole patches fit along an image side of `size` pixels: size // patch, or floor(size / patch)."""
    return size // patch if isinstance(size, int) else sympy.floor(size / patch)


def grid_of(image: TensorType, patch: int) -> tuple[Dim, Dim]:
    """The patch grid (rows, columns) of an image [batch, channels, height, width]."""
    return patches_along(image.shape[2], patch), patches_along(image.shape[3], patch)


@register("patch_embedding", family="vision")
class PatchEmbedding(Block):
    """Cut an image into patch × patch squares and project each to a vector: [batch, channels, height, width] →
    [batch, patches, dim].

    A Conv2d whose kernel and stride are both `patch`, its output [batch, dim, height / patch, width / patch]
    flattened row by row and transposed to a sequence: the patch in grid row r, column c is position
    r · (width / patch) + c. This is transformers' ViTPatchEmbeddings and SigLIP's `patch_embedding` (CLIP's
    with `bias: false`). The state_dict reads `projection.weight` [dim, channels, patch, patch] and
    `projection.bias` [dim].

    An image whose height or width is not a multiple of `patch` is an error, located at the node, since pixels
    would be dropped silently; `crop: true` drops the last rows and columns that fill no patch instead, as a
    strided convolution does (and transformers' ViT at such sizes).
    """

    class Params(BlockParams):
        channels: int = Field(3, gt=0, description="image channels (3: RGB)")
        dim: int = Field(gt=0, description="width of each patch vector (the model's d_model)")
        patch: int = Field(16, gt=0, description="side of the square patches in pixels: the kernel and the stride")
        bias: bool = Field(True, description="bias of the projection (false: CLIP)")
        crop: bool = Field(
            False,
            description="drop the last pixel rows and columns that fill no whole patch; false: such an image is an "
            "error",
        )

    in_ports = (Port("image", rank=4, doc="[batch, channels, height, width]"),)
    out_ports = (Port("y", doc="[batch, (height / patch) · (width / patch), dim], patches row by row"),)
    example = {"channels": 3, "dim": 768, "patch": 16}

    def __init__(self, p: Params):
        super().__init__()
        self.projection = nn.Conv2d(p.channels, p.dim, kernel_size=p.patch, stride=p.patch, bias=p.bias)
        self.patch, self.crop = p.patch, p.crop

    @classmethod
    def infer(cls, p: Params, image: TensorType) -> TensorType:
        """[batch, channels, height, width] → [batch, floor(height / patch) · floor(width / patch), dim]."""
        if not dims_equal(image.shape[1], p.channels):
            raise ShapeError(
                f"image {image.described()} has {format_dim(image.shape[1])} channels, but channels is {p.channels}",
                hint=f"set channels: {format_dim(image.shape[1])}, or feed [batch, {p.channels}, height, width]",
                at=("params", "channels"),
            )
        for side, size in (("height", image.shape[2]), ("width", image.shape[3])):
            if isinstance(size, int) and size < p.patch:
                raise ShapeError(
                    f"image {side} {size} is smaller than one patch ({p.patch} pixels)", at=("params", "patch")
                )
            if isinstance(size, int) and size % p.patch and not p.crop:
                raise ShapeError(_not_a_multiple(side, size, p.patch), hint=_multiple_hint(size, p.patch))
        rows, cols = grid_of(image, p.patch)
        return image.with_shape(image.shape[0], rows * cols, p.dim)

    @classmethod
    def flops(cls, p: Params, inputs: dict[str, TensorType | None], outputs: tuple[TensorType, ...]) -> Any:
        """Each patch through a [channels · patch², dim] matrix: 2 · batch · patches · channels · patch² · dim."""
        y = outputs[0]
        return linear(y.shape[0] * y.shape[1], p.channels * p.patch**2, p.dim)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if not self.crop:
            height, width = image.shape[-2:]
            for side, size in (("height", height), ("width", width)):
                if size % self.patch:
                    raise ValueError(f"{_not_a_multiple(side, size, self.patch)}; {_multiple_hint(size, self.patch)}")
        pixels = image.to(self.projection.weight.dtype)  # float32 pixels into a bfloat16 model, as transformers does
        return self.projection(pixels).flatten(2).transpose(1, 2)

    def extra_repr(self) -> str:
        return f"patch={self.patch}, crop={self.crop}"


def _not_a_multiple(side: str, size: int, patch: int) -> str:
    return f"image {side} {size} is not a multiple of the patch size {patch}"


def _multiple_hint(size: int, patch: int) -> str:
    below, above = size - size % patch, size - size % patch + patch
    return (
        f"resize the images to a multiple of {patch} ({below or above} or {above}), or set crop: true to drop the "
        f"last {size % patch} pixel(s)"
    )


@register("prepend_tokens", family="vision")
class PrependTokens(Block):
    """Put `count` learned vectors before the sequence: [batch, seq, dim] → [batch, count + seq, dim] ([CLS] tokens).

    y = [t_1, …, t_count, x_1, …, x_seq] for every row of the batch, with the same learned t_i for all: ViT's and
    CLIP's [CLS] (count 1), DeiT's [CLS] and distillation tokens (count 2). `after: n` puts them after the first n
    positions instead: DINOv2's register tokens go after [CLS] once the positions are added (after: 1). The
    state_dict reads `tokens` [count, dim], drawn from a normal of std `init_std` truncated to ±2 (as transformers'
    ViT). There is no padding mask: an image has none; a padded sequence would need its mask extended by `count`
    False columns at the same place.
    """

    class Params(BlockParams):
        dim: int = Field(gt=0, description="width of the tokens (the model's d_model)")
        count: int = Field(1, gt=0, description="how many learned tokens (1: [CLS]; DeiT: 2; registers: 4)")
        after: int = Field(0, ge=0, description="positions of x kept before the tokens (0: the tokens come first)")
        init_std: float = Field(0.02, gt=0, description="standard deviation of the initial tokens")

    in_ports = (Port("x", rank=3, doc="[batch, seq, dim]"),)
    out_ports = (Port("y", doc="[batch, count + seq, dim]: x[:, :after], the tokens, x[:, after:]"),)
    example = {"dim": 768, "count": 1}

    def __init__(self, p: Params):
        super().__init__()
        self.tokens = nn.Parameter(torch.empty(p.count, p.dim))
        nn.init.trunc_normal_(self.tokens, std=p.init_std)
        self.after = p.after

    @classmethod
    def infer(cls, p: Params, x: TensorType) -> TensorType:
        """[batch, seq, dim] → [batch, count + seq, dim], with after ≤ seq."""
        expect_last(x, p.dim, "dim")
        seq = x.shape[1]
        if p.after and isinstance(seq, int) and p.after > seq:
            raise ShapeError(f"after is {p.after}, but x {x.described()} has {seq} positions", at=("params", "after"))
        return x.with_shape(x.shape[0], p.count + seq, p.dim)

    flops = no_flops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.tokens.to(x.dtype).expand(x.size(0), -1, -1)
        if self.after:
            return torch.cat((x[:, : self.after], tokens, x[:, self.after :]), dim=1)
        return torch.cat((tokens, x), dim=1)

    def extra_repr(self) -> str:
        return f"count={self.tokens.size(0)}, dim={self.tokens.size(1)}, after={self.after}"


@register("patch_position", family="vision")
class PatchPosition(Block):
    """Add learned positions of a 2-D patch grid (and of `prefix` tokens before it) to x, then dropout; resized
    bicubically when an image's grid is not the trained one.

    The table P [prefix + grid², dim] holds a row per prefix token ([CLS]), then a row per patch of the trained
    grid × grid, row by row (ViT-B/16 at 224 × 224: 1 + 14 · 14 = 197 rows): y = dropout(x + P). With the `image`
    input connected, an image of height × width pixels has a grid of (height // patch) × (width // patch); where
    that is not grid × grid, the patch rows are resized to it as transformers' ViT does with
    `interpolate_pos_encoding=True`: viewed as a [dim, grid, grid] picture, resized by
    `torch.nn.functional.interpolate(mode="bicubic", align_corners=False)` (in float32), the prefix rows kept
    (exported programs resize always, which at the trained grid is exactly the identity, so the image size stays
    dynamic). Without `image`, x must have exactly prefix + grid² positions. The state_dict reads `pe`
    [prefix + grid², dim].
    """

    class Params(BlockParams):
        dim: int = Field(gt=0, description="model width")
        grid: int = Field(gt=0, description="patches per side of the trained square grid (image_size / patch: 14)")
        patch: int = Field(16, gt=0, description="patch side in pixels: an image's grid is its size // patch")
        prefix: int = Field(1, ge=0, description="positions before the patches ([CLS]: 1; SigLIP: 0)")
        dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the sum")
        init_std: float = Field(0.02, gt=0, description="standard deviation of the initial positions (truncated ±2)")

    in_ports = (
        Port("x", rank=3, doc="[batch, prefix + patches, dim]: the prefix tokens, then the patches row by row"),
        Port("image", rank=4, optional=True, doc="[batch, channels, height, width]: only its size is read"),
    )
    out_ports = (Port("y", doc="x + P (resized to the image's grid), [batch, prefix + patches, dim]"),)
    example = {"dim": 768, "grid": 14, "patch": 16, "prefix": 1}

    def __init__(self, p: Params):
        super().__init__()
        self.pe = nn.Parameter(torch.empty(p.prefix + p.grid**2, p.dim))
        nn.init.trunc_normal_(self.pe, std=p.init_std)
        self.grid, self.patch, self.prefix = p.grid, p.patch, p.prefix
        self.dropout = nn.Dropout(p.dropout)

    @classmethod
    def infer(cls, p: Params, x: TensorType, image: TensorType | None = None) -> TensorType:
        """[batch, prefix + patches, dim] (image [batch, channels, height, width]) → the same; patches is grid² or,
        with image, floor(height / patch) · floor(width / patch)."""
        expect_last(x, p.dim, "dim")
        if image is None:
            expected: Dim = p.prefix + p.grid**2
            whence = f"prefix + grid² = {p.prefix} + {p.grid}²"
            hint = "connect the image (in: {x: ..., image: IMAGE}) to resize the positions to its grid"
        else:
            rows, cols = grid_of(image, p.patch)
            expected = p.prefix + rows * cols
            whence = f"prefix + its grid of patches of {p.patch} pixels"
            hint = "check prefix and patch against the patch embedding and the tokens put before it"
        if not dims_equal(x.shape[1], expected):
            where = f" of image {image.described()}" if image is not None else ""
            raise ShapeError(
                f"x {x.described()} has {format_dim(x.shape[1])} positions; the table gives {format_dim(expected)} "
                f"({whence}{where})",
                hint=hint,
                at=("in", "x"),
            )
        return x

    flops = no_flops

    def forward(self, x: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        if image is None:
            return self.dropout(x + self.pe)
        return self.dropout(x + self.table(image.shape[-2] // self.patch, image.shape[-1] // self.patch))

    def table(self, rows: Any, cols: Any) -> torch.Tensor:
        """The position rows for a grid of rows × cols patches: the trained table, or its patch rows resized."""
        if not torch.compiler.is_exporting() and rows == self.grid and cols == self.grid:
            return self.pe
        dim = self.pe.size(-1)
        prefix, patches = self.pe[: self.prefix], self.pe[self.prefix :]
        square = patches.reshape(1, self.grid, self.grid, dim).permute(0, 3, 1, 2)  # as transformers lays it out
        resized = F.interpolate(square.float(), size=(rows, cols), mode="bicubic", align_corners=False)
        return torch.cat((prefix, resized.to(self.pe.dtype).permute(0, 2, 3, 1).reshape(-1, dim)), dim=0)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, patch={self.patch}, prefix={self.prefix}"
