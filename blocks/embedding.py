"""Token embeddings: integer ids to dense vectors."""

from __future__ import annotations

import math

import torch
from pydantic import Field, model_validator
from torch import nn

from blocks.registry import Block, BlockParams, Port, register
from blocks.types import TensorType


@register("token_embedding", family="embedding")
class TokenEmbedding(Block):
    """Look up a learned vector per token id, optionally scaled by √dim as in the Transformer paper."""

    class Params(BlockParams):
        vocab: int = Field(gt=0, description="number of token ids (ids run from 0 to vocab-1)")
        dim: int = Field(gt=0, description="embedding width (d_model)")
        padding_idx: int | None = Field(None, ge=0, description="id whose vector stays zero and gets no gradient")
        scale: bool = Field(False, description="multiply by √dim (Vaswani et al., section 3.4)")

        @model_validator(mode="after")
        def _padding_in_vocab(self) -> TokenEmbedding.Params:
            if self.padding_idx is not None and self.padding_idx >= self.vocab:
                raise ValueError(f"padding_idx ({self.padding_idx}) must be below vocab ({self.vocab})")
            return self

    in_ports = (Port("tokens", dtype="int"),)
    example = {"vocab": 32000, "dim": 512, "scale": True}

    def __init__(self, p: Params):
        super().__init__()
        self.lut = nn.Embedding(p.vocab, p.dim, padding_idx=p.padding_idx)
        self.scale = math.sqrt(p.dim) if p.scale else 1.0

    @classmethod
    def infer(cls, p: Params, tokens: TensorType) -> TensorType:
        """integer ids [...] → float32 [..., dim]."""
        return TensorType((*tokens.shape, p.dim), torch.float32)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.lut(tokens)
        return x * self.scale if self.scale != 1.0 else x
