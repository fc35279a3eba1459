"""Whole Transformer layers composed from the library's blocks: encoder layer and decoder layer."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from blocks.attention import MultiHeadAttention
from blocks.feedforward import FeedForward
from blocks.flops import linear, multi_head, tokens
from blocks.registry import Block, BlockParams, Port, register
from blocks.types import ShapeError, TensorType, dims_equal, expect_last, format_dim


class LayerParams(BlockParams):
    """Parameters shared by encoder_layer and decoder_layer."""

    d_model: int = Field(gt=0, description="model width; split evenly over the heads")
    heads: int = Field(gt=0, description="number of attention heads h (d_k = d_model / h)")
    d_ff: int = Field(gt=0, description="feed-forward hidden width (2048 in the base Transformer)")
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="dropout on attention weights, FFN hidden units and each sublayer output"
    )
    activation: Literal["relu", "gelu"] = Field("relu", description="feed-forward activation")
    norm_first: bool = Field(False, description="pre-norm: x + sublayer(LayerNorm(x)) instead of LayerNorm(x + …)")
    eps: float = Field(1e-5, gt=0, description="LayerNorm epsilon")

    @model_validator(mode="after")
    def _heads_divide(self) -> LayerParams:
        if self.d_model % self.heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by heads ({self.heads}); "
                f"change heads to a divisor of {self.d_model} or d_model to a multiple of {self.heads}"
            )
        return self

    def attention(self, causal: bool) -> MultiHeadAttention:
        return MultiHeadAttention(
            MultiHeadAttention.Params(d_model=self.d_model, heads=self.heads, dropout=self.dropout, causal=causal)
        )

    def feed_forward(self) -> FeedForward:
        return FeedForward(
            FeedForward.Params(d_model=self.d_model, d_ff=self.d_ff, dropout=self.dropout, activation=self.activation)
        )


def _dropout(dropout: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    """`dropout(x)`, or x itself without a module call where dropout is the identity (eval mode or p = 0)."""
    return dropout(x) if dropout.training and dropout.p > 0 else x


def _check_mask(mask: TensorType | None, seq: TensorType, mask_name: str, seq_name: str) -> None:
    """A key padding mask must be [batch, len] of the sequence it masks."""
    if mask is None:
        return
    if not (dims_equal(mask.shape[0], seq.shape[0]) and dims_equal(mask.shape[1], seq.shape[1])):
        raise ShapeError(
            f"{mask_name} {mask.described()} must be [batch, len] = "
            f"[{format_dim(seq.shape[0])}, {format_dim(seq.shape[1])}] of {seq_name} {seq.described()}",
            hint=f"feed the padding mask of {seq_name!r}'s tokens",
        )


@register("encoder_layer", family="layer")
class EncoderLayer(Block):
    """Transformer encoder layer: self-attention → Add & Norm → feed-forward → Add & Norm.

    Post-norm (default, the paper): x = norm1(x + dropout(self_attn(x))); y = norm2(x + dropout(ffn(x))).
    Pre-norm (`norm_first`): x = x + dropout(self_attn(norm1(x))); y = x + dropout(ffn(norm2(x))); a pre-norm
    stack usually ends with a `layer_norm` node. Equivalent to `nn.TransformerEncoderLayer(batch_first=True)`
    with the same settings; the state_dict reads self_attn.w_q…w_o, ffn.w_1/w_2, norm1, norm2.
    """

    Params = LayerParams

    in_ports = (
        Port("x", rank=3, doc="[batch, seq, d_model]"),
        Port("src_key_padding_mask", rank=2, dtype="bool", optional=True, doc="[batch, seq], True = padding"),
    )
    out_ports = (Port("y", doc="[batch, seq, d_model]"),)
    example = {"d_model": 512, "heads": 8, "d_ff": 2048, "dropout": 0.1}

    def __init__(self, p: LayerParams):
        super().__init__()
        self.norm_first = p.norm_first
        self.self_attn = p.attention(causal=False)
        self.ffn = p.feed_forward()
        self.norm1 = nn.LayerNorm(p.d_model, eps=p.eps)
        self.norm2 = nn.LayerNorm(p.d_model, eps=p.eps)
        self.dropout1 = nn.Dropout(p.dropout)
        self.dropout2 = nn.Dropout(p.dropout)

    @classmethod
    def infer(cls, p: LayerParams, x: TensorType, src_key_padding_mask: TensorType | None = None) -> TensorType:
        """[batch, seq, d_model] (mask [batch, seq]) → [batch, seq, d_model]."""
        expect_last(x, p.d_model, "d_model")
        _check_mask(src_key_padding_mask, x, "src_key_padding_mask", "x")
        return x

    @classmethod
    def flops(cls, p: Params, inputs: dict, outputs: tuple) -> Any:
        """Self-attention, then the feed-forward's W_1 and W_2."""
        x = inputs["x"].shape
        return multi_head(p.d_model, x) + 2 * linear(tokens(x), p.d_model, p.d_ff)

    def forward(self, x: torch.Tensor, src_key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.norm_first:
            x = x + _dropout(self.dropout1, self.self_attn(self.norm1(x), None, None, src_key_padding_mask))
            return x + _dropout(self.dropout2, self.ffn(self.norm2(x)))
        x = self.norm1(x + _dropout(self.dropout1, self.self_attn(x, None, None, src_key_padding_mask)))
        return self.norm2(x + _dropout(self.dropout2, self.ffn(x)))


@register("decoder_layer", family="layer")
class DecoderLayer(Block):
    """Transformer decoder layer: causal self-attention → Add & Norm → cross-attention → Add & Norm → FFN → Add & Norm.

    The self-attention is masked so position i sees positions ≤ i only; the cross-attention takes queries
    from the decoder and keys/values from the encoder output `memory`. Post-norm (default) or pre-norm
    (`norm_first`), as in `EncoderLayer`. Equivalent to `nn.TransformerDecoderLayer(batch_first=True)` called
    with a causal tgt_mask; the state_dict reads self_attn, cross_attn, ffn, norm1, norm2, norm3.
    """

    Params = LayerParams

    in_ports = (
        Port("x", rank=3, doc="decoder input [batch, tgt_len, d_model]"),
        Port("memory", rank=3, doc="encoder output [batch, src_len, d_model]"),
        Port("tgt_key_padding_mask", rank=2, dtype="bool", optional=True, doc="[batch, tgt_len], True = padding"),
        Port("memory_key_padding_mask", rank=2, dtype="bool", optional=True, doc="[batch, src_len], True = padding"),
    )
    out_ports = (Port("y", doc="[batch, tgt_len, d_model]"),)
    example = {"d_model": 512, "heads": 8, "d_ff": 2048, "dropout": 0.1}

    def __init__(self, p: LayerParams):
        super().__init__()
        self.norm_first = p.norm_first
        self.self_attn = p.attention(causal=True)
        self.cross_attn = p.attention(causal=False)
        self.ffn = p.feed_forward()
        self.norm1 = nn.LayerNorm(p.d_model, eps=p.eps)
        self.norm2 = nn.LayerNorm(p.d_model, eps=p.eps)
        self.norm3 = nn.LayerNorm(p.d_model, eps=p.eps)
        self.dropout1 = nn.Dropout(p.dropout)
        self.dropout2 = nn.Dropout(p.dropout)
        self.dropout3 = nn.Dropout(p.dropout)

    @classmethod
    def infer(
        cls,
        p: LayerParams,
        x: TensorType,
        memory: TensorType,
        tgt_key_padding_mask: TensorType | None = None,
        memory_key_padding_mask: TensorType | None = None,
    ) -> TensorType:
        """x [batch, tgt_len, d_model] and memory [batch, src_len, d_model] → [batch, tgt_len, d_model]."""
        expect_last(x, p.d_model, "d_model")
        expect_last(memory, p.d_model, "d_model", port="memory")
        if not dims_equal(x.shape[0], memory.shape[0]):
            raise ShapeError(
                f"x {x.described()} and memory {memory.described()} have different batch sizes "
                f"({format_dim(x.shape[0])} vs {format_dim(memory.shape[0])})",
                hint="memory must be the encoder output for the same batch",
            )
        _check_mask(tgt_key_padding_mask, x, "tgt_key_padding_mask", "x")
        _check_mask(memory_key_padding_mask, memory, "memory_key_padding_mask", "memory")
        return x

    @classmethod
    def flops(cls, p: Params, inputs: dict, outputs: tuple) -> Any:
        """Self-attention, attention over the memory, then the feed-forward's W_1 and W_2."""
        x, memory = inputs["x"].shape, inputs["memory"].shape
        return (
            multi_head(p.d_model, x)
            + multi_head(p.d_model, x, memory, memory)
            + 2 * linear(tokens(x), p.d_model, p.d_ff)
        )

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        tgt_key_padding_mask: torch.Tensor | None = None,
        memory_key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.norm_first:
            x = x + _dropout(self.dropout1, self.self_attn(self.norm1(x), None, None, tgt_key_padding_mask))
            x = x + _dropout(self.dropout2, self.cross_attn(self.norm2(x), memory, memory, memory_key_padding_mask))
            return x + _dropout(self.dropout3, self.ffn(self.norm3(x)))
        x = self.norm1(x + _dropout(self.dropout1, self.self_attn(x, None, None, tgt_key_padding_mask)))
        x = self.norm2(x + _dropout(self.dropout2, self.cross_attn(x, memory, memory, memory_key_padding_mask)))
        return self.norm3(x + _dropout(self.dropout3, self.ffn(x)))
