"""The hand-written PyTorch that built models are measured against, and weight copies into it.

Every reference computes the same function as its blockgraph counterpart: `run.py` copies the built model's
weights in and checks the outputs agree before timing anything.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from blockgraph.blocks.positional import sinusoid_table

# --- an Annotated-Transformer-style encoder, hand-tuned: SDPA, the mask built once per call ----------------------


def clones(module: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList(copy.deepcopy(module) for _ in range(n))


class MultiHeadedAttention(nn.Module):
    """Four d_model × d_model projections (W_Q, W_K, W_V, W_O) around `F.scaled_dot_product_attention`."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.h, self.d_k = heads, d_model // heads
        self.linears = clones(nn.Linear(d_model, d_model), 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, d = x.shape
        w_q, w_k, w_v, w_o = self.linears
        q = w_q(x).view(b, t, self.h, self.d_k).transpose(1, 2)
        k = w_k(x).view(b, t, self.h, self.d_k).transpose(1, 2)
        v = w_v(x).view(b, t, self.h, self.d_k).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return w_o(y.transpose(1, 2).reshape(b, t, d))


class PositionwiseFeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w_1 = nn.Linear(d_model, d_ff)
        self.w_2 = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.relu(self.w_1(x)))


class AnnotatedEncoderLayer(nn.Module):
    """Post-norm, as the paper and `nn.TransformerEncoderLayer`: x = LN(x + attn(x)); y = LN(x + ffn(x))."""

    def __init__(self, d_model: int, heads: int, d_ff: int):
        super().__init__()
        self.self_attn = MultiHeadedAttention(d_model, heads)
        self.feed_forward = PositionwiseFeedForward(d_model, d_ff)
        self.norms = clones(nn.LayerNorm(d_model), 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.norms[0](x + self.self_attn(x, mask))
        return self.norms[1](x + self.feed_forward(x))


class AnnotatedEncoder(nn.Module):
    def __init__(self, d_model: int, heads: int, d_ff: int, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(AnnotatedEncoderLayer(d_model, heads, d_ff) for _ in range(layers))

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        mask = None if pad is None else ~pad[:, None, None, :]  # True = may attend, once for all layers
        for layer in self.layers:
            x = layer(x, mask)
        return x


# --- torch.nn's own Transformer, with embeddings, positions and a generator around it -------------------------------


class TorchSeq2Seq(nn.Module):
    """`nn.Transformer` (batch-first, post-norm, final norms) between scaled embeddings + sinusoids and a generator."""

    def __init__(self, vocab: int, d_model: int, heads: int, d_ff: int, layers: int, max_len: int = 512):
        super().__init__()
        self.scale = math.sqrt(d_model)
        self.src_embed = nn.Embedding(vocab, d_model)
        self.tgt_embed = nn.Embedding(vocab, d_model)
        self.register_buffer("pe", sinusoid_table(max_len, d_model), persistent=False)
        self.transformer = nn.Transformer(d_model, heads, layers, layers, d_ff, dropout=0.0, batch_first=True)
        self.generator = nn.Linear(d_model, vocab)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(max_len), persistent=False)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        s = self.src_embed(src) * self.scale + self.pe[: src.size(1)]
        t = self.tgt_embed(tgt) * self.scale + self.pe[: tgt.size(1)]
        n = tgt.size(1)
        y = self.transformer(s, t, tgt_mask=self.causal[:n, :n], tgt_is_causal=True)
        return F.log_softmax(self.generator(y), dim=-1)


# --- weights: blockgraph state_dict → the references ----------------------------------------------------------------


def mha_state(ours: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Our separate W_Q, W_K, W_V, W_O as nn.MultiheadAttention's packed in_proj and out_proj."""
    return {
        "in_proj_weight": torch.cat([ours[f"{prefix}.w_{n}.weight"] for n in "qkv"]),
        "in_proj_bias": torch.cat([ours[f"{prefix}.w_{n}.bias"] for n in "qkv"]),
        "out_proj.weight": ours[f"{prefix}.w_o.weight"],
        "out_proj.bias": ours[f"{prefix}.w_o.bias"],
    }


def torch_layer_state(ours: dict[str, torch.Tensor], prefix: str, names: dict[str, str]) -> dict[str, torch.Tensor]:
    """One encoder/decoder layer of ours (sublayer names given by `names`) as nn.Transformer*Layer keys."""
    state: dict[str, torch.Tensor] = {}
    for theirs, mine in (("self_attn", names["self_attn"]), ("multihead_attn", names.get("cross_attn"))):
        if mine is not None:
            state |= {f"{theirs}.{k}": v for k, v in mha_state(ours, f"{prefix}.{mine}").items()}
    for n in "12":
        state[f"linear{n}.weight"] = ours[f"{prefix}.{names['ffn']}.w_{n}.weight"]
        state[f"linear{n}.bias"] = ours[f"{prefix}.{names['ffn']}.w_{n}.bias"]
    for i, norm in enumerate(names["norms"], 1):
        state[f"norm{i}.weight"] = ours[f"{prefix}.{norm}.weight"]
        state[f"norm{i}.bias"] = ours[f"{prefix}.{norm}.bias"]
    return state


def annotated_layer_state(ours: dict[str, torch.Tensor], prefix: str, names: dict[str, str]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for i, w in enumerate("qkvo"):
        for kind in ("weight", "bias"):
            state[f"self_attn.linears.{i}.{kind}"] = ours[f"{prefix}.{names['self_attn']}.w_{w}.{kind}"]
    for n in "12":
        for kind in ("weight", "bias"):
            state[f"feed_forward.w_{n}.{kind}"] = ours[f"{prefix}.{names['ffn']}.w_{n}.{kind}"]
    for i, norm in enumerate(names["norms"]):
        for kind in ("weight", "bias"):
            state[f"norms.{i}.{kind}"] = ours[f"{prefix}.{norm}.{kind}"]
    return state


# --- a mixture of experts computed densely: every expert on every token ---------------------------------------


class DenseExperts(nn.Module):
    """A `mixture_of_experts` block's routing, then each expert on every token, weighted by its routing weight
    (zero for the experts a token is not routed to): the same function, E / top_k times the expert work."""

    def __init__(self, moe: nn.Module):
        super().__init__()
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.size(-1))
        weights, chosen = self.moe.route(self.moe.scores(flat))
        gates = torch.zeros(flat.size(0), self.moe.p.experts, dtype=weights.dtype).scatter_(1, chosen, weights)
        y = torch.zeros_like(flat)
        for j, expert in enumerate(self.moe.experts.children()):
            y = y + (gates[:, j : j + 1] * expert(flat)).to(flat.dtype)
        return y.reshape(x.shape)
