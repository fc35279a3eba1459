"""Attention blocks: scaled dot-product and multi-head attention (Transformer), and the global (Luong /
Bahdanau), hard and local attentions of RNN encoder–decoders.

Mask conventions, everywhere in this module: a **boolean** mask is True where a position may NOT be attended
(as in `nn.MultiheadAttention`); a **float** mask is added to the scores (0 keeps, -inf removes). A query row
whose every key is masked gets all-zero weights and a zero context, as `F.scaled_dot_product_attention` does
(`nn.MultiheadAttention` gives NaN there).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from blockgraph.blocks.flops import linear, multi_head, tokens
from blockgraph.blocks.norm import RMSNorm
from blockgraph.blocks.positional import apply_rotary, rotary_angles
from blockgraph.blocks.registry import Block, BlockParams, Port, register
from blockgraph.blocks.stepping import StepCache, Stepping
from blockgraph.blocks.types import Dim, ShapeError, TensorType, dims_equal, expect_last, format_dim, format_shape


def masked_softmax(scores: torch.Tensor) -> torch.Tensor:
    """softmax over the last dimension; a row that is -inf everywhere gets zeros instead of NaN (and no NaN grad)."""
    empty = scores.isneginf().all(-1, keepdim=True)
    return scores.masked_fill(empty, 0.0).softmax(-1).masked_fill(empty, 0.0)


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None = None,
    dropout: float = 0.0,
    scale: float | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(s·QKᵀ + M)·V computed explicitly, s = 1/√d_k unless given; returns (output, weights after dropout).

    `mask` follows `F.scaled_dot_product_attention`: bool True = MAY attend, or an additive float. A `softcap`
    bounds the scores by cap·tanh(scores / cap) before the mask (Gemma 2's attention logit softcapping).
    """
    scale = 1 / math.sqrt(query.size(-1)) if scale is None else scale
    scores = query @ key.transpose(-2, -1) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    weights = F.dropout(masked_softmax(scores), dropout) if dropout else masked_softmax(scores)
    return weights @ value, weights


