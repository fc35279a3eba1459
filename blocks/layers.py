"""Whole Transformer layers composed from the library's blocks: encoder layer and decoder layer."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import nn

from blockgraph.blocks.activations import ActivationName
from blockgraph.blocks.attention import MultiHeadAttention
from blockgraph.blocks.feedforward import FeedForward, FeedForwardParams
from blockgraph.blocks.registry import Block, BlockParams, Port, register
from blockgraph.blocks.stepping import StepCache, Stepping
from blockgraph.blocks.types import ShapeError, TensorType, dims_equal, expect_last, format_dim


class LayerParams(BlockParams):
    """Parameters shared by encoder_layer and decoder_layer."""

    d_model: int = Field(gt=0, description="model width; split evenly over the heads")
    heads: int = Field(gt=0, description="number of attention heads h (d_k = d_model / h)")
    d_ff: int = Field(gt=0, description="feed-forward hidden width (2048 in the base Transformer)")
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="dropout on attention weights, FFN hidden units and each sublayer output"
    )
    attention_dropout: float | None = Field(None, ge=0.0, lt=1.0, description="on attention weights (default dropout)")
    activation_dropout: float | None = Field(
        None, ge=0.0, lt=1.0, description="on the FFN hidden units (default dropout)"
    )
    activation: ActivationName = Field(
        "relu",
        description="feed-forward activation: relu, gelu, gelu_tanh, quick_gelu (CLIP), silu (Marian's swish), tanh, "
        "sigmoid",
    )
    gated: bool = Field(False, description="gated feed-forward act(W₁x) ⊙ W₃x (GEGLU, SwiGLU)")
    bias: bool = Field(True, description="biases in the attention projections and the feed-forward")
    norm_bias: bool = Field(True, description="LayerNorm shift β")
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

    def attention_params(self, causal: bool) -> MultiHeadAttention.Params:
        dropout = self.dropout if self.attention_dropout is None else self.attention_dropout
        return MultiHeadAttention.Params(
            d_model=self.d_model, heads=self.heads, dropout=dropout, causal=causal, bias=self.bias
        )

    def attention(self, causal: bool) -> MultiHeadAttention:
        return MultiHeadAttention(self.attention_params(causal))

    def feed_forward_params(self) -> FeedForwardParams:
        return FeedForwardParams(
            d_model=self.d_model,
            d_ff=self.d_ff,
            dropout=self.dropout if self.activation_dropout is None else self.activation_dropout,
            activation=self.activation,
            gated=self.gated,
            bias=self.bias,
        )

    def feed_forward(self) -> FeedForward:
        return FeedForward(self.feed_forward_params())

    def norm(self) -> nn.LayerNorm:
        return nn.LayerNorm(self.d_model, eps=self.eps, bias=self.norm_bias)

    def attention_flops(self, query: TensorType, key: TensorType | None = None) -> Any:
        """One of the layer's attentions, by multi_head_attention's rule (a mask does not change the count)."""
        return MultiHeadAttention.flops(self.attention_params(causal=False), {"query": query, "key": key}, ())

    def ffn_flops(self, x: TensorType) -> Any:
        """The layer's feed-forward, by feed_forward's rule."""
        return FeedForward.flops(self.feed_forward_params(), {"x": x}, ())


def _dropout(dropout: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    """`dropout(x)`, or x itself without a module call where dropout is the identity (eval mode or p = 0)."""
    return dropout(x) if dropout.training and dropout.p > 0 else x


def _without_weights(out: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """What a layer's attention returns: y alone, as a layer builds its attentions without need_weights."""
    assert isinstance(out, torch.Tensor)
    return out


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
        self.norm1 = p.norm()
        self.norm2 = p.norm()
        self.dropout1 = nn.Dropout(p.dropout)
        self.dropout2 = nn.Dropout(p.dropout)

    @classmethod
    def infer(cls, p: LayerParams, x: TensorType, src_key_padding_mask: TensorType | None = None) -> TensorType:
        """[batch, seq, d_model] (mask [batch, seq]) → [batch, seq, d_model]."""
        expect_last(x, p.d_model, "d_model")
        _check_mask(src_key_padding_mask, x, "src_key_padding_mask", "x")
        return x

    @classmethod
    def flops(cls, p: LayerParams, inputs: dict, outputs: tuple) -> Any:
        """Self-attention, then the feed-forward's W_1 and W_2."""
        return p.attention_flops(inputs["x"]) + p.ffn_flops(inputs["x"])

    def forward(self, x: torch.Tensor, src_key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.norm_first:
            x = x + _dropout(self.dropout1, self.self_attn(self.norm1(x), key_padding_mask=src_key_padding_mask))
            return x + _dropout(self.dropout2, self.ffn(self.norm2(x)))
        x = self.norm1(x + _dropout(self.dropout1, self.self_attn(x, key_padding_mask=src_key_padding_mask)))
        return self.norm2(x + _dropout(self.dropout2, self.ffn(x)))


class DecoderParams(LayerParams):
    """decoder_layer's parameters: those of every layer, and whether it attends to an encoder's memory."""

    cross_attention: bool = Field(
        True, description="attend to the encoder output `memory`; false: a decoder-only layer (GPT)"
    )


@register("decoder_layer", family="layer")
class DecoderLayer(Block):
    """Transformer decoder layer: causal self-attention, cross-attention, FFN, each Add & Norm; or decoder-only (GPT).

    Post-norm: x = norm1(x + self_attn(x)); x = norm2(x + cross_attn(x, memory)); y = norm3(x + ffn(x)).

    The self-attention is masked so position i sees positions ≤ i only (and, with `tgt_mask`, what that mask
    allows too); the cross-attention takes queries from the decoder and keys/values from the encoder output
    `memory`. With `cross_attention: false` the layer has no cross-attention and no memory: a decoder-only
    (GPT) layer. Post-norm (default) or pre-norm (`norm_first`), as in `EncoderLayer`. Equivalent to
    `nn.TransformerDecoderLayer(batch_first=True)` called with a causal tgt_mask; the state_dict reads
    self_attn, cross_attn, ffn, norm1, norm2, norm3 (self_attn, ffn, norm1, norm2 without cross-attention).
    """

    Params = DecoderParams

    in_ports = (
        Port("x", rank=3, doc="decoder input [batch, tgt_len, d_model]"),
        Port("memory", rank=3, optional=True, doc="encoder output [batch, src_len, d_model] (with cross_attention)"),
        Port("tgt_key_padding_mask", rank=2, dtype="bool", optional=True, doc="[batch, tgt_len], True = padding"),
        Port("memory_key_padding_mask", rank=2, dtype="bool", optional=True, doc="[batch, src_len], True = padding"),
        Port(
            "tgt_mask",
            rank=(2, 3),
            dtype="any",
            optional=True,
            doc="more masking of the self-attention: [tgt_len, tgt_len] (or [batch·heads, …]), bool True = masked",
        ),
    )
    out_ports = (Port("y", doc="[batch, tgt_len, d_model]"),)
    example = {"d_model": 512, "heads": 8, "d_ff": 2048, "dropout": 0.1}

    def __init__(self, p: DecoderParams):
        super().__init__()
        self.norm_first = p.norm_first
        self.self_attn = p.attention(causal=True)
        self.cross_attn = p.attention(causal=False) if p.cross_attention else None
        self.ffn = p.feed_forward()
        self.norm1 = p.norm()
        self.norm2 = p.norm()
        self.norm3 = p.norm() if p.cross_attention else None
        self.dropout1 = nn.Dropout(p.dropout)
        self.dropout2 = nn.Dropout(p.dropout)
        self.dropout3 = nn.Dropout(p.dropout)

    @classmethod
    def infer(
        cls,
        p: DecoderParams,
        x: TensorType,
        memory: TensorType | None = None,
        tgt_key_padding_mask: TensorType | None = None,
        memory_key_padding_mask: TensorType | None = None,
        tgt_mask: TensorType | None = None,
    ) -> TensorType:
        """x [batch, tgt_len, d_model] and memory [batch, src_len, d_model] → [batch, tgt_len, d_model]."""
        expect_last(x, p.d_model, "d_model")
        if memory is None and p.cross_attention:
            raise ShapeError(
                "decoder_layer attends to an encoder's output: connect `memory`",
                hint="for a decoder-only (GPT) layer (causal self-attention and feed-forward, no memory), set "
                "`cross_attention: false` in its params",
            )
        if memory is not None and not p.cross_attention:
            raise ShapeError("memory is connected, but cross_attention is false", at=("params", "cross_attention"))
        if memory is not None:
            expect_last(memory, p.d_model, "d_model", port="memory")
            if not dims_equal(x.shape[0], memory.shape[0]):
                raise ShapeError(
                    f"x {x.described()} and memory {memory.described()} have different batch sizes "
                    f"({format_dim(x.shape[0])} vs {format_dim(memory.shape[0])})",
                    hint="memory must be the encoder output for the same batch",
                )
            _check_mask(memory_key_padding_mask, memory, "memory_key_padding_mask", "memory")
        _check_mask(tgt_key_padding_mask, x, "tgt_key_padding_mask", "x")
        if tgt_mask is not None:
            MultiHeadAttention.infer(p.attention_params(causal=True), x, attn_mask=tgt_mask)
        return x

    @classmethod
    def flops(cls, p: DecoderParams, inputs: dict, outputs: tuple) -> Any:
        """Self-attention, attention over the memory, then the feed-forward's W_1 and W_2 (and W_3)."""
        x = inputs["x"]
        cross = p.attention_flops(x, inputs["memory"]) if p.cross_attention else 0
        return p.attention_flops(x) + cross + p.ffn_flops(x)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor | None = None,
        tgt_key_padding_mask: torch.Tensor | None = None,
        memory_key_padding_mask: torch.Tensor | None = None,
        tgt_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        def attend_self(h: torch.Tensor) -> torch.Tensor:
            return self.self_attn(h, key_padding_mask=tgt_key_padding_mask, attn_mask=tgt_mask)

        def attend_memory(h: torch.Tensor) -> torch.Tensor:
            return self.cross()(h, memory, memory, key_padding_mask=memory_key_padding_mask)

        return self.layer(x, attend_self, attend_memory)

    @classmethod
    def stepping(cls, p: DecoderParams, ports: Mapping[str, bool]) -> Stepping | None:
        """The self-attention keeps its keys and values, the cross-attention the memory's."""
        fixed = not (ports.get("memory") or ports.get("memory_key_padding_mask"))
        return "state" if ports.get("x") and fixed and "tgt_mask" not in ports else None

    @classmethod
    def shares_fixed(cls, p: DecoderParams, ports: Mapping[str, bool]) -> bool:
        """The memory goes to the cross-attention, which groups the queries by source."""
        return True

    def step(
        self,
        cache: StepCache,
        x: torch.Tensor,
        memory: torch.Tensor | None = None,
        tgt_key_padding_mask: torch.Tensor | None = None,
        memory_key_padding_mask: torch.Tensor | None = None,
        tgt_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The layer over the new positions: each attention keeps its own cache."""
        own = cache.child("self_attn", {"query": True, "key_padding_mask": True})
        cross = cache.child("cross_attn", {"query": True, "key": False, "value": False, "key_padding_mask": False})

        def attend_self(h: torch.Tensor) -> torch.Tensor:
            return _without_weights(self.self_attn.step(own, h, key_padding_mask=tgt_key_padding_mask))

        def attend_memory(h: torch.Tensor) -> torch.Tensor:
            out = self.cross().step(cross, h, memory, memory, key_padding_mask=memory_key_padding_mask)
            return _without_weights(out)

        return self.layer(x, attend_self, attend_memory)

    def cross(self) -> MultiHeadAttention:
        """The cross-attention, which `layer` calls only in a layer that has one (`cross_attention`)."""
        assert self.cross_attn is not None
        return self.cross_attn

    def layer(
        self,
        x: torch.Tensor,
        attend_self: Callable[[torch.Tensor], torch.Tensor],
        attend_memory: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """The equations of the layer, whichever way its attentions run (whole sequences or decoding steps)."""
        if self.norm_first:
            x = x + _dropout(self.dropout1, attend_self(self.norm1(x)))
            if self.cross_attn is not None:
                x = x + _dropout(self.dropout2, attend_memory(self.norm2(x)))
            last = self.norm3 if self.norm3 is not None else self.norm2
            return x + _dropout(self.dropout3, self.ffn(last(x)))
        x = self.norm1(x + _dropout(self.dropout1, attend_self(x)))
        if self.cross_attn is not None:
            x = self.norm2(x + _dropout(self.dropout2, attend_memory(x)))
        last = self.norm3 if self.norm3 is not None else self.norm2
        return last(x + _dropout(self.dropout3, self.ffn(x)))
