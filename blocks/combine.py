"""Small blocks that combine, reduce or cut tensors: concatenation of features, masked mean pooling, a pointwise
activation (for Luong's attentional state tanh(W_c[c_t; h_t]) and similar heads), and select / slice."""

from __future__ import annotations

from collections.abc import Mapping

import sympy
import torch
from pydantic import Field

from blockgraph.blocks.activations import ACTIVATIONS, ActivationName
from blockgraph.blocks.flops import no_flops
from blockgraph.blocks.registry import Block, BlockParams, Port, register
from blockgraph.blocks.stepping import Stepping, by_position
from blockgraph.blocks.types import Dim, ShapeError, TensorType, dims_equal, format_dim, format_shape


@register("concat", family="combine")
class Concat(Block):
    """Concatenate two to four tensors along the last (feature) dimension, as torch.cat(..., dim=-1).

    All inputs must have the same rank and agree on every dimension but the last, which adds up; e.g.
    Luong's [c_t; h_t] from an attention context [batch, tgt_len, d_memory] and decoder states
    [batch, tgt_len, d_query]. The output has the first input's dtype (inputs must share it).
    """

    in_ports = (
        Port("a", doc="[..., d_a]"),
        Port("b", doc="[..., d_b], same leading dimensions as a"),
        Port("c", optional=True, doc="[..., d_c], same leading dimensions as a"),
        Port("d", optional=True, doc="[..., d_d], same leading dimensions as a"),
    )
    out_ports = (Port("y", doc="[..., d_a + d_b (+ d_c + d_d)]"),)
    example = {}

    @classmethod
    def infer(
        cls, p: BlockParams, a: TensorType, b: TensorType, c: TensorType | None = None, d: TensorType | None = None
    ) -> TensorType:
        """[..., d_a], [..., d_b], … → [..., d_a + d_b + …]; all but the last dimension must agree."""
        parts = [(name, t) for name, t in (("a", a), ("b", b), ("c", c), ("d", d)) if t is not None]
        for name, t in parts[1:]:
            same = t.rank == a.rank and all(dims_equal(x, y) for x, y in zip(t.shape[:-1], a.shape[:-1], strict=True))
            if not same:
                raise ShapeError(
                    f"concat input {name!r} {t.described()} does not match 'a' {a.described()} on the leading "
                    f"dimensions {format_shape(a.shape[:-1])}",
                    hint="only the last (feature) dimension may differ",
                    at=("in", name),
                )
            if t.dtype != a.dtype:
                raise ShapeError(
                    f"concat input {name!r} is {t.described()}, but 'a' is {a.described()}", at=("in", name)
                )
        return a.with_last(sum((t.shape[-1] for _, t in parts[1:]), a.shape[-1]))

    flops = no_flops

    stepping = by_position

    def forward(
        self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None, d: torch.Tensor | None = None
    ) -> torch.Tensor:
        return torch.cat([t for t in (a, b, c, d) if t is not None], dim=-1)


@register("multiply", family="combine")
class Multiply(Block):
    """Elementwise product of two to four tensors, y = a ⊙ b (⊙ c ⊙ d), broadcasting as torch does: a gate.

    E.g. SwiGLU written out, silu(W₁x) ⊙ W₃x, or a sigmoid gate [batch, seq, 1] scaling [batch, seq, dim].
    Dimensions are matched from the last; each pair must be equal or one of them 1, and the output has the
    larger. Inputs share their dtype.
    """

    in_ports = (
        Port("a", doc="[...]"),
        Port("b", doc="[...], broadcasting against a"),
        Port("c", optional=True, doc="[...], broadcasting against a and b"),
        Port("d", optional=True, doc="[...], broadcasting against the others"),
    )
    out_ports = (Port("y", doc="the broadcast shape of the inputs"),)
    example = {}

    @classmethod
    def infer(
        cls, p: BlockParams, a: TensorType, b: TensorType, c: TensorType | None = None, d: TensorType | None = None
    ) -> TensorType:
        """Shapes broadcast as in torch (from the last dimension: equal, or one of them 1) → the broadcast shape."""
        shape = a.shape
        for name, t in (("b", b), ("c", c), ("d", d)):
            if t is None:
                continue
            if t.dtype != a.dtype:
                raise ShapeError(
                    f"multiply input {name!r} is {t.described()}, but 'a' is {a.described()}", at=("in", name)
                )
            merged = _broadcast(shape, t.shape)
            if merged is None:
                raise ShapeError(
                    f"multiply input {name!r} {t.described()} does not broadcast against {format_shape(shape)}",
                    hint="from the last dimension on, each pair of sizes must be equal or one of them 1",
                    at=("in", name),
                )
            shape = merged
        return a.with_shape(*shape)

    flops = no_flops

    stepping = by_position

    def forward(
        self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None, d: torch.Tensor | None = None
    ) -> torch.Tensor:
        y = a * b
        for t in (c, d):
            if t is not None:
                y = y * t
        return y


