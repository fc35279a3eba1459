"""Heads of contrastive image-text models (CLIP): the state at each text's end-of-text token, embeddings scaled to
unit length, and the similarity of every image to every text at a learned temperature."""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field
from torch import nn

from blockgraph.blocks.flops import no_flops
from blockgraph.blocks.registry import Block, BlockParams, Port, register
from blockgraph.blocks.stepping import by_position
from blockgraph.blocks.types import ShapeError, TensorType, dims_equal, format_dim, format_shape


@register("select_at_token", family="combine")
class SelectAtToken(Block):
    """Each row's state at the position of a token: y[b] = x[b, t_b] (CLIP's text pooler reads end-of-text).

    t_b is the first position of `token` in row b of `tokens` (the first position when the row has none), or,
    with `token: null`, the position of the row's largest id (its first, on a tie): original CLIP checkpoints
    find end-of-text so, as it is the last id of their vocabulary.
    """

    class Params(BlockParams):
        token: int | None = Field(
            None, ge=0, description="the id whose first position is read; null: the position of the largest id"
        )

    in_ports = (
        Port("x", rank=3, doc="[batch, seq, dim]"),
        Port("tokens", rank=2, dtype="int", doc="[batch, seq], the ids x was computed from"),
    )
    out_ports = (Port("y", doc="[batch, dim]"),)
    example = {"token": None}

    def __init__(self, p: Params):
        super().__init__()
        self.token = p.token

    @classmethod
    def infer(cls, p: Params, x: TensorType, tokens: TensorType) -> TensorType:
        """[batch, seq, dim], tokens [batch, seq] → [batch, dim]."""
        if not all(dims_equal(a, b) for a, b in zip(tokens.shape, x.shape[:2], strict=True)):
            raise ShapeError(
                f"tokens {tokens.described()} must be [batch, seq] = {format_shape(x.shape[:2])} of x {x.described()}",
                hint="feed the token ids x was computed from",
                at=("in", "tokens"),
            )
        return x.with_shape(x.shape[0], x.shape[2])

    flops = no_flops

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        found = tokens if self.token is None else (tokens == self.token).int()
        at = found.argmax(dim=-1)  # the first maximum of each row
        # gather, not take_along_dim, whose broadcasting fixes the batch and length in an exported program
        return x.gather(1, at[:, None, None].expand(-1, 1, x.size(-1))).squeeze(1)

    def extra_repr(self) -> str:
        return "largest id" if self.token is None else f"token={self.token}"


@register("l2_normalize", family="norm")
class L2Normalize(Block):
    """Scale the last dimension to unit Euclidean length: y = x / max(‖x‖₂, eps) (CLIP's image and text embeddings).

    Unlike layer_norm it neither centres nor learns anything: it keeps only the direction of x.
    """

    class Params(BlockParams):
        eps: float = Field(1e-12, gt=0, description="the least norm divided by (a zero vector stays zero)")

    in_ports = (Port("x", doc="[..., dim]"),)
    out_ports = (Port("y", doc="[..., dim], each vector of length 1"),)
    example = {}

    def __init__(self, p: Params):
        super().__init__()
        self.eps = p.eps

    @classmethod
    def infer(cls, p: Params, x: TensorType) -> TensorType:
        """[..., dim] → [..., dim]."""
        return x

    flops = no_flops

    stepping = by_position

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(self.eps)


@register("contrastive_logits", family="combine")
class ContrastiveLogits(Block):
    """Every image against every text: logits_per_image = exp(s)·I Tᵀ, logits_per_text its transpose (CLIP).

    I [images, dim] and T [texts, dim] are the (normalised) embeddings, so each logit is a cosine similarity times
    the learned temperature exp(s); s starts at `logit_scale` (ln 1/0.07 in CLIP) and is the tensor `logit_scale`.
    """

    class Params(BlockParams):
        logit_scale: float = Field(
            math.log(1 / 0.07), description="the initial log temperature s (the logits are scaled by exp(s))"
        )

    in_ports = (
        Port("image", rank=2, doc="[images, dim]"),
        Port("text", rank=2, doc="[texts, dim]"),
    )
    out_ports = (
        Port("logits_per_image", doc="[images, texts]"),
        Port("logits_per_text", doc="[texts, images]"),
    )
    example = {}

    def __init__(self, p: Params):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(p.logit_scale))

    @classmethod
    def infer(cls, p: Params, image: TensorType, text: TensorType) -> tuple[TensorType, TensorType]:
        """image [images, dim], text [texts, dim] → [images, texts], [texts, images]."""
        if not dims_equal(image.shape[1], text.shape[1]):
            raise ShapeError(
                f"image {image.described()} and text {text.described()} must share their width "
                f"({format_dim(image.shape[1])} vs {format_dim(text.shape[1])})",
                hint="project both towers to the same dimension",
                at=("in", "text"),
            )
        if image.dtype != text.dtype:
            raise ShapeError(f"image is {image.described()}, but text is {text.described()}", at=("in", "text"))
        return image.with_shape(image.shape[0], text.shape[0]), image.with_shape(text.shape[0], image.shape[0])

    @classmethod
    def flops(cls, p: Params, inputs: dict[str, TensorType | None], outputs: tuple[TensorType, ...]) -> Any:
        """T Iᵀ: 2·texts·images·dim (the transpose is free)."""
        image, text = inputs["image"], inputs["text"]
        assert image is not None and text is not None
        return 2 * image.shape[0] * text.shape[0] * image.shape[1]

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        per_text = text @ image.t() * self.logit_scale.exp()
        return per_text.t(), per_text
