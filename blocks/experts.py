"""Mixture of experts: a feed-forward whose tokens each go through a few of many SwiGLU experts, chosen by a router.

One block covers the routings of Mixtral, Qwen-MoE and DeepSeek-V3: softmax or sigmoid scores, top-k selection
(within the best groups of experts, with a bias that moves only the choice), the chosen scores renormalized or
not and scaled, shared experts every token goes through (gated or not). Each expert computes only the rows of
the tokens routed to it, gathered by expert and added back, so a token costs its top_k experts, not all of them.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from blockgraph.blocks.feedforward import FeedForward, FeedForwardParams
from blockgraph.blocks.flops import linear, tokens
from blockgraph.blocks.registry import Block, BlockParams, Port, register
from blockgraph.blocks.stepping import by_position
from blockgraph.blocks.types import ShapeError, TensorType, dims_equal, expect_last, format_shape


class MixtureOfExpertsParams(BlockParams):
    """The parameters of a `mixture_of_experts`: its sizes, and how its router chooses and weighs the experts."""

    d_model: int = Field(gt=0, description="input and output width")
    d_ff: int = Field(gt=0, description="hidden width of each expert (a SwiGLU)")
    experts: int = Field(gt=0, description="routed experts E")
    top_k: int = Field(gt=0, description="experts each token goes through")
    scoring: Literal["softmax", "sigmoid"] = Field(
        "softmax", description="the router's scores: softmax over the experts (Mixtral, Qwen) or sigmoid (DeepSeek-V3)"
    )
    normalize: bool = Field(
        True,
        description="divide the chosen scores by their sum (Mixtral, Qwen3-MoE, DeepSeek-V3; Qwen2-MoE does not)",
    )
    groups: int = Field(1, gt=0, description="groups of experts for group-limited routing (DeepSeek-V3's n_group)")
    groups_kept: int | None = Field(
        None,
        gt=0,
        description="groups a token may choose from, those with the highest sum of their two best scores "
        "(topk_group; default all)",
    )
    selection_bias: bool = Field(
        False,
        description="a per-expert bias added to the scores for choosing only, not to the weights "
        "(DeepSeek-V3's e_score_correction_bias: a saved buffer, not trained by gradient)",
    )
    scaling: float = Field(1.0, gt=0, description="factor on the routed experts' weights (routed_scaling_factor)")
    shared_d_ff: int | None = Field(
        None, gt=0, description="hidden width of a shared SwiGLU expert every token goes through (default none)"
    )
    shared_gate: bool = Field(
        False, description="scale the shared expert by sigmoid(x·w), w a Linear(d_model, 1) (Qwen2-MoE)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> MixtureOfExpertsParams:
        if self.top_k > self.experts:
            raise ValueError(f"top_k ({self.top_k}) must be at most experts ({self.experts})")
        if self.experts % self.groups:
            raise ValueError(f"experts ({self.experts}) must be divisible by groups ({self.groups})")
        if self.groups > 1 and self.experts // self.groups < 2:
            raise ValueError(
                f"a group's score is the sum of its two best experts: give each group at least 2 experts "
                f"(experts {self.experts}, groups {self.groups})"
            )
        kept = self.kept_groups
        if kept > self.groups:
            raise ValueError(f"groups_kept ({kept}) must be at most groups ({self.groups})")
        if self.top_k > kept * (self.experts // self.groups):
            raise ValueError(
                f"top_k ({self.top_k}) is more than the experts of {kept} kept group(s) "
                f"({kept * (self.experts // self.groups)}): raise groups_kept or lower top_k"
            )
        if self.shared_gate and self.shared_d_ff is None:
            raise ValueError("shared_gate gates the shared expert: give shared_d_ff too")
        return self

    @property
    def kept_groups(self) -> int:
        return self.groups if self.groups_kept is None else self.groups_kept

    def expert_params(self, width: int) -> FeedForwardParams:
        """A SwiGLU expert of hidden width `width`, as `swiglu` builds it."""
        return FeedForwardParams(d_model=self.d_model, d_ff=width, activation="silu", gated=True, bias=False)


class Router(nn.Module):
    """The router's weight [experts, d_model] and, with `selection_bias`, the bias added to the scores for choosing.

    A plain parameter, not an `nn.Linear`, so that int8 decoding (which swaps Linear layers) leaves the routing
    decisions in float; the bias is a buffer: saved and loaded, never given a gradient."""

    def __init__(self, p: MixtureOfExpertsParams):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(p.experts, p.d_model))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Linear's initialisation
        self.selection_bias: torch.Tensor | None
        if p.selection_bias:
            self.register_buffer("selection_bias", torch.zeros(p.experts))
        else:
            self.selection_bias = None


class Experts(nn.Module):
    """The routed experts, `0` … `E-1`, each a SwiGLU (`w_1` gate, `w_3` up, `w_2` down).

    A module of its own rather than an `nn.ModuleList`: the trainer's FSDP and the sharding count take a ModuleList
    for the copies of a repeated layer, and the experts belong to their layer's unit."""

    def __init__(self, p: MixtureOfExpertsParams):
        super().__init__()
        for j in range(p.experts):
            self.add_module(str(j), FeedForward(p.expert_params(p.d_ff)))

    def grouped(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Each expert on its run of `rows` (sorted by expert, `counts[j]` rows for expert j), in that order.

        While gradients are computed every expert runs, on no rows where none is routed to it, so that each one's
        parameters get a gradient on every process (FSDP reduces the same tensors everywhere)."""
        everyone = torch.is_grad_enabled()
        outputs, start = [], 0
        for expert, count in zip(self.children(), counts, strict=True):
            if count or everyone:
                outputs.append(expert(rows.narrow(0, start, count)))
            start += count
        return torch.cat(outputs) if outputs else rows.new_zeros(rows.shape)


@register("mixture_of_experts", family="feedforward")
class MixtureOfExperts(Block):
    """Mixture of SwiGLU experts: y = Σ_{i ∈ top_k(s)} g_i · E_i(x) (+ a shared expert), s the router's scores.

    The router scores every expert, s = softmax(W_r x) or sigmoid(W_r x) (in float32), and keeps the top_k; with
    `groups`, only among the `groups_kept` groups whose two best scores sum highest (DeepSeek-V3), and with
    `selection_bias` the choice ranks s + b while the weights stay s (b is loaded and saved as published;
    DeepSeek-V3 adjusts it between steps by a rule outside gradient descent, which training here leaves out, so b
    stays as it was). The weights g are the chosen scores,
    divided by their sum when `normalize` (softmax then top-k then renormalize equals a softmax over the top-k
    logits: Mixtral), times `scaling`. `shared_d_ff` adds a SwiGLU every token goes through, scaled by
    sigmoid(w·x) with `shared_gate` (Qwen2-MoE). Each expert runs only on the tokens routed to it.

    `aux` is the load-balancing loss of the Switch Transformer and Mixtral, E · Σ_i f_i · P_i: f_i the tokens
    routed to expert i per token (summing to top_k over the experts), P_i the mean of its probability (the
    softmax, or the sigmoid scores normalized to sum to 1), both over the positions that are not `pad`; the
    input `aux` (a running total of earlier layers) is added to it, so that a `repeat:` stack sums its layers'.
    Training adds it through the spec's declared losses (`roles: {loss: {aux: WEIGHT}}`); over several processes
    (DDP, FSDP) the counts and probabilities are summed over them first, so that the loss is the global batch's,
    as one process computes it. Decoding step by step routes each new position on its own and leaves `aux` out.

    State-dict keys follow the references one to one: `router.weight` [E, d_model] (the `gate`),
    `router.selection_bias` [E], `experts.{j}.w_1` / `w_3` / `w_2` (gate / up / down), `shared.w_1` / `w_3` /
    `w_2`, `shared_gate.weight` [1, d_model].
    """

    Params = MixtureOfExpertsParams
    in_ports = (
        Port("x", rank=(2, 3), doc="[..., d_model]"),
        Port("pad", rank=(1, 2), dtype="bool", optional=True, doc="[...] True where x is padding (left out of aux)"),
        Port("aux", rank=0, optional=True, summary=True, doc="[] the load-balancing loss of earlier layers"),
    )
    out_ports = (
        Port("y", doc="[..., d_model]"),
        Port("aux", summary=True, doc="[] float32: aux in plus this layer's load-balancing loss"),
    )
    example = {"d_model": 4096, "d_ff": 14336, "experts": 8, "top_k": 2}

    def __init__(self, p: MixtureOfExpertsParams):
        super().__init__()
        self.p = p
        self.router = Router(p)
        self.experts = Experts(p)
        self.shared = FeedForward(p.expert_params(p.shared_d_ff)) if p.shared_d_ff is not None else None
        self.shared_gate = nn.Linear(p.d_model, 1, bias=False) if p.shared_gate else None

    @classmethod
    def infer(
        cls, p: MixtureOfExpertsParams, x: TensorType, pad: TensorType | None, aux: TensorType | None
    ) -> tuple[TensorType, TensorType]:
        """[..., d_model] → [..., d_model] and a float32 scalar; pad is [...] (x's leading dimensions)."""
        expect_last(x, p.d_model, "d_model")
        if pad is not None:
            leading = x.shape[:-1]
            if len(pad.shape) != len(leading) or not all(
                dims_equal(a, b) for a, b in zip(pad.shape, leading, strict=True)
            ):
                raise ShapeError(
                    f"pad {pad.described()} must have x's leading dimensions {format_shape(leading)}",
                    hint="give the padding mask of the tokens x comes from",
                )
        return x, TensorType((), torch.float32)

    @classmethod
    def flops(cls, p: MixtureOfExpertsParams, inputs: dict, outputs: tuple) -> Any:
        """The work a token does: the router 2·d_model·E, top_k experts 6·d_model·d_ff each, the shared expert
        6·d_model·shared_d_ff and its gate 2·d_model; per token (all dimensions of x but the last)."""
        rows = tokens(inputs["x"].shape)
        total = linear(rows, p.d_model, p.experts) + 3 * p.top_k * linear(rows, p.d_model, p.d_ff)
        if p.shared_d_ff is not None:
            total += 3 * linear(rows, p.d_model, p.shared_d_ff)
        if p.shared_gate:
            total += linear(rows, p.d_model, 1)
        return total

    @classmethod
    def active_parameters(cls, p: MixtureOfExpertsParams, total: int) -> int:
        """A token reads the router, its top_k experts and the shared expert: all but E − top_k experts."""
        return total - (p.experts - p.top_k) * 3 * p.d_model * p.d_ff

    stepping = by_position

    def forward(
        self, x: torch.Tensor, pad: torch.Tensor | None = None, aux: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.reshape(-1, x.size(-1))
        scores = self.scores(flat)
        weights, chosen = self.route(scores)
        y = self.routed(flat, weights, chosen)
        if self.shared is not None:
            shared = self.shared(flat)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(flat)) * shared
            y = y + shared
        balance = self.balance(scores, chosen, pad)
        return y.reshape(x.shape), balance if aux is None else aux + balance

    def scores(self, flat: torch.Tensor) -> torch.Tensor:
        """The router's scores of every expert [tokens, E], in float32 as the references route."""
        logits = F.linear(flat.float(), self.router.weight.float())
        return logits.softmax(-1) if self.p.scoring == "softmax" else logits.sigmoid()

    def route(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The chosen experts [tokens, top_k] of each token and their weights (float32)."""
        p = self.p
        bias = self.router.selection_bias
        choice = scores if bias is None else scores + bias.float()
        if p.groups > 1:
            grouped = choice.view(-1, p.groups, p.experts // p.groups)
            best = grouped.topk(2, dim=-1)[0].sum(-1)  # [tokens, groups]: each group's two best scores
            kept = best.topk(p.kept_groups, dim=-1, sorted=False)[1]
            allowed = torch.zeros_like(best, dtype=torch.bool).scatter_(1, kept, True)
            choice = choice.masked_fill(~allowed.repeat_interleave(p.experts // p.groups, dim=1), float("-inf"))
        chosen = choice.topk(p.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, chosen)
        if p.normalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * p.scaling if p.scaling != 1.0 else weights, chosen

    def routed(self, flat: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Σ_i g_i · E_i(x) per token: the (token, expert) pairs sorted by expert, each expert on its run of rows,
        weighted and added back to their tokens."""
        pairs = chosen.reshape(-1)
        order = pairs.argsort(stable=True)
        rows = flat.index_select(0, order // self.p.top_k)
        out = self.experts.grouped(rows, self._counts(pairs)) * weights.reshape(-1, 1)[order]
        return torch.zeros_like(flat).index_add_(0, order // self.p.top_k, out.to(flat.dtype))

    def _counts(self, pairs: torch.Tensor) -> list[int]:
        """Rows routed to each expert. On `meta` there are no values: an even split, which has the same shapes
        and FLOPs as any routing (top_k rows per token in all)."""
        if pairs.device.type == "meta":
            n, e = pairs.numel(), self.p.experts
            return [n // e + (j < n % e) for j in range(e)]
        return torch.bincount(pairs, minlength=self.p.experts).tolist()

    def balance(self, scores: torch.Tensor, chosen: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        """E · Σ_i f_i · P_i over the positions that are not padding (Switch Transformer, Mixtral); while training
        over several processes, of the whole global batch (`_global`)."""
        p = self.p
        probs = scores if p.scoring == "softmax" else scores / scores.sum(-1, keepdim=True)
        keep = torch.ones_like(probs[:, 0]) if pad is None else (~pad).reshape(-1).to(probs.dtype)
        routed = torch.zeros_like(probs[0]).scatter_add_(0, chosen.reshape(-1), keep.repeat_interleave(p.top_k))
        summed, count = (probs * keep[:, None]).sum(0), keep.sum()
        if self.training and torch.is_grad_enabled() and routed.device.type != "meta" and _data_parallel():
            return self._global(routed, summed, count)
        count = count.clamp_min(1.0)
        return p.experts * ((routed / count) * (summed / count)).sum()

    def _global(self, routed: torch.Tensor, summed: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """The loss of the global batch on every process, one all-reduce of the counts and probability sums, so that
        training over N processes minimises what one process would (Qwen's global-batch balancing). Its value is
        the global one, its gradient N times this process's share, since data parallelism averages the gradients
        of the processes (DDP's all-reduce, FSDP's reduce-scatter)."""
        experts, processes = self.p.experts, dist.get_world_size()
        totals = torch.cat((routed, count[None], summed.detach()))
        dist.all_reduce(totals)
        fractions, total = totals[:experts] / totals[experts].clamp_min(1.0), totals[experts].clamp_min(1.0)
        value = experts * (fractions * totals[experts + 1 :] / total).sum()
        share = processes * experts * (fractions * summed / total).sum()
        return value + (share - share.detach())


def _data_parallel() -> bool:
    """Whether this process trains as one of several (a default process group is set up)."""
    return dist.is_available() and dist.is_initialized()
