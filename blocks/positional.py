"""Positions: the fixed sinusoid table and learned positions added to embeddings, the rotary embedding the
attention applies to queries and keys, and T5's relative position bias added to its scores."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar, Literal, Protocol

import torch
from pydantic import Field, model_validator
from torch import nn

from blockgraph.blocks.flops import no_flops
from blockgraph.blocks.registry import Block, BlockParams, Port, register
from blockgraph.blocks.stepping import StepCache, Stepping
from blockgraph.blocks.types import Limit, ShapeError, TensorType, dims_equal, expect_last, format_dim


def sinusoid_table(max_len: int, dim: int, layout: str = "interleaved") -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)); odd `dim` keeps one more sine.

    `layout: halves` puts the same sines first and the cosines after them (Marian, XLM without interleaving).
    `layout: whisper` is Whisper's table (`sinusoids` of transformers and of OpenAI's code): sines then cosines of
    pos · 10000^(−i/(d/2 − 1)), i < d/2, so that the last frequency is 1/10000 (an even d ≥ 4), not `halves`'
    10000^(−2i/d). Computed as in the Annotated Transformer (div_term = exp(2i · −ln(10000)/d)) but in
    float64, so the float32 result is the closed form correctly rounded even at large positions.
    """
    target = torch.get_default_device()
    if target.type == "meta":  # no values to compute; the ops' meta decompositions would import torch._dynamo
        return torch.empty(max_len, dim)
    with torch.device("cpu"):  # computed where it can be (float64), then moved
        position = torch.arange(max_len, dtype=torch.float64).unsqueeze(1)
        if layout == "whisper":
            steps = torch.arange(dim // 2, dtype=torch.float64)
            div_term = torch.exp(steps * -(math.log(10000.0) / (dim // 2 - 1)))
        else:
            div_term = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * -(math.log(10000.0) / dim))
        sines, cosines = torch.sin(position * div_term), torch.cos(position * div_term[: dim // 2])
        if layout in ("halves", "whisper"):
            pe = torch.cat((sines, cosines), dim=1)
        else:
            pe = torch.zeros(max_len, dim, dtype=torch.float64)
            pe[:, 0::2] = sines
            pe[:, 1::2] = cosines
    return pe.float().to(target)


TableLayout = Literal["interleaved", "halves", "whisper"]


def check_layout(layout: str, dim: int) -> None:
    """Whisper's table spaces its frequencies over dim/2 − 1 steps: it needs an even dim of 4 or more."""
    if layout == "whisper" and (dim % 2 or dim < 4):
        raise ValueError(f"Whisper's sinusoid table needs an even dim of at least 4, not {dim}")


class TableParams(Protocol):
    """What a position table's params say of it: the width of its rows and how many positions it covers."""

    dim: int
    max_len: int


class PositionTable(Block):
    """Base of the position tables added to embeddings: y = dropout(x + rows(start, seq)), positions from start.

    A subclass sets `rows`, `dropout` and its Params (with `dim` and `max_len`); `forward` starts at position 0,
    a decoding step where the last one stopped.
    """

    in_ports: ClassVar[tuple[Port, ...]] = (Port("x", rank=3, doc="embeddings [batch, seq, dim], seq ≤ max_len"),)
    dropout: nn.Dropout

    @classmethod
    def infer(cls, p: TableParams, x: TensorType) -> TensorType:
        """[batch, seq, dim] → [batch, seq, dim], with seq ≤ max_len."""
        expect_last(x, p.dim, "dim")
        return x

    @classmethod
    def limits(cls, p: TableParams, x: TensorType) -> tuple[Limit, ...]:
        return (Limit(x.shape[1], p.max_len, "the sequence length", "max_len"),)

    flops = no_flops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.added(0, x)

    @classmethod
    def stepping(cls, p: TableParams, ports: Mapping[str, bool]) -> Stepping:
        return "state"

    def step(self, cache: StepCache, x: torch.Tensor) -> torch.Tensor:
        """The new positions read the table from where the last step stopped."""
        return self.added(cache.advance(x.size(1)), x)

    def added(self, start: int, x: torch.Tensor) -> torch.Tensor:
        """What forward and step compute: x at positions start, start + 1, … plus their rows, then dropout."""
        return self.dropout(x + self.rows(start, x.size(1)))

    def rows(self, start: int, count: int) -> torch.Tensor:  # pragma: no cover - every subclass writes its own
        raise NotImplementedError


@register("sinusoidal_position", family="positional")
class SinusoidalPosition(PositionTable):
    """Add the fixed sine/cosine position table to x (batch, seq, dim), then dropout.

    PE(pos, 2i) = sin(pos / 10000^(2i/dim)) and PE(pos, 2i+1) = cos(pos / 10000^(2i/dim)) (Vaswani et al.,
    section 3.5). For an odd dim the last column is a sine. `layout: halves` keeps the same values with all
    sines first (Marian); `layout: whisper` is Whisper's table (see `sinusoid_table`). The table is a
    non-persistent buffer: it is not in the state_dict and is recomputed when the block is built (a learned_position
    with `init: whisper` and `freeze: true` is the same table stored with the weights, as Whisper's checkpoints
    hold it).
    """

    class Params(BlockParams):
        dim: int = Field(gt=0, description="model width; odd widths get one more sine than cosine column")
        max_len: int = Field(5000, gt=0, description="longest sequence the table covers")
        dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the sum")
        layout: TableLayout = Field(
            "interleaved",
            description="interleaved: sin, cos, sin, … (the paper); halves: all sines, then cosines (Marian); "
            "whisper: Whisper's sines, then cosines (an even dim ≥ 4)",
        )

        @model_validator(mode="after")
        def _layout_fits(self) -> SinusoidalPosition.Params:
            check_layout(self.layout, self.dim)
            return self

    out_ports = (Port("y", doc="x + PE[:seq], [batch, seq, dim]"),)
    example = {"dim": 512, "dropout": 0.1}
    pe: torch.Tensor  # the buffer [1, max_len, dim]

    def __init__(self, p: Params):
        super().__init__()
        self.dropout = nn.Dropout(p.dropout)
        self.register_buffer("pe", sinusoid_table(p.max_len, p.dim, p.layout).unsqueeze(0), persistent=False)

    def rows(self, start: int, count: int) -> torch.Tensor:
        return self.pe[:, start : start + count]


@register("learned_position", family="positional")
class LearnedPosition(PositionTable):
    """Add a learned vector per position (a row of an nn.Embedding) to x (batch, seq, dim), then dropout.

    y = dropout(x + P[offset + pos]) with P[offset + pos] the learned row of position pos (as in BERT and GPT-2,
    offset 0; BART keeps 2 unused rows first, offset 2), initialised N(0, init_std²). Given `pad`, pos counts the
    real tokens only (a row's k-th real token is at pos k − 1, whatever padding comes before it) and padded
    positions read row `pad_row`, as fairseq numbers positions: RoBERTa, XLM-R and CamemBERT (offset 2, pad_row 1,
    their padding_idx), whose outputs left padding then leaves unchanged. A decoding step goes on from the real
    tokens so far. `init` may start the table as a sinusoid table instead, and `freeze` keep it fixed: Whisper's
    encoder positions (init whisper, freeze), which its checkpoints store with the weights.
    """

    class Params(BlockParams):
        dim: int = Field(gt=0, description="model width")
        max_len: int = Field(512, gt=0, description="number of learned positions (longest sequence)")
        offset: int = Field(
            0, ge=0, description="position p reads row p + offset (BART: 2); the table has max_len + offset rows"
        )
        dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the sum")
        init_std: float = Field(0.02, gt=0, description="standard deviation of the initial position vectors")
        pad_row: int = Field(
            0, ge=0, description="the row padded positions read when `pad` is given (RoBERTa: 1, its padding_idx)"
        )
        init: Literal["normal", "interleaved", "halves", "whisper"] = Field(
            "normal",
            description="the initial table: normal, N(0, init_std²); or that layout of sinusoidal_position's table "
            "(whisper: Whisper's encoder, which keeps it with freeze)",
        )
        freeze: bool = Field(False, description="keep the table fixed (requires_grad False), as Whisper's encoder")

        @model_validator(mode="after")
        def _consistent(self) -> LearnedPosition.Params:
            if self.init != "normal":
                check_layout(self.init, self.dim)
            if self.pad_row >= self.max_len + self.offset:
                raise ValueError(
                    f"pad_row ({self.pad_row}) must be a row of the table, below max_len + offset "
                    f"({self.max_len + self.offset})"
                )
            return self

    in_ports = (
        *PositionTable.in_ports,
        Port("pad", rank=2, dtype="bool", optional=True, doc="[batch, seq], True = padding: not counted as a position"),
    )
    out_ports = (Port("y", doc="x + P[offset + pos], [batch, seq, dim]"),)
    example = {"dim": 768, "max_len": 512, "dropout": 0.1}

    def __init__(self, p: Params):
        super().__init__()
        self.pe = nn.Embedding(p.max_len + p.offset, p.dim)
        with torch.no_grad():
            if p.init == "normal":
                nn.init.normal_(self.pe.weight, std=p.init_std)
            else:
                self.pe.weight.copy_(sinusoid_table(p.max_len + p.offset, p.dim, p.init))
        self.pe.weight.requires_grad_(not p.freeze)
        self.dropout = nn.Dropout(p.dropout)
        self.offset, self.pad_row = p.offset, p.pad_row

    @classmethod
    def infer(cls, p: TableParams, x: TensorType, pad: TensorType | None = None) -> TensorType:
        """[batch, seq, dim] (pad [batch, seq]) → [batch, seq, dim], with seq ≤ max_len."""
        if pad is not None and not (dims_equal(pad.shape[0], x.shape[0]) and dims_equal(pad.shape[1], x.shape[1])):
            raise ShapeError(
                f"pad {pad.described()} must be [batch, seq] = [{format_dim(x.shape[0])}, {format_dim(x.shape[1])}] "
                f"of x {x.described()}",
                hint="feed the padding mask of the tokens x was embedded from",
                at=("in", "pad"),
            )
        return super().infer(p, x)

    @classmethod
    def limits(cls, p: TableParams, x: TensorType, pad: TensorType | None = None) -> tuple[Limit, ...]:
        return (Limit(x.shape[1], p.max_len, "the sequence length", "max_len"),)

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        return self.counted(0, x, pad, None)[0]

    def step(self, cache: StepCache, x: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        """The new positions go on where the last step stopped: from the real tokens so far, once `pad` is given
        (their count per row is kept, batch first)."""
        start = cache.advance(x.size(1))
        before = cache.tensors.get("real")
        if pad is not None and before is None:  # every earlier position was real
            before = torch.full((x.size(0),), start, dtype=torch.long, device=x.device)
        y, real = self.counted(start, x, pad, before)
        if real is not None:
            cache.tensors["real"] = real
        return y

    def counted(
        self, start: int, x: torch.Tensor, pad: torch.Tensor | None, before: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What forward and step compute: x plus the rows of its positions, then dropout, and each row's count of
        real tokens up to its last position (None while nothing was padded). Without padding so far the positions
        are start, start + 1, …; otherwise each real token's is the count of real tokens before it (`before`
        per row counted earlier), and padded positions read row pad_row."""
        if pad is None and before is None:
            return self.added(start, x), None
        real = ~pad if pad is not None else torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        count = real.cumsum(1) if before is None else before[:, None] + real.cumsum(1)
        index = torch.where(real, count - 1 + self.offset, self.pad_row)
        return self.dropout(x + self.pe(index)), count[:, -1]

    def rows(self, start: int, count: int) -> torch.Tensor:
        return self.pe.weight[self.offset + start : self.offset + start + count]


def rotary_angles(
    positions: torch.Tensor, dim: int, base: float, factor: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles p·θ^(−2i/dim) / factor, i < dim/2, for `positions` [..., seq] → [..., seq,
    dim/2]; a factor above 1 is linear position interpolation (Gemma 3's global layers: 8).

    Computed in float32 whatever the model's dtype, as LLaMA and GPT-NeoX do (Su et al., 2021); the factor divides
    the frequencies, as transformers' `linear` rope does.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=positions.device).float() / dim))
    if factor != 1.0:
        inv_freq = inv_freq / factor
    angles = positions.float()[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the first 2·cos.size(-1) features of x [batch, heads, seq, head_dim] by the angles; the rest pass.

    Halves (LLaMA, GPT-NeoX): feature i pairs with i + d/2, x' = x·cos + rotate_half(x)·sin. Interleaved (GPT-J):
    feature 2i pairs with 2i+1.
    """
    dim = 2 * cos.size(-1)
    rotated, passed = x[..., :dim], x[..., dim:]
    if cos.dim() == 3:  # [batch, seq, dim/2]: one angle table per sequence → broadcast over the heads
        cos, sin = cos[:, None], sin[:, None]
    if interleaved:
        cos, sin = cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)
        pairs = rotated.unflatten(-1, (-1, 2))
        turned = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    else:
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
        half = dim // 2
        turned = torch.cat((-rotated[..., half:], rotated[..., :half]), dim=-1)
    out = rotated * cos.to(x.dtype) + turned * sin.to(x.dtype)
    return torch.cat((out, passed), dim=-1) if passed.size(-1) else out


@register("relative_position_bias", family="positional")
class RelativePositionBias(Block):
    """T5's relative position bias: a learned scalar per head and bucket of the distance j − i, added to scores.

    Distances are bucketed as in T5 (Raffel et al., 2020): half the buckets for exact small distances, the rest
    logarithmically up to `max_distance`; bidirectional (the encoder) keeps the sign in the bucket, causal (the
    decoder) maps every later key to bucket 0. One node computes the bias once and feeds every layer's
    attention (`position_bias`), as T5 shares it across layers.
    """

    class Params(BlockParams):
        heads: int = Field(gt=0, description="attention heads (one bias per head)")
        buckets: int = Field(32, gt=1, description="number of distance buckets")
        max_distance: int = Field(128, gt=1, description="distances from here on share the last bucket")
        bidirectional: bool = Field(True, description="true in the encoder; false (causal) in the decoder")

    in_ports = (
        Port("query", rank=3, doc="[batch, q_len, d] (only its length is read)"),
        Port("key", rank=3, optional=True, doc="[batch, k_len, d]; default query"),
    )
    out_ports = (Port("y", doc="[1, heads, q_len, k_len], added to the attention scores"),)
    example = {"heads": 8, "bidirectional": True}

    def __init__(self, p: Params):
        super().__init__()
        self.relative_attention_bias = nn.Embedding(p.buckets, p.heads)
        self.buckets, self.max_distance, self.bidirectional = p.buckets, p.max_distance, p.bidirectional

    @classmethod
    def infer(cls, p: Params, query: TensorType, key: TensorType | None = None) -> TensorType:
        """query [b, q, d] (key [b, k, d]) → [1, heads, q, k] float32."""
        key = key or query
        return TensorType((1, p.heads, query.shape[1], key.shape[1]), torch.float32)

    flops = no_flops

    def bucket(self, distance: torch.Tensor) -> torch.Tensor:
        """The bucket of each distance j − i (memory position minus query position)."""
        buckets, bucket = self.buckets, torch.zeros_like(distance)
        if self.bidirectional:
            buckets //= 2
            bucket = bucket + (distance > 0).long() * buckets
            distance = distance.abs()
        else:
            distance = -torch.min(distance, torch.zeros_like(distance))
        exact = buckets // 2
        large = (
            exact
            + (torch.log(distance.float() / exact) / math.log(self.max_distance / exact) * (buckets - exact)).long()
        )
        large = torch.min(large, torch.full_like(large, buckets - 1))
        return bucket + torch.where(distance < exact, distance, large)

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None) -> torch.Tensor:
        key = query if key is None else key
        return self.between(0, query.size(1), key.size(1))

    @classmethod
    def stepping(cls, p: Params, ports: Mapping[str, bool]) -> Stepping | None:
        return "state" if ports.get("query") else None

    @classmethod
    def shares_fixed(cls, p: Params, ports: Mapping[str, bool]) -> bool:
        """Fixed keys are read for their length alone."""
        return True

    def step(self, cache: StepCache, query: torch.Tensor, key: torch.Tensor | None = None) -> torch.Tensor:
        """The rows of the new query positions: over every key so far (self-attention), or the fixed keys."""
        start = cache.advance(query.size(1))
        keys = cache.length if key is None or cache.grows("key") else key.size(1)
        return self.between(start, query.size(1), keys)

    def between(self, start: int, queries: int, keys: int) -> torch.Tensor:
        """[1, heads, queries, keys]: the bias of query positions start … start + queries − 1 against keys 0 …"""
        device = self.relative_attention_bias.weight.device
        i = torch.arange(start, start + queries, device=device)[:, None]
        j = torch.arange(keys, device=device)[None, :]
        return self.relative_attention_bias(self.bucket(j - i)).permute(2, 0, 1).unsqueeze(0)