def _broadcast(x: tuple[Dim, ...], y: tuple[Dim, ...]) -> tuple[Dim, ...] | None:
    """The shape torch broadcasts x and y to, or None where two sizes differ and neither is 1."""
    out: list[Dim] = []
    for i in range(1, max(len(x), len(y)) + 1):
        m, n = x[-i] if i <= len(x) else 1, y[-i] if i <= len(y) else 1
        if dims_equal(m, 1):
            out.append(n)
        elif dims_equal(n, 1) or dims_equal(m, n):
            out.append(m)
        else:
            return None
    return tuple(reversed(out))


@register("mean_pool", family="combine")
class MeanPool(Block):
    """Average over the sequence: y = Σ_t x_t / T, counting only non-padding positions when `mask` is given.

    With mask (True = padding, as `key_padding_mask`), padded positions are left out of both the sum and
    the count, so padding never changes the result; a sequence that is all padding gives zeros (not NaN).
    """

    in_ports = (
        Port("x", rank=3, doc="[batch, seq, dim]"),
        Port("mask", rank=2, dtype="bool", optional=True, doc="[batch, seq], True = padding"),
    )
    out_ports = (Port("y", doc="[batch, dim]"),)
    example = {}

    @classmethod
    def infer(cls, p: BlockParams, x: TensorType, mask: TensorType | None = None) -> TensorType:
        """[batch, seq, dim] (mask [batch, seq]) → [batch, dim]."""
        if mask is not None and not (dims_equal(mask.shape[0], x.shape[0]) and dims_equal(mask.shape[1], x.shape[1])):
            raise ShapeError(
                f"mask {mask.described()} must be [batch, seq] = "
                f"[{format_dim(x.shape[0])}, {format_dim(x.shape[1])}] of x {x.described()}",
                hint="feed the padding mask of the tokens x was computed from",
                at=("in", "mask"),
            )
        return x.with_shape(x.shape[0], x.shape[2])

    flops = no_flops

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            return x.mean(1)
        keep = (~mask).unsqueeze(-1).to(x.dtype)
        return (x * keep).sum(1) / keep.sum(1).clamp_min(1.0)


@register("activation", family="combine")
class Activation(Block):
    """Apply a pointwise nonlinearity: y = f(x), f one of tanh, relu, gelu, gelu_tanh, silu, sigmoid.

    Follows a `linear` node to make a one-layer network, e.g. Luong's attentional hidden state
    h̃_t = tanh(W_c[c_t; h_t]) is concat → linear (bias: false) → activation (tanh).
    """

    class Params(BlockParams):
        function: ActivationName = Field(
            "tanh",
            description="the nonlinearity: tanh, relu, gelu (exact erf form), gelu_tanh (its tanh approximation, "
            "GPT-2's gelu_new), quick_gelu (CLIP's x·σ(1.702x)), silu (swish) or sigmoid",
        )

    in_ports = (Port("x", doc="[...]"),)
    out_ports = (Port("y", doc="f(x), same shape as x"),)
    example = {"function": "tanh"}

    def __init__(self, p: Params):
        super().__init__()
        self.function = p.function

    @classmethod
    def infer(cls, p: Params, x: TensorType) -> TensorType:
        """[...] → [...], the same shape."""
        return x

    flops = no_flops

    stepping = by_position

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ACTIVATIONS[self.function](x)

    def extra_repr(self) -> str:
        return self.function


def _axis(x: TensorType, dim: int, param: str = "dim") -> int:
    """A (possibly negative) dimension index of x, checked against its rank."""
    if not -x.rank <= dim < x.rank:
        raise ShapeError(f"{param} {dim} does not exist in {x.described()} (rank {x.rank})", at=("params", param))
    return dim % x.rank


