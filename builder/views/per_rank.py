"""`inspect --ranks N --strategy ddp|fsdp`: what each process would hold training the model (builder.sharding)."""

from __future__ import annotations

from typing import Any

from rich.table import Table
from torch import nn

from blockgraph.builder.sharding import RankMemory, Strategy, per_rank
from blockgraph.builder.views.numbers import bytes_text


def ranks_table(model: nn.Module, ranks: int, strategy: Strategy, compute_bytes: int) -> Table:
    """The chosen strategy's per-process memory beside the other one's, so the choice can be made here."""
    chosen = per_rank(model, ranks, strategy, compute_bytes=compute_bytes)
    other = per_rank(model, ranks, "ddp" if strategy == "fsdp" else "fsdp", compute_bytes=compute_bytes)
    table = Table(
        title=f"per process, {ranks} process{'es' if ranks > 1 else ''} (Adam, float32; activations aside)",
        header_style="bold",
        title_justify="left",
    )
    table.add_column("strategy")
    for column in ("parameters", "gradients", "Adam state", "gathered", "total"):
        table.add_column(column, justify="right")
    for memory in (chosen, other):
        table.add_row(
            f"[bold]{memory.strategy}[/]" if memory is chosen else memory.strategy,
            *(bytes_text(n) for n in _row(memory)),
        )
    return table


def ranks_json(model: nn.Module, ranks: int, strategy: Strategy, compute_bytes: int) -> dict[str, Any]:
    memory = per_rank(model, ranks, strategy, compute_bytes=compute_bytes)
    names = ("parameters", "gradients", "optimizer", "gathered", "total")
    return {
        "strategy": strategy,
        "ranks": ranks,
        **{f"{name}_bytes": n for name, n in zip(names, _row(memory), strict=True)},
    }


def _row(memory: RankMemory) -> tuple[int, int, int, int, int]:
    return memory.parameters, memory.gradients, memory.optimizer, memory.gathered, memory.total
