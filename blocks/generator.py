"""Output heads that turn model states into vocabulary distributions."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from blockgraph.blocks.flops import linear, tokens
from blockgraph.blocks.registry import Block, BlockParams, register
from blockgraph.blocks.stepping import by_position
from blockgraph.blocks.types import TensorType, expect_last


@register("generator", family="head")
class Generator(Block):
    """Final Linear to vocabulary logits followed by log-softmax (or softmax, or nothing).

    `softcap` bounds the logits to (−cap, cap) by cap·tanh(logits / cap) before anything else (Gemma 2's final
    logit softcapping), so the log-softmax sees the capped logits.
    """

    class Params(BlockParams):
        d_model: int = Field(gt=0, description="input width")
        vocab: int = Field(gt=0, description="output vocabulary size")
        bias: bool = Field(True, description="a bias per vocabulary entry (GPT-2's tied head has none)")
        fixed_bias: bool = Field(
            False, description="the bias is a saved constant, not trained (Marian's and BART's final_logits_bias)"
        )
        output: Literal["log_softmax", "softmax", "logits"] = Field(
            "log_softmax", description="log_softmax (for NLL loss), softmax (probabilities) or raw logits"
        )
        softcap: float | None = Field(
            None, gt=0, description="cap the logits at ±softcap by softcap·tanh(logits / softcap) (Gemma 2: 30)"
        )

    example = {"d_model": 512, "vocab": 32000}

    def __init__(self, p: Params):
        super().__init__()
        self.proj = nn.Linear(p.d_model, p.vocab, bias=p.bias and not p.fixed_bias)
        self.fixed_bias = p.bias and p.fixed_bias
        if self.fixed_bias:
            self.register_buffer("bias", torch.zeros(p.vocab))
        self.output, self.softcap = p.output, p.softcap

    @classmethod
    def infer(cls, p: Params, x: TensorType) -> TensorType:
        """[..., d_model] → [..., vocab]."""
        expect_last(x, p.d_model, "d_model")
        return x.with_last(p.vocab)

    @classmethod
    def flops(cls, p: Params, inputs: dict, outputs: tuple) -> Any:
        """The projection: 2·tokens·d_model·vocab (softmax is not counted)."""
        return linear(tokens(inputs["x"].shape), p.d_model, p.vocab)

    stepping = by_position

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.proj(x) + self.bias if self.fixed_bias else self.proj(x)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        if self.output == "log_softmax":
            return F.log_softmax(logits, dim=-1)
        if self.output == "softmax":
            return F.softmax(logits, dim=-1)
        return logits
