"""What `inspect` (and `build`, `validate --resolved`) shows, one module per job.

- numbers: counts, FLOPs and bytes as text;
- units: the graph folded into items below a depth, with their numbers summed;
- tables: Rich renderings (the build summary, the tree, the table, the totals);
- as_json: the JSON format of `inspect` and the resolved spec;
- drawings: Mermaid and Graphviz;
- layout, picture, html: the layered layout, drawn as SVG and PNG, and the interactive HTML page;
- state: the state_dict keys (`inspect --params`);
- fitted: a Rich table that never breaks a word on a narrow terminal.

`inspect_report` runs the analysis (builder.analysis) and hands its costs to the format asked for;
`params_report` lists the state_dict keys.
"""

from __future__ import annotations

import json

import torch
from rich.console import Group as RichGroup
from rich.console import RenderableType

from blockgraph.builder.analysis import analyse
from blockgraph.builder.model import GraphModel
from blockgraph.builder.shapes import TypedGraph
from blockgraph.builder.views.as_json import architecture_json
from blockgraph.builder.views.drawings import architecture_dot, architecture_mermaid
from blockgraph.builder.views.html import html_page
from blockgraph.builder.views.layout import initially_expanded, scene
from blockgraph.builder.views.numbers import bytes_text, flops_text
from blockgraph.builder.views.picture import png_picture, svg_picture
from blockgraph.builder.views.state import state_json, state_table
from blockgraph.builder.views.tables import architecture_table, architecture_tree, build_summary, inspect_totals
from blockgraph.builder.views.units import node_params
from blockgraph.common.errors import Problem, UsageError

__all__ = [
    "INSPECT_FORMATS",
    "architecture_dot",
    "architecture_json",
    "architecture_mermaid",
    "architecture_table",
    "architecture_tree",
    "build_summary",
    "bytes_text",
    "flops_text",
    "inspect_report",
    "inspect_totals",
    "node_params",
    "params_report",
]

INSPECT_FORMATS = ("tree", "table", "json", "mermaid", "dot", "html", "svg", "png")


def inspect_report(
    typed: TypedGraph,
    model: GraphModel,
    *,
    depth: int | None = None,
    fmt: str = "tree",
    dims: dict[str, int] | None = None,
    dtype: torch.dtype | None = None,
    per_rank: RenderableType | None = None,
) -> RenderableType | str | bytes:
    """Everything `blockgraph inspect` prints, for a (meta) model: a Rich renderable for tree and table, text
    (to print as is, without Rich markup or wrapping) for json, mermaid, dot, html and svg, PNG bytes for png.

    `dims` override the spec's `dims:`; `dtype` is the floating dtype memory is counted in (default float32);
    `per_rank` (the table of `--ranks`) goes into the HTML page's totals.
    """
    fmt = getattr(fmt, "value", fmt)
    if fmt not in INSPECT_FORMATS:
        raise ValueError(f"format {fmt!r}: use one of {', '.join(INSPECT_FORMATS)}")
    params = node_params(model)
    if fmt in ("mermaid", "dot"):
        draw = architecture_mermaid if fmt == "mermaid" else architecture_dot
        return draw(typed, params, depth)
    costs = analyse(typed, model, dims, dtype=dtype)
    if fmt == "json":
        return json.dumps(architecture_json(typed, params, costs), indent=2, ensure_ascii=False)
    if fmt in ("html", "svg", "png"):
        drawn = scene(typed, params, costs)
        opened = initially_expanded(drawn, depth)
        if fmt == "html":
            totals = [inspect_totals(typed, costs)] + ([per_rank] if per_rank is not None else [])
            return html_page(drawn, opened, totals)
        return svg_picture(drawn, opened) if fmt == "svg" else png_picture(drawn, opened)
    if fmt == "table":
        body: RenderableType = architecture_table(typed, params, depth, costs)
    else:
        body = architecture_tree(typed, params, depth, costs)
    return RichGroup(body, inspect_totals(typed, costs))


def params_report(typed: TypedGraph, fmt: str = "table") -> RenderableType | str:
    """What `blockgraph inspect --params` prints: every state_dict key with its shape and size, as a table (tree or
    table) or JSON; the model is built on meta, without allocating a weight."""
    fmt = getattr(fmt, "value", fmt)
    if fmt == "json":
        return json.dumps(state_json(typed), indent=2, ensure_ascii=False)
    if fmt not in ("tree", "table"):
        raise UsageError(Problem(f"--params lists keys: --format {fmt} draws the graph", hint="use table or json"))
    return state_table(typed)
