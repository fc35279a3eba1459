"""Multi-head latent attention (DeepSeek-V2, DeepSeek-V3, Kimi-K2): keys and values come from one compressed
latent per position, so that a decoding cache holds the latent instead of every head's keys and values."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from blockgraph.blocks.attention import combine_masks
from blockgraph.blocks.flops import linear, tokens
from blockgraph.blocks.norm import RMSNorm
from blockgraph.blocks.positional import apply_rotary
from blockgraph.blocks.registry import Block, BlockParams, Port, register
from blockgraph.blocks.stepping import StepCache, Stepping
from blockgraph.blocks.types import ShapeError, TensorType, dims_equal, expect_last, format_dim


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1·m·ln(s) + 1 (Peng et al. 2023, eq. 21); 1 when the factor s ≤ 1."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@register("multi_head_latent_attention", family="attention")
class MultiHeadLatentAttention(Block):
    """Multi-head latent attention (DeepSeek-V2): queries, keys and values through low-rank latents, rotary apart.

    Per position x: the query q = W_UQ·RMSNorm(W_DQ·x) (`q_a_proj`, `q_a_layernorm`, `q_b_proj`; or one `q_proj`
    when q_lora_rank is null), each head's [qk_nope_head_dim | qk_rope_head_dim]; `kv_a_proj_with_mqa` gives
    the latent c = RMSNorm(W_DKV·x) (kv_lora_rank wide, `kv_a_layernorm`) and one rotary key k_R shared by all
    heads; `kv_b_proj` expands c into each head's key (no rotary part) and value. Head h scores
    s·(q_nope·k_nope + rot(q_rope)·rot(k_R)), then `o_proj` maps the heads' values back to d_model. The names are
    transformers' `DeepseekV3Attention`'s, so that its tensors map one to one.

    Rotary on the rope parts only, in interleaved pairs (DeepSeek's `rope_interleave`) or halves. `yarn_factor`
    turns on YaRN (Peng et al. 2023) as DeepSeek-V3 uses it: frequencies interpolated between the
    beta_fast/beta_slow corrections over the original context, the rotary part scaled by the attention factor
    (given, or yarn_mscale(s, mscale) / yarn_mscale(s, mscale_all_dim)), and the softmax scale, by default
    (qk_nope_head_dim + qk_rope_head_dim)^-½, by yarn_mscale(s, mscale_all_dim)².

    Decoding caches, per position, the latent c and the rotated k_R (kv_lora_rank + qk_rope_head_dim numbers)
    instead of every head's key and value (heads × (qk_nope + qk_rope + v)): a step attends in the latent space,
    each head's W_UK folded into its query and W_UV applied after the weighted sum, all heads' queries against
    the one key/value head [c; k_R] / c. A whole sequence (training, a prompt) expands the keys and values once
    instead, which costs fewer FLOPs whenever the queries are many; each call takes the cheaper way (`absorbs`),
    the same function to float rounding. Masks as in `multi_head_attention`.
    """

    class Params(BlockParams):
        d_model: int = Field(gt=0, description="model width (of the input and the output)")
        heads: int = Field(gt=0, description="number of heads")
        q_lora_rank: int | None = Field(
            None, gt=0, description="width of the query latent (null: one direct query projection q_proj)"
        )
        kv_lora_rank: int = Field(gt=0, description="width of the key/value latent c, what a decoding step caches")
        qk_nope_head_dim: int = Field(gt=0, description="per-head query/key features without rotary")
        qk_rope_head_dim: int = Field(gt=0, description="per-head query features with rotary (one shared key part)")
        v_head_dim: int = Field(gt=0, description="per-head value width")
        eps: float = Field(1e-6, gt=0, description="epsilon of the two latents' RMSNorms")
        bias: bool = Field(False, description="bias in q_a_proj, kv_a_proj_with_mqa and o_proj (attention_bias)")
        dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the attention weights")
        scale: float | None = Field(
            None, gt=0, description="softmax scale (default (qk_nope + qk_rope)^-½, with YaRN times its mscale²)"
        )
        causal: bool = Field(False, description="forbid attending to later positions (decoder self-attention)")
        rotary_base: float = Field(10000.0, gt=0, description="θ, the base of the rotary frequencies")
        rotary_interleaved: bool = Field(
            True, description="rotate pairs (2i, 2i+1), as DeepSeek's rope_interleave; false: halves (i, i + d/2)"
        )
        yarn_factor: float | None = Field(
            None, ge=1, description="YaRN's context extension factor s (null: plain rotary, the yarn_* below unused)"
        )
        yarn_original_positions: int | None = Field(
            None, gt=0, description="YaRN: the context length trained on before extension (needs yarn_factor)"
        )
        yarn_beta_fast: float = Field(32.0, gt=0, description="YaRN: rotations beyond which a frequency is kept")
        yarn_beta_slow: float = Field(1.0, gt=0, description="YaRN: rotations below which a frequency is divided by s")
        yarn_mscale: float | None = Field(None, ge=0, description="YaRN: m of the rotary part's attention factor")
        yarn_mscale_all_dim: float | None = Field(
            None, ge=0, description="YaRN: m of the softmax scale's factor yarn_mscale(s, m)² (and the divisor above)"
        )
        yarn_attention_factor: float | None = Field(
            None, gt=0, description="YaRN: the rotary part's factor as given (instead of the mscales')"
        )
        yarn_truncate: bool = Field(True, description="YaRN: round the correction range outwards to whole dims")

        @model_validator(mode="after")
        def _shapes(self) -> MultiHeadLatentAttention.Params:
            if self.qk_rope_head_dim % 2:
                raise ValueError(f"qk_rope_head_dim ({self.qk_rope_head_dim}) must be even: rotary turns pairs")
            if self.yarn_factor is not None and self.yarn_original_positions is None:
                raise ValueError("yarn_factor needs yarn_original_positions (original_max_position_embeddings)")
            return self

    in_ports = (
        Port("x", rank=3, doc="[batch, seq, d_model]"),
        Port("key_padding_mask", rank=2, dtype="bool", optional=True, doc="[batch, seq], True = padding"),
        Port("positions", rank=(1, 2), dtype="int", optional=True, doc="rotary positions [seq] or [batch, seq]"),
    )
    out_ports = (Port("y", doc="[batch, seq, d_model]"),)
    example = {
        "d_model": 7168,
        "heads": 128,
        "q_lora_rank": 1536,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "causal": True,
    }

    def __init__(self, p: Params):
        super().__init__()
        self.p = p
        self.heads, self.rank = p.heads, p.kv_lora_rank
        self.nope, self.rope, self.v_dim = p.qk_nope_head_dim, p.qk_rope_head_dim, p.v_head_dim
        self.causal, self.dropout = p.causal, p.dropout
        self.scale = self.softmax_scale(p)
        q_width = p.heads * (p.qk_nope_head_dim + p.qk_rope_head_dim)
        if p.q_lora_rank is None:
            self.q_proj = nn.Linear(p.d_model, q_width, bias=False)
        else:
            self.q_a_proj = nn.Linear(p.d_model, p.q_lora_rank, bias=p.bias)
            self.q_a_layernorm = RMSNorm(RMSNorm.Params(dim=p.q_lora_rank, eps=p.eps))
            self.q_b_proj = nn.Linear(p.q_lora_rank, q_width, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(p.d_model, p.kv_lora_rank + p.qk_rope_head_dim, bias=p.bias)
        self.kv_a_layernorm = RMSNorm(RMSNorm.Params(dim=p.kv_lora_rank, eps=p.eps))
        self.kv_b_proj = nn.Linear(p.kv_lora_rank, p.heads * (p.qk_nope_head_dim + p.v_head_dim), bias=False)
        self.o_proj = nn.Linear(p.heads * p.v_head_dim, p.d_model, bias=p.bias)

    @staticmethod
    def softmax_scale(p: Params) -> float:
        """s: as given, else (qk_nope + qk_rope)^-½, times yarn_mscale(s, mscale_all_dim)² under YaRN."""
        if p.scale is not None:
            return p.scale
        scale = (p.qk_nope_head_dim + p.qk_rope_head_dim) ** -0.5
        if p.yarn_factor is not None and p.yarn_mscale_all_dim:
            scale *= yarn_mscale(p.yarn_factor, p.yarn_mscale_all_dim) ** 2
        return scale

    @staticmethod
    def absorbs(p: Params, queries: Any, keys: Any) -> Any:
        """Whether attending in the latent space costs fewer multiply-adds than expanding the keys and values:
        per head, q·n·r + q·k·(2r + rope) + q·r·v against k·r·(n + v) + q·k·(n + rope + v). For a whole sequence
        (q = k) this is 2r < n + v whatever its length; a decoding step (q = 1) absorbs."""
        r, n, v, rope = p.kv_lora_rank, p.qk_nope_head_dim, p.v_head_dim, p.qk_rope_head_dim
        absorbed = queries * r * (n + v) + queries * keys * (2 * r + rope)
        expanded = keys * r * (n + v) + queries * keys * (n + rope + v)
        return absorbed < expanded

    @classmethod
    def infer(
        cls, p: Params, x: TensorType, key_padding_mask: TensorType | None = None, positions: TensorType | None = None
    ) -> TensorType:
        """x [batch, seq, d_model] → y [batch, seq, d_model]."""
        expect_last(x, p.d_model, "d_model")
        batch, seq = x.shape[0], x.shape[1]
        if key_padding_mask is not None and not (
            dims_equal(key_padding_mask.shape[0], batch) and dims_equal(key_padding_mask.shape[1], seq)
        ):
            raise ShapeError(
                f"key_padding_mask {key_padding_mask.described()} must be [batch, seq] = "
                f"[{format_dim(batch)}, {format_dim(seq)}] (x {x.described()})"
            )
        if positions is not None and not dims_equal(positions.shape[-1], seq):
            raise ShapeError(f"positions {positions.described()} must be [seq] or [batch, seq] for x {x.described()}")
        return x

    @classmethod
    def flops(cls, p: Params, inputs: dict, outputs: tuple) -> Any:
        """The projections, then the attention the way forward computes it (`absorbs` with as many queries as keys)."""
        shape = inputs["x"].shape
        rows, batch, seq = tokens(shape), shape[0], shape[1]
        h, r, n, rope, v = p.heads, p.kv_lora_rank, p.qk_nope_head_dim, p.qk_rope_head_dim, p.v_head_dim
        q_width = h * (n + rope)
        if p.q_lora_rank is None:
            query = linear(rows, p.d_model, q_width)
        else:
            query = linear(rows, p.d_model, p.q_lora_rank) + linear(rows, p.q_lora_rank, q_width)
        projections = query + linear(rows, p.d_model, r + rope) + linear(rows, h * v, p.d_model)
        pairs = batch * h * seq * seq
        if cls.absorbs(p, 2, 2):  # the same answer at every length: 2r < n + v
            attention = linear(rows * h, n, r) + 2 * pairs * (2 * r + rope) + linear(rows * h, r, v)
        else:
            attention = linear(rows, r, h * (n + v)) + 2 * pairs * (n + rope + v)
        return projections + attention

    @classmethod
    def stepping(cls, p: Params, ports: Mapping[str, bool]) -> Stepping | None:
        """Causal self-attention caches each position's latent and rotary key; the masks grow with the queries."""
        if not ports.get("x") or any(ports.get(port) is False for port in ("key_padding_mask", "positions")):
            return None
        return "state" if p.causal else None

    def forward(
        self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        q_nope, q_rope, latent = self.projected(0, x, positions)
        return self.attend(0, q_nope, q_rope, latent, key_padding_mask)

    def step(
        self,
        cache: StepCache,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The new positions against every latent so far: the cache holds [c; rot(k_R)] per position, batch first
        ([batch, positions, kv_lora_rank + qk_rope_head_dim]), and the padding mask."""
        start = cache.advance(x.size(1))
        q_nope, q_rope, latent = self.projected(start, x, positions)
        latent = cache.extend("latent", latent, dim=1)
        if key_padding_mask is not None:
            key_padding_mask = cache.extend("pad", key_padding_mask, dim=1)
        return self.attend(start, q_nope, q_rope, latent, key_padding_mask)

    def projected(
        self, start: int, x: torch.Tensor, positions: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The queries' two parts [batch, heads, seq, nope | rope] and the keys' latent [batch, seq, rank + rope]
        (c normalized, then k_R), the rotary parts turned at `positions` (by default start, start + 1, …)."""
        b, t, _ = x.shape
        q = self.q_proj(x) if self.p.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rope = q.view(b, t, self.heads, -1).transpose(1, 2).split([self.nope, self.rope], dim=-1)
        c, k_rope = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)
        if positions is None:
            positions = torch.arange(start, start + t, device=x.device)
        cos, sin = self.angles(positions)
        q_rope = apply_rotary(q_rope, cos, sin, self.p.rotary_interleaved)
        k_rope = apply_rotary(k_rope[:, None], cos, sin, self.p.rotary_interleaved)[:, 0]
        return q_nope, q_rope, torch.cat((self.kv_a_layernorm(c), k_rope), dim=-1)

    def angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of the rotary angles at `positions` [..., seq] → [..., seq, rope/2], in float32 (YaRN's
        frequencies and attention factor where configured)."""
        p, dim = self.p, self.rope
        powers = p.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=positions.device).float() / dim)
        frequencies, factor = 1.0 / powers, 1.0
        if p.yarn_factor is not None and p.yarn_original_positions is not None:
            frequencies = self.yarn(powers, p.yarn_factor, p.yarn_original_positions)
            factor = self.yarn_attention_factor(p, p.yarn_factor)
        angles = positions.float()[..., None] * frequencies
        return angles.cos() * factor, angles.sin() * factor

    def yarn(self, powers: torch.Tensor, factor: float, original: int) -> torch.Tensor:
        """YaRN's frequencies θ^(-2i/d), divided by the factor s below beta_slow rotations over the `original`
        context, kept above beta_fast, blended linearly between (NTK-by-parts)."""
        p, dim = self.p, self.rope

        def dimension(rotations: float) -> float:  # the dim whose wavelength fits `rotations` in the original context
            return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(p.rotary_base))

        low, high = dimension(p.yarn_beta_fast), dimension(p.yarn_beta_slow)
        if p.yarn_truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # a one-point range: a step, not a division by zero
        index = torch.arange(dim // 2, dtype=torch.float32, device=powers.device)
        kept = 1 - ((index - low) / (high - low)).clamp(0, 1)
        return 1.0 / (factor * powers) * (1 - kept) + 1.0 / powers * kept

    @staticmethod
    def yarn_attention_factor(p: Params, factor: float) -> float:
        """The rotary part's scale under YaRN's `factor`: as given, else yarn_mscale(s, mscale) /
        yarn_mscale(s, mscale_all_dim) when both are set, else yarn_mscale(s)."""
        if p.yarn_attention_factor is not None:
            return p.yarn_attention_factor
        if p.yarn_mscale and p.yarn_mscale_all_dim:
            return yarn_mscale(factor, p.yarn_mscale) / yarn_mscale(factor, p.yarn_mscale_all_dim)
        return yarn_mscale(factor)

    def attend(
        self,
        start: int,
        q_nope: torch.Tensor,
        q_rope: torch.Tensor,
        latent: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Queries at positions start, start + 1, … against the latents of every key so far (forward's own, or
        the cache's), in the latent space or expanded (`absorbs`), then o_proj."""
        b, _, t, _ = q_nope.shape
        heads, keys = self.heads, latent.size(1)
        absorbed = self.absorbs(self.p, t, keys)
        causal = self.causal and not (start and t == 1)  # the newest position alone sees every key so far
        mask = None
        if key_padding_mask is not None or (causal and (start or absorbed)):  # SDPA's causal flag: top-left, unfolded
            mask = combine_masks(t, keys, key_padding_mask, None, causal, q_nope.device, offset=start)
            causal = False
        dropout = self.dropout if self.training else 0.0
        w_kv = self.kv_b_proj.weight.view(heads, self.nope + self.v_dim, self.rank)  # float under int8 too
        if absorbed:  # the heads' queries folded into one sequence against one key/value head: [c; k_R] and c
            w_k, w_v = w_kv.split([self.nope, self.v_dim], dim=1)
            q = torch.cat((torch.einsum("bhtn,hnr->bhtr", q_nope, w_k), q_rope), dim=-1).reshape(b, 1, heads * t, -1)
            if mask is not None and mask.size(-2) > 1:  # a row per query position, the same for every head
                mask = mask.reshape(-1, 1, 1, t, keys).expand(-1, 1, heads, t, keys).reshape(-1, 1, heads * t, keys)
            kv = latent[:, None]
            y = F.scaled_dot_product_attention(q, kv, kv[..., : self.rank], mask, dropout, scale=self.scale)
            y = torch.einsum("bhtr,hvr->bhtv", y.view(b, heads, t, self.rank), w_v)
        else:
            c, k_rope = latent.split([self.rank, self.rope], dim=-1)
            kv = F.linear(c, self.kv_b_proj.weight).view(b, keys, heads, -1).transpose(1, 2)
            k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
            k = torch.cat((k_nope, k_rope[:, None].expand(-1, heads, -1, -1)), dim=-1)
            q = torch.cat((q_nope, q_rope), dim=-1)
            y = F.scaled_dot_product_attention(q, k, v, mask, dropout, is_causal=causal, scale=self.scale)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, heads * self.v_dim))
