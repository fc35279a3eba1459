"""`inspect --params`: every state_dict key of a model (the names `tie:` takes), with its shape and size.

The model is built on meta without its ties, so the listing also serves a spec whose `tie:` names a key that does
not exist: that is when one needs the list. Each tie is then shown on its target's row.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass

from rich.console import Group as RichGroup
from rich.console import RenderableType
from rich.text import Text

from blockgraph.builder.compile import compile_graph
from blockgraph.builder.shapes import TypedGraph
from blockgraph.builder.views.fitted import FittedTable
from blockgraph.builder.views.numbers import count, plural


@dataclass(frozen=True)
class StateEntry:
    """One parameter or buffer of the model, by its state_dict key."""

    name: str
    kind: str  # "parameter", "frozen parameter", "buffer", or "buffer, not saved" (not a state_dict key)
    shape: tuple[int, ...]
    dtype: str
    tied_to: str | None  # the key a `tie:` makes this one share
    tie_error: str | None = None  # why that tie cannot hold

    @property
    def count(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class StateListing:
    """The model's parameters and buffers, and the `tie:` targets that name no parameter."""

    name: str
    entries: list[StateEntry]
    unknown_ties: list[str]  # a message for each tie target that is no parameter


def state_listing(typed: TypedGraph) -> StateListing:
    """Every parameter and buffer of the model, in state_dict order (then buffers it does not save), built on meta
    without its ties, and each tie checked against the keys."""
    graph = typed.graph
    untied = dataclasses.replace(typed, graph=dataclasses.replace(graph, ties={}))
    model = compile_graph(untied, device="meta")
    parameters = dict(model.named_parameters(remove_duplicate=False))
    saved = model.state_dict(keep_vars=True)
    tensors = [(name, tensor, name in saved) for name, tensor in saved.items()]
    tensors += [(name, b, False) for name, b in model.named_buffers(remove_duplicate=False) if name not in saved]
    entries = []
    for name, tensor, is_key in tensors:
        parameter = parameters.get(name)
        if parameter is None:
            kind = "buffer" if is_key else "buffer, not saved"
        else:
            kind = "parameter" if parameter.requires_grad else "frozen parameter"
        source = graph.ties.get(name)
        error = None
        if source is not None and source not in parameters:
            error = f"{source} is no parameter" + _did_you_mean(source, [k for k in parameters if k != name])
        dtype = str(tensor.dtype).removeprefix("torch.")
        entries.append(StateEntry(name, kind, tuple(tensor.shape), dtype, source, error))
    unknown = [
        f"tie: {target} is no parameter{_did_you_mean(target, list(parameters))}"
        for target in graph.ties
        if target not in parameters
    ]
    return StateListing(graph.name, entries, unknown)


def _did_you_mean(name: str, keys: list[str]) -> str:
    close = difflib.get_close_matches(name, keys, n=2, cutoff=0.5)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def state_table(typed: TypedGraph) -> RenderableType:
    """The parameters and buffers as a table, and what they add up to (a tied key counted once, at its source)."""
    listing = state_listing(typed)
    table = FittedTable(title=Text(f"{listing.name}: state_dict"), header_style="bold", groups=[["shape", "count"]])
    for column in ("key", "shape", "count", "kind"):
        table.add_column(column, justify="right" if column == "count" else "left", no_wrap=column == "key")
    for e in listing.entries:
        kind = e.kind if e.tied_to is None else f"tie: = {e.tied_to}" if e.tie_error is None else f"tie: {e.tie_error}"
        table.add_row(Text(e.name), Text(str(list(e.shape))), Text(f"{e.count:,}"), Text(kind))
    own = [e for e in listing.entries if e.tied_to is None or e.tie_error is not None]
    parameters = sum(e.count for e in own if "parameter" in e.kind)
    buffers = sum(e.count for e in own if "buffer" in e.kind)
    keys = sum(1 for e in listing.entries if e.kind != "buffer, not saved")
    lines = [f"{plural(keys, 'key')}: {parameters:,} parameter values ({count(parameters)}), {buffers:,} buffer values"]
    tied = len(listing.entries) - len(own)
    if tied:
        lines[0] += f"; {plural(tied, 'tied parameter')} counted once, at the key it names"
    lines += listing.unknown_ties
    return RichGroup(table, *(Text(line, style="yellow" if line.startswith("tie:") else "") for line in lines))


def state_json(typed: TypedGraph) -> dict:
    """The parameters and buffers for other tools: `format` "blockgraph.params/1", one object per tensor."""
    listing = state_listing(typed)
    return {
        "format": "blockgraph.params/1",
        "name": listing.name,
        "keys": [
            {
                "name": e.name,
                "kind": e.kind,
                "shape": list(e.shape),
                "count": e.count,
                "dtype": e.dtype,
                "tied_to": e.tied_to,
                "tie_error": e.tie_error,
            }
            for e in listing.entries
        ],
        "unknown_ties": listing.unknown_ties,
    }
