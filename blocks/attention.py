"""Attention blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from blocks.registry import Block, BlockParams, Port, register
from blocks.types import ShapeError, TensorType, dims_equal, expect_last, format_dim


def combine_masks(
    query_len: int,
    key_len: int,
    key_padding_mask: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    causal: bool,
    device: torch.device,
) -> torch.Tensor | None:
    """One mask for `scaled_dot_product_attention`: bool (True = may attend) or additive float.

    Inputs follow `nn.MultiheadAttention`: in boolean masks True means *masked out*.
    """
    allowed: torch.Tensor | None = None
    if key_padding_mask is not None:
        allowed = ~key_padding_mask[:, None, None, :]
    if causal:
        tril = torch.ones(query_len, key_len, dtype=torch.bool, device=device).tril()
        allowed = tril if allowed is None else allowed & tril
    if attn_mask is None:
        return allowed
    if attn_mask.dtype == torch.bool:
        return ~attn_mask if allowed is None else allowed & ~attn_mask
    if allowed is None:
        return attn_mask
    return attn_mask.masked_fill(~allowed, float("-inf"))


@register("multi_head_attention", family="attention")
class MultiHeadAttention(Block):
    """Multi-head attention: h heads of softmax(QKᵀ/√d_k)V over W_Q, W_K, W_V projections, concatenated, then W_O.

    Self-attention when only `query` is given; cross-attention when `key`/`value` come from another
    tensor (e.g. the encoder output). Boolean masks use True for positions that may NOT be attended.
    """

    class Params(BlockParams):
        d_model: int = Field(gt=0, description="model width; split evenly over the heads")
        heads: int = Field(gt=0, description="number of attention heads h (d_k = d_model / h)")
        dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the attention weights")
        bias: bool = Field(True, description="bias in the W_Q, W_K, W_V, W_O projections")
        causal: bool = Field(False, description="forbid attending to later positions (decoder self-attention)")

        @model_validator(mode="after")
        def _heads_divide(self) -> MultiHeadAttention.Params:
            if self.d_model % self.heads:
                raise ValueError(f"d_model ({self.d_model}) must be divisible by heads ({self.heads})")
            return self

    in_ports = (
        Port("query", rank=3, doc="[batch, query_len, d_model]"),
        Port("key", rank=3, optional=True, doc="[batch, key_len, d_model]; defaults to query"),
        Port("value", rank=3, optional=True, doc="[batch, key_len, d_model]; defaults to key"),
        Port("key_padding_mask", rank=2, dtype="bool", optional=True, doc="[batch, key_len], True = padding"),
        Port("attn_mask", rank=(2, 3), dtype="any", optional=True, doc="[query_len, key_len], bool or additive"),
    )
    example = {"d_model": 512, "heads": 8, "dropout": 0.1}

    def __init__(self, p: Params):
        super().__init__()
        self.heads, self.d_k, self.causal, self.dropout = p.heads, p.d_model // p.heads, p.causal, p.dropout
        self.w_q = nn.Linear(p.d_model, p.d_model, bias=p.bias)
        self.w_k = nn.Linear(p.d_model, p.d_model, bias=p.bias)
        self.w_v = nn.Linear(p.d_model, p.d_model, bias=p.bias)
        self.w_o = nn.Linear(p.d_model, p.d_model, bias=p.bias)

    @classmethod
    def infer(
        cls,
        p: Params,
        query: TensorType,
        key: TensorType | None = None,
        value: TensorType | None = None,
        key_padding_mask: TensorType | None = None,
        attn_mask: TensorType | None = None,
    ) -> TensorType:
        """query [batch, q_len, d_model], key/value [batch, k_len, d_model] → [batch, q_len, d_model]."""
        key = key or query
        value = value or key
        for name, t in (("query", query), ("key", key), ("value", value)):
            expect_last(t, p.d_model, "d_model", port=name)
        if not (dims_equal(key.shape[0], query.shape[0]) and dims_equal(key.shape[1], value.shape[1])):
            raise ShapeError(f"key {key.described()} and value {value.described()} disagree on batch or length")
        if key_padding_mask is not None and not (
            dims_equal(key_padding_mask.shape[0], key.shape[0]) and dims_equal(key_padding_mask.shape[1], key.shape[1])
        ):
            raise ShapeError(
                f"key_padding_mask {key_padding_mask.described()} must be [batch, key_len] = "
                f"[{format_dim(key.shape[0])}, {format_dim(key.shape[1])}]"
            )
        return query

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        key = query if key is None else key
        value = key if value is None else value
        b, t_q, d = query.shape
        q = self.w_q(query).view(b, t_q, self.heads, self.d_k).transpose(1, 2)
        k = self.w_k(key).view(b, -1, self.heads, self.d_k).transpose(1, 2)
        v = self.w_v(value).view(b, -1, self.heads, self.d_k).transpose(1, 2)
        only_causal = self.causal and key_padding_mask is None and attn_mask is None
        mask = (
            None if only_causal else combine_masks(t_q, k.size(2), key_padding_mask, attn_mask, self.causal, q.device)
        )
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=only_causal
        )
        return self.w_o(y.transpose(1, 2).reshape(b, t_q, d))
