"""FLOP formulas shared by blocks' `flops` rules: torch's convention, matrix multiplications only.

2 FLOPs per multiply-accumulate (so a Linear is 2·tokens·in·out and attention 4·batch·q_len·k_len·d_model); the
element-wise work of norms, softmax, activations, residual adds and biases is not counted, as torch's
`FlopCounterMode` does not count it. Sizes are ints or sympy expressions of the named dimensions.
"""

from __future__ import annotations

import math
from typing import Any

Shape = tuple[Any, ...]


def tokens(shape: Shape) -> Any:
    """Rows of a position-wise op: every dimension but the last."""
    return math.prod(shape[:-1])


def linear(rows: Any, d_in: Any, d_out: Any) -> Any:
    """y = x Wᵀ over `rows` rows: 2·rows·d_in·d_out."""
    return 2 * rows * d_in * d_out


def multi_head(
    d_model: Any,
    query: Shape,
    key: Shape | None = None,
    value: Shape | None = None,
    *,
    heads_width: Any = None,
    kv_width: Any = None,
) -> Any:
    """W_Q, W_O on the queries, W_K, W_V on the keys/values, then QKᵀ and AV over all heads.

    `heads_width` is heads·head_dim (default d_model), `kv_width` kv_heads·head_dim (default heads_width).
    """
    key = key or query
    heads_width = d_model if heads_width is None else heads_width
    kv_width = heads_width if kv_width is None else kv_width
    batch, q_len, k_len = query[0], query[1], key[1]
    projections = 2 * linear(batch * q_len, d_model, heads_width) + 2 * linear(batch * k_len, d_model, kv_width)
    return projections + 4 * batch * q_len * k_len * heads_width


@classmethod  # type: ignore[misc]
def no_flops(cls: type, params: Any, inputs: dict, outputs: tuple) -> int:
    """No matrix multiplication: 0 (torch's counter counts none). A block says `flops = no_flops`."""
    return 0
