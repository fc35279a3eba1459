"""State-space blocks: Mamba's selective state-space layer (Gu & Dao, 2023).

A recurrence h_t = Ā_t h_{t−1} + B̄_t x_t over a sequence is linear in h, so the states of all positions follow
from an associative scan: the pairs (a, b) of h ↦ a·h + b compose as (a₂a₁, a₂b₁ + b₂), and Blelloch's
work-efficient scan computes every prefix in 2·log₂(length) levels of elementwise products. The decays a lie in
(0, 1], so no product grows, and nothing exponentiates a positive sum: it is exact where the sequential loop is,
to rounding. A decoding step is the same recurrence from the state the last step left.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from blockgraph.blocks.flops import linear
from blockgraph.blocks.registry import Block, BlockParams, Port, register
from blockgraph.blocks.stepping import StepCache, Stepping
from blockgraph.blocks.types import ShapeError, TensorType, dims_equal, expect_last, format_dim


def linear_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """h_t = a_t ⊙ h_{t−1} + b_t along dim 1 from h_{−1} = 0, for every t at once (Blelloch's scan).

    Pairs of neighbours (2k, 2k+1) compose into one step, a_{2k+1}a_{2k} and a_{2k+1}b_{2k} + b_{2k+1}; the
    half-length recurrence of the pairs gives the odd states, and each even state follows from the odd one before
    it. Elementwise products only, log₂(t) levels deep, about 2t of them in all.
    """
    length = b.size(1)
    if length == 1:
        return b
    paired = 2 * (length // 2)
    a_odd = a[:, 1::2]
    odd = linear_scan(a_odd * a[:, 0:paired:2], torch.addcmul(b[:, 1::2], a_odd, b[:, 0:paired:2]))  # h_1, h_3, …
    h = torch.empty_like(b)
    h[:, 1::2] = odd
    h[:, :1] = b[:, :1]
    h[:, 2::2] = torch.addcmul(b[:, 2::2], a[:, 2::2], odd[:, : (length - 1) // 2])  # h_2, h_4, …
    return h


# values per row of a chunk's scan tensors by default, by device type (others: 2**24); meta as the CPU, since memory
# estimates run there and a CPU run that is refused for a GPU-sized chunk it never makes is the worse error
SCAN_VALUES = {"cpu": 2**19, "meta": 2**19}


@register("mamba", family="state_space")
class Mamba(Block):
    """Mamba's selective state-space layer: gated input projection, causal depthwise convolution, selective scan.

    (u, z) = W_in·x; u ← SiLU(causal depthwise conv(u)); (δ, B_t, C_t) = W_x·u; Δ_t = softplus(W_dt·δ + b_dt);
    A = −exp(A_log), a d_inner × d_state matrix of per-channel decay rates; per channel and state dimension
    h_t = exp(Δ_t A) h_{t−1} + Δ_t B_t u_t, and v_t = C_t·h_t + D ⊙ u_t; the output is W_out(v ⊙ SiLU(z)).
    Δ, B and C depend on the input (selective), A and D do not. d_inner = expand · d_model. The tensors keep the
    names and shapes of Hugging Face's MambaMixer (`in_proj`, `conv1d`, `x_proj`, `dt_proj`, `A_log`, `D`,
    `out_proj`). The recurrence runs in float32 whatever the model's precision (under autocast the readout C·h
    follows autocast, as transformers' does).

    A whole sequence is scanned in parallel (see `linear_scan`), `chunk` positions at a time with the state carried
    from chunk to chunk: the scan's tensors hold batch · chunk · d_inner · d_state floats. By default a chunk holds
    about 2¹⁹ of them per row on a CPU, where a scan that stays in its caches runs fastest (but 8 positions at
    least), and 2²⁴ elsewhere (on a GPU, the fewer and larger the steps the better); the batch is left out, so that
    an export keeps it dynamic. Chunks change the result by rounding only; the sequence length is a constant of an
    export (the scan's depth follows it).

    A decoding step keeps the convolution's last d_conv − 1 inputs and the state h, batch · d_inner · (d_conv − 1 +
    d_state) numbers per layer whatever the length so far. `pad` (True = padding) zeroes the padded positions' input
    and convolved features, as transformers' Mamba does with its attention mask: left padding then leaves the real
    positions' outputs as they are without it.
    """

    class Params(BlockParams):
        d_model: int = Field(gt=0, description="input and output width")
        d_state: int = Field(16, gt=0, description="state dimensions N per channel")
        d_conv: int = Field(4, gt=0, description="kernel width of the causal depthwise convolution")
        expand: int = Field(2, gt=0, description="d_inner = expand · d_model, the width of the scanned channels")
        dt_rank: int | Literal["auto"] = Field(
            "auto", description="rank of the Δ projection δ → Δ (auto: ⌈d_model / 16⌉)"
        )
        conv_bias: bool = Field(True, description="bias in the convolution")
        bias: bool = Field(False, description="bias in the input and output projections")
        dt_min: float = Field(0.001, gt=0, description="initial Δ is drawn log-uniformly from [dt_min, dt_max]")
        dt_max: float = Field(0.1, gt=0, description="see dt_min")
        dt_init_floor: float = Field(1e-4, gt=0, description="initial Δ is at least this")
        chunk: int | None = Field(
            None, gt=0, description="positions scanned at once (default: by the device, see above): memory and speed"
        )

        @model_validator(mode="after")
        def _ranges(self) -> Mamba.Params:
            if isinstance(self.dt_rank, int) and self.dt_rank <= 0:
                raise ValueError(f"dt_rank ({self.dt_rank}) must be a positive rank, or auto")
            if self.dt_min > self.dt_max:
                raise ValueError(f"dt_min ({self.dt_min}) must be at most dt_max ({self.dt_max})")
            return self

        @property
        def d_inner(self) -> int:
            return self.expand * self.d_model

        @property
        def rank(self) -> int:
            return math.ceil(self.d_model / 16) if self.dt_rank == "auto" else self.dt_rank

    in_ports = (
        Port("x", rank=3, doc="[batch, seq, d_model]"),
        Port("pad", rank=2, dtype="bool", optional=True, doc="[batch, seq], True = padding"),
    )
    out_ports = (Port("y", doc="[batch, seq, d_model]"),)
    example = {"d_model": 768, "d_state": 16, "d_conv": 4, "expand": 2}
    # the decay rates 1 … N, Δ's spread and the depthwise kernel (whose fans a dense rule miscounts) are Mamba's
    own_init = ("A_log", "dt_proj.weight", "conv1d.weight")

    def __init__(self, p: Params):
        super().__init__()
        d_inner, rank = p.d_inner, p.rank
        self.d_inner, self.d_state, self.rank, self.d_conv, self.chunk = d_inner, p.d_state, rank, p.d_conv, p.chunk
        self.in_proj = nn.Linear(p.d_model, 2 * d_inner, bias=p.bias)
        self.conv1d = nn.Conv1d(d_inner, d_inner, p.d_conv, groups=d_inner, bias=p.conv_bias)
        self.x_proj = nn.Linear(d_inner, rank + 2 * p.d_state, bias=False)
        self.dt_proj = nn.Linear(rank, d_inner)
        self.A_log = nn.Parameter(torch.empty(d_inner, p.d_state))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, p.d_model, bias=p.bias)
        if self.D.is_meta:  # no values to draw (and on meta, arange and arithmetic run torch's reference code,
            return  # which loads its compiler: `validate` and `inspect` stay light)
        with torch.no_grad():  # Mamba's initialisation: A = −(1, 2, …, N) per channel, Δ spread in a range
            self.A_log.copy_(torch.log(torch.arange(1, p.d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
            bound = rank**-0.5
            nn.init.uniform_(self.dt_proj.weight, -bound, bound)
            spread = torch.rand(d_inner) * (math.log(p.dt_max) - math.log(p.dt_min)) + math.log(p.dt_min)
            dt = spread.exp().clamp(min=p.dt_init_floor)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(dt): Δ starts at dt

    @classmethod
    def infer(cls, p: Params, x: TensorType, pad: TensorType | None = None) -> TensorType:
        """[batch, seq, d_model] (pad [batch, seq]) → [batch, seq, d_model]."""
        expect_last(x, p.d_model, "d_model")
        if pad is not None and not (dims_equal(pad.shape[0], x.shape[0]) and dims_equal(pad.shape[1], x.shape[1])):
            raise ShapeError(
                f"pad {pad.described()} must be [batch, seq] = [{format_dim(x.shape[0])}, {format_dim(x.shape[1])}] "
                f"of x {x.described()}",
                hint="feed the padding mask of the tokens x comes from",
                at=("in", "pad"),
            )
        return x

    @classmethod
    def flops(cls, p: Params, inputs: dict, outputs: tuple) -> Any:
        """W_in, the depthwise convolution, W_x, W_dt, the readout C_t·h_t and W_out, per position."""
        x = inputs["x"].shape
        rows, d_inner = x[0] * x[1], p.d_inner
        projections = linear(rows, p.d_model, 2 * d_inner) + linear(rows, d_inner, p.rank + 2 * p.d_state)
        projections += linear(rows, p.rank, d_inner) + linear(rows, d_inner, p.d_model)
        return projections + 2 * rows * d_inner * p.d_conv + 2 * rows * d_inner * p.d_state

    @classmethod
    def stepping(cls, p: Params, ports: Mapping[str, bool]) -> Stepping | None:
        """A recurrence: each step goes on from the convolution's last inputs and the state."""
        return "state" if ports.get("x") and ports.get("pad", True) else None

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        return self.mixed(x, pad, None, None)[0]

    def step(self, cache: StepCache, x: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        """The new positions from the convolution inputs and the state the last step left (batch first)."""
        held = cache.tensors
        y, held["conv"], held["h"] = self.mixed(x, pad, held.get("conv"), held.get("h"))
        return y

    def mixed(
        self, x: torch.Tensor, pad: torch.Tensor | None, conv: torch.Tensor | None, h: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The layer's output at the positions of `x`, after `conv` (the convolution's d_conv − 1 inputs before
        them, [batch, d_inner, d_conv − 1]) and the state `h` ([batch, d_inner, d_state], float32); None: the start
        of a sequence (zeros). Returns the output, and `conv` and `h` after the last position."""
        keep = None if pad is None else (~pad).unsqueeze(-1).to(x.dtype)
        if keep is not None:
            x = x * keep
        inner, gate = self.in_proj(x).chunk(2, dim=-1)
        if keep is not None and self.in_proj.bias is not None:  # W_in's bias: not an input the convolution may read
            inner = inner * keep
        if conv is None:
            conv = inner.new_zeros(inner.size(0), self.d_inner, self.d_conv - 1)
        stream = torch.cat((conv, inner.transpose(1, 2)), dim=2)  # [batch, d_inner, d_conv − 1 + seq]
        conv = stream.narrow(2, stream.size(2) - (self.d_conv - 1), self.d_conv - 1).clone()  # not all the stream
        u = F.silu(self.conv1d(stream)).transpose(1, 2)
        if keep is not None:
            u = u * keep
        delta, b, c = self.x_proj(u).split([self.rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(self.dt_proj(delta).float())
        y, h = self.scanned(u.float(), dt, b.float(), c.float(), h)
        y = (y + u.float() * self.D.float()) * F.silu(gate.float())
        return self.out_proj(y.to(gate.dtype)), conv, h

    def scanned(
        self, u: torch.Tensor, dt: torch.Tensor, b: torch.Tensor, c: torch.Tensor, h: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """C_t·h_t at every position ([batch, seq, d_inner]) and the last state, from `h` before the first (None:
        zeros), `chunk` positions at a time: h_t = exp(Δ_t A) h_{t−1} + Δ_t B_t u_t."""
        a = -torch.exp(self.A_log.float())  # [d_inner, d_state]
        chunk = self.chunk or max(8, SCAN_VALUES.get(u.device.type, 2**24) // (self.d_inner * self.d_state))
        readouts = []
        for start in range(0, u.size(1), chunk):
            part = slice(start, start + chunk)
            decay = (dt[:, part, :, None] * a).exp_()  # [batch, chunk, d_inner, d_state], each in (0, 1]
            given = (dt[:, part] * u[:, part])[..., None] * b[:, part, None, :]
            if h is not None:  # the state before the chunk enters through its first position
                given[:, 0].addcmul_(decay[:, 0], h)
            states = linear_scan(decay, given)
            readouts.append((states @ c[:, part, :, None]).squeeze(-1))
            h = states[:, -1]
        return torch.cat(readouts, dim=1), states[:, -1].clone()  # its own storage, not the chunk's states