def combine_masks(
    query_len: int,
    key_len: int,
    key_padding_mask: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    causal: bool,
    device: torch.device,
    window: int | None = None,
    bias: torch.Tensor | None = None,
    offset: int = 0,
    key_positions: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """One mask for `scaled_dot_product_attention`: bool (True = may attend) or additive float.

    Inputs follow `nn.MultiheadAttention`: in boolean masks True means *masked out*. `key_padding_mask` is
    [batch, key_len]; `attn_mask` broadcasts against [batch, heads, query_len, key_len]. Causal is top-left
    aligned (query i sees keys 0..i), as `is_causal` in `F.scaled_dot_product_attention`; a `window` keeps
    keys i-window < j only (Mistral's sliding window). `bias` (a float broadcasting to the scores, such as
    T5's relative position bias) is added where attending is allowed. With `offset`, query i is position
    offset + i (the new positions of a decoding step, after `offset` cached keys); `key_positions` are the keys'
    positions when they are not 0, 1, … (a sliding window's ring of slots, `StepCache.ring`).
    """
    allowed: torch.Tensor | None = None
    if key_padding_mask is not None:
        allowed = ~key_padding_mask[:, None, None, :]
    if causal or window is not None:
        i = torch.arange(offset, offset + query_len, device=device)[:, None]
        j = (torch.arange(key_len, device=device) if key_positions is None else key_positions)[None, :]
        near = j <= i if causal else torch.ones(query_len, key_len, dtype=torch.bool, device=device)
        if window is not None:
            near = near & (j > i - window)
        allowed = near if allowed is None else allowed & near
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        allowed = ~attn_mask if allowed is None else allowed & ~attn_mask
        attn_mask = None
    additive = attn_mask if bias is None else (bias if attn_mask is None else attn_mask + bias)
    if additive is None:
        return allowed
    if allowed is None:
        return additive
    return torch.where(allowed, additive, float("-inf"))


def _same_dims(a: tuple[Dim, ...], b: tuple[Dim, ...]) -> bool:
    return len(a) == len(b) and all(dims_equal(x, y) for x, y in zip(a, b, strict=True))


def _check_mask(mask: TensorType, target: tuple[Dim, ...], name: str, wanted: str) -> None:
    """A mask must be bool or float and broadcast against `target` (each trailing dim equal or 1)."""
    if not (mask.dtype == torch.bool or mask.dtype.is_floating_point):
        raise ShapeError(f"{name} {mask.described()} must be bool (True = masked out) or an additive float")
    trailing = target[len(target) - mask.rank :] if mask.rank <= len(target) else None
    if trailing is None or not all(
        dims_equal(m, 1) or dims_equal(m, t) for m, t in zip(mask.shape, trailing, strict=True)
    ):
        raise ShapeError(
            f"{name} {mask.described()} does not broadcast to the scores {format_shape(target)}",
            hint=f"give {name} as {wanted}",
        )


@register("scaled_dot_product_attention", family="attention")
class ScaledDotProductAttention(Block):
    """Scaled dot-product attention softmax(QKᵀ/√d_k)·V, returning the output and the attention weights.

    query [batch, (heads,) q_len, d_k], key [..., k_len, d_k], value [..., k_len, d_v]. `mask` is bool
    (True = masked out, like `nn.MultiheadAttention`) or additive float, broadcast against the scores
    [batch, (heads,) q_len, k_len]. `causal` lets query i see keys 0..i (top-left aligned). `weights` are
    the ones multiplied with V, i.e. after dropout.
    """

    class Params(BlockParams):
        dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the attention weights (training only)")
        causal: bool = Field(False, description="query i may only attend to keys 0..i")

    in_ports = (
        Port("query", rank=(3, 4), doc="[batch, (heads,) q_len, d_k]"),
        Port("key", rank=(3, 4), doc="[batch, (heads,) k_len, d_k]"),
        Port("value", rank=(3, 4), doc="[batch, (heads,) k_len, d_v]"),
        Port("mask", rank=(2, 3, 4), dtype="any", optional=True, doc="broadcasts to the scores; bool True = masked"),
    )
    out_ports = (
        Port("y", doc="[batch, (heads,) q_len, d_v]"),
        Port("weights", doc="[batch, (heads,) q_len, k_len], rows sum to 1 (before dropout)"),
    )
    example = {"dropout": 0.0, "causal": True}

    def __init__(self, p: Params):
        super().__init__()
        self.dropout, self.causal = p.dropout, p.causal

    @classmethod
    def infer(
        cls, p: Params, query: TensorType, key: TensorType, value: TensorType, mask: TensorType | None = None
    ) -> tuple[TensorType, TensorType]:
        """q [..., q, d_k], k [..., k, d_k], v [..., k, d_v] → y [..., q, d_v] and weights [..., q, k]."""
        if not (query.rank == key.rank == value.rank):
            raise ShapeError(
                f"query {query.described()}, key {key.described()} and value {value.described()} "
                "must have the same rank"
            )
        if not _same_dims(query.shape[:-2], key.shape[:-2]) or not dims_equal(query.shape[-1], key.shape[-1]):
            raise ShapeError(
                f"query {query.described()} and key {key.described()} must agree on batch (heads) and d_k",
                hint="query is [batch, (heads,) q_len, d_k], key [batch, (heads,) k_len, d_k]",
            )
        if not _same_dims(key.shape[:-1], value.shape[:-1]):
            raise ShapeError(f"key {key.described()} and value {value.described()} must agree on all but the last dim")
        scores = (*query.shape[:-1], key.shape[-2])
        if mask is not None:
            _check_mask(mask, scores, "mask", f"[q_len, k_len] = [{format_dim(scores[-2])}, {format_dim(scores[-1])}]")
        return query.with_shape(*query.shape[:-1], value.shape[-1]), query.with_shape(*scores)

    @classmethod
    def flops(cls, p: Params, inputs: dict, outputs: tuple) -> Any:
        """QKᵀ and AV: 2·pairs·d_k + 2·pairs·d_v, pairs = batch (· heads) · q_len · k_len."""
        query, key, value = inputs["query"].shape, inputs["key"].shape, inputs["value"].shape
        pairs = math.prod(query[:-1]) * key[-2]
        return 2 * pairs * query[-1] + 2 * pairs * value[-1]

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.attend(0, query, key, value, mask)

    @classmethod
    def stepping(cls, p: Params, ports: Mapping[str, bool]) -> Stepping | None:
        """Causal attention over growing keys keeps them; fixed keys are attended by each new query alone."""
        if not ports.get("query") or "mask" in ports or ports.get("key") != ports.get("value"):
            return None
        if ports.get("key"):
            return "state" if p.causal else None
        return None if p.causal else "positions"

    def step(
        self,
        cache: StepCache,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The new queries against every key and value so far (appended to the cache)."""
        start = cache.advance(query.size(-2))
        return self.attend(start, query, cache.extend("k", key, dim=-2), cache.extend("v", value, dim=-2), mask)

    def attend(
        self, start: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries at positions start, start + 1, … against `key` and `value` (forward's and step's alike)."""
        mask = combine_masks(query.size(-2), key.size(-2), None, mask, self.causal, query.device, offset=start)
        return attention(query, key, value, mask, self.dropout if self.training else 0.0)


@register("multi_head_attention", family="attention")
class MultiHeadAttention(Block):
    """Multi-head attention: h heads of softmax(s·QKᵀ + B)V over W_Q, W_K, W_V projections, concatenated, then W_O.

    Self-attention when only `query` is given; cross-attention when `key`/`value` come from another tensor (the
    encoder output). s = 1/√head_dim unless `scale` says otherwise (T5: 1). Boolean masks use True for positions
    that may NOT be attended; `attn_mask` is [q_len, k_len] or [batch·heads, q_len, k_len] (as in
    `nn.MultiheadAttention`), bool or additive float; `position_bias` [heads or batch·…, q_len, k_len] is added
    to the scores (T5's relative position bias). `causal` is top-left aligned; `window` keeps a query's last
    `window` keys only (Mistral's sliding window). `softcap` bounds the scaled scores by cap·tanh(scores / cap)
    before any mask or bias (Gemma 2); the fused kernel cannot, so such an attention runs the explicit path.

    Grouped-query attention: `kv_heads` < heads key/value heads, each shared by heads/kv_heads query heads (1:
    multi-query). Rotary position embedding (Su et al., 2021): with `rotary_dim` > 0 the first rotary_dim features
    of every query and key head are rotated by p·θ^(−2i/rotary_dim) at position p (from `positions`, or 0..len-1),
    in halves (LLaMA, GPT-NeoX; a rotary_dim below head_dim is GPT-NeoX's partial rotary) or interleaved pairs
    (GPT-J). `qk_norm` RMS-normalises the projected queries and keys before rotary, per head with one gain of
    head_dim shared by the heads (`head`: Qwen3, Gemma 3) or over all heads' features at once (`full`: OLMo 2);
    its submodules `q_norm`, `k_norm` are `rms_norm` blocks. With `need_weights: true` a second output `weights`
    gives the per-head weights [batch, heads, q_len, k_len] (not averaged, after dropout), computed explicitly;
    otherwise `F.scaled_dot_product_attention` runs.
    """

    class Params(BlockParams):
        d_model: int = Field(gt=0, description="model width (of the input and the output)")
        heads: int = Field(gt=0, description="number of query heads h")
        kv_heads: int | None = Field(
            None, gt=0, description="key/value heads (grouped-query attention; 1: multi-query); default heads"
        )
        head_dim: int | None = Field(None, gt=0, description="width of each head (default d_model / heads)")
        dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the attention weights")
        bias: bool = Field(True, description="bias in the W_Q, W_K, W_V, W_O projections")
        q_bias: bool | None = Field(None, description="bias in W_Q only (default: bias)")
        k_bias: bool | None = Field(None, description="bias in W_K only (default: bias)")
        v_bias: bool | None = Field(None, description="bias in W_V only (default: bias)")
        o_bias: bool | None = Field(None, description="bias in W_O only (default: bias)")
        scale: float | None = Field(None, gt=0, description="score scale s (default 1/√head_dim; T5 uses 1)")
        softcap: float | None = Field(
            None, gt=0, description="cap the scores at ±softcap by softcap·tanh(s·QKᵀ / softcap) (Gemma 2: 50)"
        )
        causal: bool = Field(False, description="forbid attending to later positions (decoder self-attention)")
        window: int | None = Field(
            None, gt=0, description="sliding window: query i sees keys i-window < j ≤ i only (needs causal)"
        )
        rotary_dim: int = Field(
            0, ge=0, description="rotate the first rotary_dim features of each q/k head (0: no rotary embedding)"
        )
        rotary_base: float = Field(10000.0, gt=0, description="θ, the base of the rotary frequencies")
        rotary_scaling: float = Field(
            1.0, gt=0, description="linear position interpolation: positions divided by it (Gemma 3's global layers: 8)"
        )
        rotary_interleaved: bool = Field(
            False, description="rotate pairs (2i, 2i+1) as GPT-J, instead of halves (i, i + rotary_dim/2)"
        )
        qk_norm: Literal["head", "full", None] = Field(
            None,
            description="RMSNorm of the projected queries and keys, before rotary: head (over each head's "
            "head_dim, one gain shared by the heads: Qwen3, Gemma 3) or full (over all heads at once: OLMo 2)",
        )
        qk_norm_eps: float = Field(1e-6, gt=0, description="the q/k norms' epsilon")
        qk_norm_offset: float = Field(
            0.0, description="the q/k norms' gain is offset + weight (Gemma 3: 1), as rms_norm's offset"
        )
        need_weights: bool = Field(
            False,
            description="add an output port `weights`: per-head weights batch × heads × q_len × k_len (slower path)",
        )

        @model_validator(mode="after")
        def _shapes(self) -> MultiHeadAttention.Params:
            if self.head_dim is None and self.d_model % self.heads:
                raise ValueError(f"d_model ({self.d_model}) must be divisible by heads ({self.heads}), or set head_dim")
            if self.kv_heads is not None and self.heads % self.kv_heads:
                raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
            width = self.head_dim or self.d_model // self.heads
            if self.rotary_dim % 2 or self.rotary_dim > width:
                raise ValueError(f"rotary_dim ({self.rotary_dim}) must be even and at most head_dim ({width})")
            if self.window is not None and not self.causal:
                raise ValueError("window is a sliding window over earlier positions: set causal: true")
            if self.rotary_scaling != 1.0 and not self.rotary_dim:
                raise ValueError("rotary_scaling scales rotary positions: set rotary_dim too, or remove it")
            fields = type(self).model_fields
            unused = sorted(f for f in ("qk_norm_eps", "qk_norm_offset") if getattr(self, f) != fields[f].default)
            if self.qk_norm is None and unused:
                raise ValueError(f"{' and '.join(unused)} set the q/k norms: set qk_norm (head or full), or remove it")
            return self

    in_ports = (
        Port("query", rank=3, doc="[batch, query_len, d_model]"),
        Port("key", rank=3, optional=True, doc="[batch, key_len, d_model]; defaults to query"),
        Port("value", rank=3, optional=True, doc="[batch, key_len, d_model]; defaults to key"),
        Port("key_padding_mask", rank=2, dtype="bool", optional=True, doc="[batch, key_len], True = padding"),
        Port(
            "attn_mask",
            rank=(2, 3),
            dtype="any",
            optional=True,
            doc="[query_len, key_len] or [batch·heads, query_len, key_len]; bool True = masked, or additive",
        ),
        Port("positions", rank=(1, 2), dtype="int", optional=True, doc="rotary positions [query_len] or [batch, …]"),
        Port("position_bias", rank=(3, 4), optional=True, doc="added to the scores: [(batch,) heads, q_len, k_len]"),
    )
    out_ports = (
        Port("y", doc="[batch, query_len, d_model]"),
        Port("weights", doc="only with need_weights: [batch, heads, query_len, key_len], per head"),
    )
    example = {"d_model": 512, "heads": 8, "dropout": 0.1}

    @classmethod
    def outputs_for(cls, params: Params) -> tuple[Port, ...]:
        """`y`, plus `weights` when need_weights is true."""
        return cls.out_ports if params.need_weights else cls.out_ports[:1]

    def __init__(self, p: Params):
        super().__init__()
        self.heads, self.kv_heads = p.heads, p.kv_heads or p.heads
        self.d_k = p.head_dim or p.d_model // p.heads
        self.causal, self.window, self.dropout, self.scale = p.causal, p.window, p.dropout, p.scale
        self.need_weights, self.softcap = p.need_weights, p.softcap
        self.rotary_dim, self.rotary_base, self.rotary_interleaved = p.rotary_dim, p.rotary_base, p.rotary_interleaved
        self.rotary_scaling = p.rotary_scaling

        def bias(which: bool | None) -> bool:
            return p.bias if which is None else which

        width, kv_width = self.heads * self.d_k, self.kv_heads * self.d_k
        self.w_q = nn.Linear(p.d_model, width, bias=bias(p.q_bias))
        self.w_k = nn.Linear(p.d_model, kv_width, bias=bias(p.k_bias))
        self.w_v = nn.Linear(p.d_model, kv_width, bias=bias(p.v_bias))
        self.w_o = nn.Linear(width, p.d_model, bias=bias(p.o_bias))
        self.qk_norm = p.qk_norm  # the q/k norms are rms_norm blocks: RMSNorm is computed in one place
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if p.qk_norm is not None:
            per_head = p.qk_norm == "head"

            def rms(dim: int) -> RMSNorm:
                return RMSNorm(RMSNorm.Params(dim=dim, eps=p.qk_norm_eps, offset=p.qk_norm_offset))

            self.q_norm, self.k_norm = rms(self.d_k if per_head else width), rms(self.d_k if per_head else kv_width)

    @classmethod
    def infer(
        cls,
        p: Params,
        query: TensorType,
        key: TensorType | None = None,
        value: TensorType | None = None,
        key_padding_mask: TensorType | None = None,
        attn_mask: TensorType | None = None,
        positions: TensorType | None = None,
        position_bias: TensorType | None = None,
    ) -> TensorType | tuple[TensorType, TensorType]:
        """query [b, q, d_model], key/value [b, k, d_model] → y like query (+ weights [b, heads, q, k])."""
        key = key or query
        value = value or key
        for name, t in (("query", query), ("key", key), ("value", value)):
            expect_last(t, p.d_model, "d_model", port=name)
        if not (dims_equal(key.shape[0], query.shape[0]) and _same_dims(key.shape[:2], value.shape[:2])):
            raise ShapeError(
                f"query {query.described()}, key {key.described()} and value {value.described()} disagree on "
                "batch, or key and value on length"
            )
        batch, q_len, k_len = query.shape[0], query.shape[1], key.shape[1]
        if key_padding_mask is not None and not _same_dims(key_padding_mask.shape, (batch, k_len)):
            raise ShapeError(
                f"key_padding_mask {key_padding_mask.described()} must be [batch, key_len] = "
                f"[{format_dim(batch)}, {format_dim(k_len)}] (key {key.described()})"
            )
        if attn_mask is not None:
            want = (q_len, k_len) if attn_mask.rank == 2 else (batch * p.heads, q_len, k_len)
            if not _same_dims(attn_mask.shape, want) or not (
                attn_mask.dtype == torch.bool or attn_mask.dtype.is_floating_point
            ):
                raise ShapeError(
                    f"attn_mask {attn_mask.described()} must be bool or float {format_shape(want)} "
                    f"for query {query.described()} and key {key.described()}",
                    hint="attn_mask is [q_len, k_len] or [batch·heads, q_len, k_len]",
                )
        if positions is not None:
            if not p.rotary_dim:
                raise ShapeError("positions are given, but there is no rotary embedding", at=("params", "rotary_dim"))
            if not dims_equal(positions.shape[-1], q_len) or not dims_equal(q_len, k_len):
                raise ShapeError(
                    f"positions {positions.described()} must be [query_len] or [batch, query_len] of a "
                    f"self-attention (query {query.described()}, key {key.described()})"
                )
        if position_bias is not None:
            _check_mask(position_bias, (batch, p.heads, q_len, k_len), "position_bias", "[(batch,) heads, q, k]")
        if p.need_weights:
            return query, query.with_shape(batch, p.heads, q_len, k_len)
        return query

    @classmethod
    def flops(cls, p: Params, inputs: dict, outputs: tuple) -> Any:
        """Four projections and QKᵀ, AV: see blocks.flops.multi_head."""
        shape = {port: t.shape for port, t in inputs.items() if t is not None}
        d_k = p.head_dim or p.d_model // p.heads
        return multi_head(
            p.d_model,
            shape["query"],
            shape.get("key"),
            heads_width=p.heads * d_k,
            kv_width=(p.kv_heads or p.heads) * d_k,
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        position_bias: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        q, k, v = self.projected(0, query, key, value, positions)
        return self.merge(*self.attend(q, k, v, key_padding_mask, attn_mask, position_bias))

    def weights(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        position_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The per-head weights [batch, heads, q_len, k_len] that `forward` gives these inputs, with or without
        need_weights: to look at a trained model's attention (trainer.generation) without changing its outputs."""
        q, k, v = self.projected(0, query, key, value, positions)
        weights = self.attend(q, k, v, key_padding_mask, attn_mask, position_bias, keep=True)[1]
        assert weights is not None
        return weights

    @classmethod
    def stepping(cls, p: Params, ports: Mapping[str, bool]) -> Stepping | None:
        """Causal self-attention keeps its keys and values; attention to a fixed memory projects it once."""
        itself = ports.get("key", True)  # no key, or a growing one: self-attention
        if not ports.get("query") or "attn_mask" in ports:
            return None
        if itself:  # every other connected port must grow with the queries and keys
            fixed = any(
                ports.get(port) is False for port in ("value", "key_padding_mask", "positions", "position_bias")
            )
            return "state" if p.causal and not fixed else None
        grows = any(ports.get(port) for port in ("value", "key_padding_mask"))  # they go with the fixed keys
        bias = ports.get("position_bias", True)  # a bias has a row per query: it must grow with them
        return None if grows or not bias or p.rotary_dim or p.causal or "positions" in ports else "state"

    def step(
        self,
        cache: StepCache,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        position_bias: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """New queries against every key so far: a self-attention appends the new keys and values to its cache
        (allocated once for all steps, kv_heads wide); a cross-attention projects the memory at the first step."""
        start = cache.advance(query.size(1))
        if key is None or cache.grows("key"):
            q, k, v = self.projected(start, query, key, value, positions)
            # the last `window` positions only; a position bias has a column per key so far and the weights one
            # per position, so not with them
            ring = position_bias is None and not self.need_weights
            held = None  # the keys' positions, when a ring holds them out of order
            if self.window is not None and self.window < cache.capacity and ring:
                (k, held), (v, _) = (cache.ring(n, t, 2, self.window, start) for n, t in (("k", k), ("v", v)))
                if key_padding_mask is not None:
                    key_padding_mask = cache.ring("pad", key_padding_mask, 1, self.window, start)[0]
            else:
                k, v = cache.extend("k", k, dim=2), cache.extend("v", v, dim=2)
                if key_padding_mask is not None:
                    key_padding_mask = cache.extend("pad", key_padding_mask, dim=1)
            return self.merge(*self.attend(q, k, v, key_padding_mask, attn_mask, position_bias, start, held))
        else:  # the memory's keys and values, one row per source, are attended by all its hypotheses at once
            memory, values = key, key if value is None else value
            q = self.heads_of(self.w_q, cache.grouped(query), self.heads, self.q_norm)
            k = cache.once("k", lambda: self.heads_of(self.w_k, memory, self.kv_heads, self.k_norm))
            v = cache.once("v", lambda: self.heads_of(self.w_v, values, self.kv_heads))
            y, weights = self.attend(q, k, v, key_padding_mask, attn_mask, position_bias)
            if weights is not None:  # [sources, heads, width × len, keys] → [rows, heads, len, keys]
                weights = cache.ungrouped(weights.transpose(1, 2)).transpose(1, 2)
            return self.merge(cache.ungrouped(y.transpose(1, 2)).transpose(1, 2), weights)

    @classmethod
    def shares_fixed(cls, p: Params, ports: Mapping[str, bool]) -> bool:
        """A cross-attention's queries are grouped by source; a position bias has a row per query, so not with one."""
        return "position_bias" not in ports

    def heads_of(self, projection: nn.Linear, x: torch.Tensor, heads: int, norm: RMSNorm | None = None) -> torch.Tensor:
        """[batch, len, d_model] → projected, [batch, heads, len, head_dim]; a q/k `norm` normalises each head's
        features (qk_norm: head) or all heads' at once (full)."""
        b, t, _ = x.shape
        y = projection(x)
        if norm is not None and self.qk_norm == "full":
            y = norm(y)
        y = y.view(b, t, heads, -1)
        if norm is not None and self.qk_norm == "head":
            y = norm(y)
        return y.transpose(1, 2)

    def projected(
        self,
        start: int,
        query: torch.Tensor,
        key: torch.Tensor | None,
        value: torch.Tensor | None,
        positions: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q, K and V in heads (keys default to the queries, values to the keys), Q and K normalised (qk_norm)
        and then rotated at `positions` (by default the queries' own: start, start + 1, …)."""
        key = query if key is None else key
        value = key if value is None else value
        q = self.heads_of(self.w_q, query, self.heads, self.q_norm)
        k = self.heads_of(self.w_k, key, self.kv_heads, self.k_norm)
        v = self.heads_of(self.w_v, value, self.kv_heads)
        if self.rotary_dim:
            if positions is None:
                positions = torch.arange(start, start + query.size(1), device=query.device)
            q, k = self.rotate(q, positions), self.rotate(k, positions)
        return q, k, v

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = rotary_angles(positions, self.rotary_dim, self.rotary_base, self.rotary_scaling)
        return apply_rotary(x, cos, sin, self.rotary_interleaved)

    def merge(self, y: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Heads [batch, heads, len, head_dim] concatenated, then W_O (and the weights, when asked for)."""
        b, _, t, _ = y.shape
        y = self.w_o(y.transpose(1, 2).reshape(b, t, self.heads * self.d_k))
        return (y, weights) if self.need_weights else y  # type: ignore[return-value]

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        attn_mask: torch.Tensor | None,
        position_bias: torch.Tensor | None,
        offset: int = 0,
        key_positions: torch.Tensor | None = None,
        keep: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Heads [batch, heads, len, head_dim] in, heads out: SDPA's fused kernel, or explicit with weights or a
        softcap.

        `offset`: the queries are positions offset, offset + 1, … (a decoding step after `offset` cached keys);
        `key_positions`: the keys' positions, when not 0, 1, … (a sliding window's ring); `keep`: return the
        weights even without need_weights.
        """
        dropout = self.dropout if self.training else 0.0
        grouped = self.kv_heads != self.heads
        b, _, t_q, _ = q.shape
        causal = self.causal and not (offset and t_q == 1)  # the newest position alone sees every key so far
        unmasked = key_padding_mask is None and attn_mask is None and position_bias is None and self.window is None
        explicit = self.need_weights or keep or self.softcap is not None
        if unmasked and not explicit and not (causal and offset):  # SDPA's own causal flag is top-left
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, is_causal=causal, scale=self.scale, enable_gqa=grouped
            )
            return y, None
        if attn_mask is not None and attn_mask.dim() == 3:  # [batch·heads, q, k] → [batch, heads, q, k]
            attn_mask = attn_mask.view(b, self.heads, t_q, -1)
        mask = combine_masks(
            t_q,
            k.size(2),
            key_padding_mask,
            attn_mask,
            causal,
            q.device,
            self.window,
            position_bias,
            offset,
            key_positions,
        )
        if explicit:
            if grouped:
                k, v = (t.repeat_interleave(self.heads // self.kv_heads, dim=1) for t in (k, v))
            y, weights = attention(q, k, v, mask, dropout, self.scale, self.softcap)
            return y, weights if self.need_weights or keep else None
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, scale=self.scale, enable_gqa=grouped
        )
        return y, None


Score = Literal["dot", "general", "concat", "additive"]


class SourceAttention(Block):
    """Base of the RNN encoder–decoder attentions (global, hard, local): ports, shape rule, score functions.

    Scores between decoder states h_t (`query`) and encoder states h̄_s (`memory`):
    dot h_tᵀh̄_s · general h_tᵀW_a h̄_s · concat v_aᵀtanh(W_a[h_t; h̄_s]) (Luong et al. 2015) ·
    additive v_aᵀtanh(W_a h_t + U_a h̄_s) (Bahdanau et al. 2015).
    """

    class Params(BlockParams):
        d_query: int = Field(gt=0, description="decoder state width (h_t)")
        d_memory: int = Field(gt=0, description="encoder state width (h̄_s)")
        score: Score = Field(
            "general",
            description="dot | general | concat (Luong) | additive (Bahdanau; feed the previous decoder state s_{i-1})",
        )
        d_attn: int | None = Field(
            None, gt=0, description="hidden width of W_a for concat/additive scores (default d_query)"
        )

        @model_validator(mode="after")
        def _score_widths(self) -> SourceAttention.Params:
            if self.score == "dot" and self.d_query != self.d_memory:
                raise ValueError(
                    f"score 'dot' needs d_query ({self.d_query}) == d_memory ({self.d_memory}); "
                    "use score: general, or make the widths equal"
                )
            if self.d_attn is not None and self.score in ("dot", "general"):
                raise ValueError(f"d_attn is only used by score concat or additive, not {self.score!r}; remove it")
            return self

    @classmethod
    def flops(cls, p: Params, inputs: dict, outputs: tuple) -> Any:
        """Scores for every (target, source) pair, then the context Σ_s a_t(s) h̄_s (global, hard and local)."""
        query, memory = inputs["query"].shape, inputs["memory"].shape
        batch, tgt, src = query[0], query[1], memory[1]
        d_attn = p.d_attn or p.d_query
        pairs = batch * tgt * src
        if p.score == "dot":
            score = 2 * pairs * p.d_query
        elif p.score == "general":
            score = linear(batch * src, p.d_memory, p.d_query) + 2 * pairs * p.d_query
        else:  # concat, additive: W_a h_t, U_a h̄_s, then v_aᵀ over every pair
            score = linear(batch * tgt, p.d_query, d_attn) + linear(batch * src, p.d_memory, d_attn)
            score += linear(pairs, d_attn, 1)
        return score + 2 * pairs * p.d_memory

    in_ports = (
        Port("query", rank=3, doc="decoder states h_t, [batch, tgt_len, d_query]"),
        Port("memory", rank=3, doc="encoder states h̄_s, [batch, src_len, d_memory]"),
        Port("memory_padding_mask", rank=2, dtype="bool", optional=True, doc="[batch, src_len], True = padding"),
    )
    out_ports = (
        Port("context", doc="c_t = Σ_s a_t(s) h̄_s, [batch, tgt_len, d_memory]"),
        Port("weights", doc="a_t(s), [batch, tgt_len, src_len]"),
    )

    def __init__(self, p: Params):
        super().__init__()
        self.kind = p.score
        d_attn = p.d_attn or p.d_query
        if p.score == "general":
            self.w_a = nn.Linear(p.d_memory, p.d_query, bias=False)
        elif p.score == "concat":
            self.w_a = nn.Linear(p.d_query + p.d_memory, d_attn, bias=False)
            self.v_a = nn.Linear(d_attn, 1, bias=False)
        elif p.score == "additive":
            self.w_a = nn.Linear(p.d_query, d_attn, bias=False)
            self.u_a = nn.Linear(p.d_memory, d_attn, bias=False)
            self.v_a = nn.Linear(d_attn, 1, bias=False)

    @classmethod
    def infer(
        cls, p: Params, query: TensorType, memory: TensorType, memory_padding_mask: TensorType | None = None
    ) -> tuple[TensorType, TensorType]:
        """query [b, tgt, d_query], memory [b, src, d_memory] → context [b, tgt, d_memory], weights [b, tgt, src]."""
        expect_last(query, p.d_query, "d_query", port="query")
        expect_last(memory, p.d_memory, "d_memory", port="memory")
        batch, tgt_len, src_len = query.shape[0], query.shape[1], memory.shape[1]
        if not dims_equal(memory.shape[0], batch):
            raise ShapeError(f"query {query.described()} and memory {memory.described()} disagree on batch")
        if memory_padding_mask is not None and not _same_dims(memory_padding_mask.shape, (batch, src_len)):
            raise ShapeError(
                f"memory_padding_mask {memory_padding_mask.described()} must be [batch, src_len] = "
                f"[{format_dim(batch)}, {format_dim(src_len)}] (memory {memory.described()})"
            )
        return query.with_shape(batch, tgt_len, memory.shape[2]), query.with_shape(batch, tgt_len, src_len)

    def keys(self, h_s: torch.Tensor) -> torch.Tensor:
        """The memory's side of the score (W_a h̄_s, U_a h̄_s, ...): the same at every decoder step, so a
        step-by-step decoder computes it once."""
        if self.kind == "general":
            return self.w_a(h_s)
        if self.kind == "concat":  # W_a[h_t; h̄_s] = W_a,h h_t + W_a,s h̄_s, without building every pair's concat
            return h_s @ self.w_a.weight[:, -h_s.size(-1) :].T
        if self.kind == "additive":
            return self.u_a(h_s)
        return h_s

    def score_keys(self, h_t: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """The scores from the decoder states and `keys(h̄_s)`."""
        if self.kind in ("dot", "general"):
            return h_t @ keys.transpose(1, 2)
        if self.kind == "concat":
            w_h = self.w_a.weight[:, : h_t.size(-1)]
            return self.v_a(torch.tanh((h_t @ w_h.T)[:, :, None] + keys[:, None])).squeeze(-1)
        return self.v_a(torch.tanh(self.w_a(h_t)[:, :, None] + keys[:, None])).squeeze(-1)

    @classmethod
    def stepping(cls, p: Params, ports: Mapping[str, bool]) -> Stepping | None:
        """Each decoder state attends the fixed encoder states; their side of the score is computed once."""
        fixed = not (ports.get("memory") or ports.get("memory_padding_mask"))
        return "state" if ports.get("query") and fixed else None

    def forward(
        self, query: torch.Tensor, memory: torch.Tensor, memory_padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.attend(0, query, memory, self.keys(memory), memory_padding_mask)

    def step(
        self,
        cache: StepCache,
        query: torch.Tensor,
        memory: torch.Tensor,
        memory_padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The new decoder states, at their target positions, against `keys(memory)` from the first step."""
        keys = cache.once("keys", lambda: self.keys(memory))
        return self.attend(cache.advance(query.size(1)), query, memory, keys, memory_padding_mask)

    def attend(
        self,
        start: int,
        query: torch.Tensor,
        memory: torch.Tensor,
        keys: torch.Tensor,
        memory_padding_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_t, a_t) for the decoder states of target positions start, start + 1, … given `keys(memory)`."""
        raise NotImplementedError

    @staticmethod
    def mask_padding(scores: torch.Tensor, memory_padding_mask: torch.Tensor | None) -> torch.Tensor:
        if memory_padding_mask is None:
            return scores
        return scores.masked_fill(memory_padding_mask[:, None, :], float("-inf"))


@register("global_attention", family="attention")
class GlobalAttention(SourceAttention):
    """Global (soft) attention over all source positions: a_t = softmax_s score(h_t, h̄_s), c_t = Σ_s a_t(s) h̄_s.

    Luong et al. 2015 with score dot | general | concat; Bahdanau et al. 2015 is `score: additive`
    (v_aᵀtanh(W_a s_{i-1} + U_a h_j)), where `query` holds the previous decoder states s_{i-1}. A whole
    sequence of decoder states is attended at once. The attentional state tanh(W_c[c_t; h_t]) is not part
    of the block: follow it with a linear layer over the concatenation.
    """

    example = {"d_query": 256, "d_memory": 512, "score": "general"}

    def attend(
        self,
        start: int,
        query: torch.Tensor,
        memory: torch.Tensor,
        keys: torch.Tensor,
        memory_padding_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        a_t = masked_softmax(self.mask_padding(self.score_keys(query, keys), memory_padding_mask))
        return a_t @ memory, a_t


@register("hard_attention", family="attention")
class HardAttention(SourceAttention):
    """Hard attention: a one-hot choice of one source position, c_t = h̄_ŝ with ŝ = argmax_s score(h_t, h̄_s).

    Eval: exact argmax one-hot. Training: straight-through Gumbel-softmax, ŝ = argmax_s (score + g_s) with
    g_s ~ Gumbel(0, 1); the forward is exactly one-hot, the gradient is that of softmax((score + g)/temperature).
    Scores as in `global_attention`; padded positions are never chosen.
    """

    class Params(SourceAttention.Params):
        temperature: float = Field(1.0, gt=0.0, description="Gumbel-softmax temperature τ of the training gradient")

    example = {"d_query": 256, "d_memory": 512, "score": "general", "temperature": 1.0}

    def __init__(self, p: Params):
        super().__init__(p)
        self.temperature = p.temperature

    def attend(
        self,
        start: int,
        query: torch.Tensor,
        memory: torch.Tensor,
        keys: torch.Tensor,
        memory_padding_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.mask_padding(self.score_keys(query, keys), memory_padding_mask)
        empty = scores.isneginf().all(-1, keepdim=True)  # every position padded: no choice, zero context
        scores = scores.masked_fill(empty, 0.0)
        if self.training:
            gumbel = -torch.empty_like(scores).exponential_().log()
            y_soft = ((scores + gumbel) / self.temperature).softmax(-1)
            y_hard = F.one_hot(y_soft.argmax(-1), scores.size(-1)).to(scores.dtype)
            a_t = y_hard + (y_soft - y_soft.detach())  # straight-through: value y_hard, gradient of y_soft
        else:
            a_t = F.one_hot(scores.argmax(-1), scores.size(-1)).to(scores.dtype)
        a_t = a_t.masked_fill(empty, 0.0)
        return a_t @ memory, a_t


@register("local_attention", family="attention")
class LocalAttention(SourceAttention):
    """Local attention (Luong et al. 2015): soft attention restricted to the window [p_t − D, p_t + D].

    predictive (local-p): p_t = S·sigmoid(v_pᵀ tanh(W_p h_t)), S = the source length (per example: the number
    of non-padding positions, so pad on the right), and a_t(s) = align(h_t, h̄_s)·exp(−(s − p_t)²/(2σ²)),
    σ = D/2, renormalised to sum to 1 unless `renormalize: false` (the paper's eq. 10 as written).
    monotonic (local-m): p_t = t, clipped to S − 1, and a_t = align (no Gaussian). Positions s are 0-based;
    align is the softmax of the scores over the window, which is clipped at the sequence edges; weights
    are exactly zero outside it.
    """

    class Params(SourceAttention.Params):
        window: int = Field(gt=0, description="half-width D: the window is p_t − D … p_t + D")
        mode: Literal["predictive", "monotonic"] = Field(
            "predictive", description="predictive: learned p_t (local-p); monotonic: p_t = t (local-m)"
        )
        d_p: int | None = Field(None, gt=0, description="hidden width of W_p in predictive mode (default d_query)")
        renormalize: bool = Field(
            True, description="predictive: divide by the sum so weights sum to 1 (false = paper's eq. 10)"
        )

        @model_validator(mode="after")
        def _predictive_only(self) -> LocalAttention.Params:
            if self.mode == "monotonic" and self.d_p is not None:
                raise ValueError("d_p (the width of W_p) is only used by mode: predictive; remove it")
            if self.mode == "monotonic" and not self.renormalize:
                raise ValueError("renormalize applies to mode: predictive only (monotonic has no Gaussian); remove it")
            return self

    example = {"d_query": 256, "d_memory": 512, "score": "general", "window": 10, "mode": "predictive"}

    @classmethod
    def flops(cls, p: Params, inputs: dict, outputs: tuple) -> Any:  # type: ignore[override]  # given its own Params
        """Scores and context as every source attention, and in predictive mode p_t = S·sigmoid(v_pᵀ tanh(W_p h_t))."""
        rows, d_p = tokens(inputs["query"].shape), p.d_p or p.d_query
        position = linear(rows, p.d_query, d_p) + linear(rows, d_p, 1) if p.mode == "predictive" else 0
        return super().flops(p, inputs, outputs) + position

    def __init__(self, p: Params):
        super().__init__(p)
        self.window, self.mode, self.renormalize = p.window, p.mode, p.renormalize
        self.sigma = p.window / 2
        if p.mode == "predictive":
            self.w_p = nn.Linear(p.d_query, p.d_p or p.d_query, bias=False)
            self.v_p = nn.Linear(p.d_p or p.d_query, 1, bias=False)

    def aligned_position(self, h_t: torch.Tensor, source_len: torch.Tensor, start: int = 0) -> torch.Tensor:
        """p_t, [batch, tgt_len]: S·sigmoid(v_pᵀ tanh(W_p h_t)) (predictive) or t clipped to S − 1 (monotonic);
        the queries are target positions start, start + 1, …"""
        if self.mode == "predictive":
            return source_len[:, None] * torch.sigmoid(self.v_p(torch.tanh(self.w_p(h_t)))).squeeze(-1)
        t = torch.arange(start, start + h_t.size(1), device=h_t.device, dtype=h_t.dtype)
        return torch.minimum(t[None, :], source_len[:, None] - 1)

    def aligned(
        self, start: int, query: torch.Tensor, memory: torch.Tensor, memory_padding_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """p_t, the window's centre, [batch, tgt_len], S being each example's unpadded source length (also what
        an attention map draws the window from: trainer.attention_maps)."""
        source_len = torch.full((memory.size(0),), memory.size(1), dtype=query.dtype, device=query.device)
        if memory_padding_mask is not None:
            source_len = (~memory_padding_mask).sum(-1).to(query.dtype)
        return self.aligned_position(query, source_len, start)

    def attend(
        self,
        start: int,
        query: torch.Tensor,
        memory: torch.Tensor,
        keys: torch.Tensor,
        memory_padding_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        src_len = memory.size(1)
        p_t = self.aligned(start, query, memory, memory_padding_mask)
        distance = torch.arange(src_len, device=query.device, dtype=query.dtype) - p_t[..., None]  # s − p_t
        scores = self.mask_padding(self.score_keys(query, keys), memory_padding_mask)
        align = masked_softmax(scores.masked_fill(distance.abs() > self.window, float("-inf")))
        if self.mode == "monotonic":
            return align @ memory, align
        a_t = align * torch.exp(-(distance**2) / (2 * self.sigma**2))
        if self.renormalize:
            a_t = a_t / a_t.sum(-1, keepdim=True).clamp_min(torch.finfo(a_t.dtype).tiny)
        return a_t @ memory, a_t
