"""Symbolic tensor types that flow through shape rules before any weight exists."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cache
from typing import Literal, TypeAlias

import sympy
import torch

Dim: TypeAlias = int | sympy.Expr
DtypeKind = Literal["float", "int", "bool", "any"]


@cache
def symbol(name: str) -> sympy.Symbol:
    """The one symbol for a named dimension such as `batch` or `src_len` (positive integer)."""
    return sympy.Symbol(name, integer=True, positive=True)


def as_dim(value: int | str | sympy.Expr) -> Dim:
    """A shape entry from a spec: ints stay ints, names become symbols."""
    if isinstance(value, str):
        return symbol(value)
    return value


def dims_equal(a: Dim, b: Dim) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if a == b:  # the same expression (sympy compares structurally): no subtraction, which is slow to import
        return True
    return sympy.expand(sympy.sympify(a) - sympy.sympify(b)) == 0


def format_dim(d: Dim | str) -> str:
    return str(d)


def format_shape(shape: Sequence[Dim | str]) -> str:
    """`[batch, seq, 512]`; a spec's shape may still name its dimensions as strings."""
    return "[" + ", ".join(format_dim(d) for d in shape) + "]"


def dtype_kind(dtype: torch.dtype) -> DtypeKind:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_floating_point or dtype.is_complex:
        return "float"
    return "int"


@dataclass(frozen=True)
class TensorType:
    """Shape (ints and symbols), dtype, and which node/port produced it (for error messages)."""

    shape: tuple[Dim, ...]
    dtype: torch.dtype = torch.float32
    source: str = ""

    @property
    def rank(self) -> int:
        return len(self.shape)

    def with_shape(self, *shape: Dim) -> TensorType:
        return replace(self, shape=tuple(shape))

    def with_last(self, size: Dim) -> TensorType:
        return replace(self, shape=(*self.shape[:-1], size))

    def __str__(self) -> str:
        return f"{format_shape(self.shape)} {str(self.dtype).removeprefix('torch.')}"

    def described(self) -> str:
        """`[batch, seq, 512] float32 from node 'emb'` — for messages that name both ends."""
        return f"{self} from {self.source!r}" if self.source else str(self)


@dataclass(frozen=True)
class Limit:
    """An upper bound a block's params put on a dimension of its input, e.g. the rows of a position table.

    `size` is the dimension as inferred: a number is checked at once, an expression of named dimensions
    (`seq`) whenever their sizes are known (`--dim`, a trial run, decoding).
    """

    size: Dim
    most: int
    what: str  # "the sequence length of x"
    param: str  # the param that sets the bound, e.g. "max_len"


class ShapeError(Exception):
    """Raised by a shape rule; the builder adds file, line and node."""

    def __init__(self, message: str, hint: str | None = None, at: tuple[str, ...] = ()):
        """`at` narrows the location inside the node, e.g. `("params", "d_model")` or `("in", "query")`."""
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.at = at


def expect_last(x: TensorType, size: int, param: str, port: str = "x") -> None:
    """Check the feature (last) dimension against a parameter, naming both."""
    if not dims_equal(x.shape[-1], size):
        raise ShapeError(
            f"input {port!r} has feature size {format_dim(x.shape[-1])} ({x.described()}), but {param} is {size}",
            hint=f"set {param}: {format_dim(x.shape[-1])} or change the producing node",
            at=("params", param),
        )


def expect_same_shape(a: TensorType, b: TensorType, names: tuple[str, str]) -> None:
    if a.rank != b.rank or not all(dims_equal(p, q) for p, q in zip(a.shape, b.shape, strict=True)):
        raise ShapeError(
            f"inputs {names[0]!r} and {names[1]!r} must have the same shape: {a.described()} vs {b.described()}"
        )