@register("select", family="combine")
class Select(Block):
    """Pick one position along a dimension, removing it: y = x[:, index] for dim 1 (BERT's pooler reads [CLS]).

    A negative index counts from the end (-1: the last position).
    """

    class Params(BlockParams):
        dim: int = Field(1, description="the dimension to index (negative: from the last)")
        index: int = Field(0, description="the position along it (negative: from the end)")

    example = {"dim": 1, "index": 0}

    @classmethod
    def infer(cls, p: Params, x: TensorType) -> TensorType:
        """[..., n, ...] → [..., ...] without the selected dimension."""
        axis = _axis(x, p.dim)
        size = x.shape[axis]
        if isinstance(size, int) and not -size <= p.index < size:
            raise ShapeError(f"index {p.index} is outside {x.described()} along dim {p.dim}", at=("params", "index"))
        return x.with_shape(*x.shape[:axis], *x.shape[axis + 1 :])

    flops = no_flops

    def __init__(self, p: Params):
        super().__init__()
        self.dim, self.index = p.dim, p.index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.select(self.dim, self.index)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, index={self.index}"


@register("slice", family="combine")
class Slice(Block):
    """Keep a range of positions along a dimension: y = x[:, start:stop:step] for dim 1, as Python slices.

    Negative start or stop count from the end; stop null runs to the end.
    """

    class Params(BlockParams):
        dim: int = Field(1, description="the dimension to slice (negative: from the last)")
        start: int = Field(0, description="first position kept (negative: from the end)")
        stop: int | None = Field(None, description="first position not kept (null: the end; negative: from the end)")
        step: int = Field(1, gt=0, description="keep every step-th position")

    example = {"dim": 1, "start": 1}

    @classmethod
    def infer(cls, p: Params, x: TensorType) -> TensorType:
        """[..., n, ...] → [..., len(range(n)[start:stop:step]), ...]."""
        axis = _axis(x, p.dim)
        size = x.shape[axis]
        if isinstance(size, int):
            kept: Dim = len(range(size)[p.start : p.stop : p.step])
        else:  # a named size: the ends are counted from it; stop beyond it is caught on a trial run
            begin = p.start if p.start >= 0 else size + p.start
            end = size if p.stop is None else (p.stop if p.stop >= 0 else size + p.stop)
            kept = sympy.ceiling((end - begin) / p.step)
        if isinstance(kept, int) and kept <= 0:
            raise ShapeError(f"the slice keeps nothing of {x.described()} along dim {p.dim}", at=("params",))
        return x.with_shape(*x.shape[:axis], kept, *x.shape[axis + 1 :])

    flops = no_flops

    def __init__(self, p: Params):
        super().__init__()
        self.dim, self.range = p.dim, slice(p.start, p.stop, p.step)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[(slice(None),) * (self.dim % x.dim()) + (self.range,)]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, {self.range.start}:{self.range.stop}:{self.range.step}"


@register("transpose", family="combine")
class Transpose(Block):
    """Swap two dimensions: y = x.transpose(dim0, dim1); e.g. a convolution's [batch, channels, length] output
    into the [batch, length, channels] sequence the attention layers read (Whisper's encoder).

    Negative dims count from the last. Decoding steps it position by position when it leaves the batch and
    position dimensions (0 and 1) where they are.
    """

    class Params(BlockParams):
        dim0: int = Field(1, description="one dimension (negative: from the last)")
        dim1: int = Field(2, description="the dimension to swap it with (negative: from the last)")

    out_ports = (Port("y", doc="x with dimensions dim0 and dim1 swapped"),)
    example = {"dim0": 1, "dim1": 2}

    def __init__(self, p: Params):
        super().__init__()
        self.dim0, self.dim1 = p.dim0, p.dim1

    @classmethod
    def infer(cls, p: Params, x: TensorType) -> TensorType:
        """[…, a, …, b, …] → […, b, …, a, …]: the sizes at dim0 and dim1 swapped."""
        shape = list(x.shape)
        first, second = _axis(x, p.dim0, "dim0"), _axis(x, p.dim1, "dim1")
        shape[first], shape[second] = shape[second], shape[first]
        return x.with_shape(*shape)

    flops = no_flops

    @classmethod
    def stepping(cls, p: Params, ports: Mapping[str, bool]) -> Stepping | None:
        return "positions" if min(p.dim0, p.dim1) >= 2 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(self.dim0, self.dim1)

    def extra_repr(self) -> str:
        return f"dim0={self.dim0}, dim1={self.dim1}"
