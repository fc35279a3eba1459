"""Block documentation generated from the registry: `blockgraph blocks show` and docs/blocks.md."""

from __future__ import annotations

import inspect
import typing
from typing import Any

import yaml
from pydantic_core import PydanticUndefined
from rich.console import Group, RenderableType
from rich.markdown import Markdown
from rich.markup import escape
from rich.syntax import Syntax
from rich.table import Table

from blocks import REGISTRY, BlockEntry
from blocks.registry import UnknownBlockError
from common.errors import Problem, UsageError


def lookup(name: str) -> BlockEntry:
    try:
        return REGISTRY.get(name)
    except UnknownBlockError as exc:
        hint = (
            f"did you mean {' or '.join(map(repr, exc.suggestions))}?" if exc.suggestions else "run `blockgraph blocks`"
        )
        raise UsageError(Problem(f"unknown block {name!r}", hint=hint)) from exc


def param_rows(entry: BlockEntry) -> list[tuple[str, str, str, str]]:
    """(name, type, default, description with constraints) for each parameter."""
    rows = []
    for name, field in entry.cls.Params.model_fields.items():
        annotation = field.annotation
        choices = typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else ()
        type_name = (
            " | ".join(map(str, choices))
            if choices
            else getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
        )
        default = (
            "required" if field.default is PydanticUndefined and field.default_factory is None else repr(field.default)
        )
        constraints = ", ".join(_constraint(m) for m in field.metadata if _constraint(m))
        description = field.description or ""
        rows.append((name, type_name, default, f"{description} ({constraints})" if constraints else description))
    return rows


def _constraint(meta: Any) -> str:
    for attr, symbol in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤")):
        value = getattr(meta, attr, None)
        if value is not None:
            return f"{symbol} {value}"
    return ""


def example_snippet(entry: BlockEntry) -> str:
    node: dict[str, Any] = {"type": entry.name}
    if entry.cls.example:
        node["params"] = dict(entry.cls.example)
    ports = entry.cls.in_ports
    node["in"] = ports[0].name if len(ports) == 1 else {p.name: f"<{p.name}>" for p in ports if not p.optional}
    return yaml.safe_dump({"nodes": {"my_" + entry.name: node}}, sort_keys=False, allow_unicode=True)


def render_block(entry: BlockEntry) -> RenderableType:
    params = Table(title="parameters", header_style="bold", title_justify="left")
    for column in ("name", "type", "default", "description"):
        params.add_column(column)
    for row in param_rows(entry):
        params.add_row(*map(escape, row))
    ports = Table(title="ports", header_style="bold", title_justify="left")
    for column in ("direction", "name", "accepts", "doc"):
        ports.add_column(column)
    for direction, group in (("in", entry.cls.in_ports), ("out", entry.cls.out_ports)):
        for port in group:
            ports.add_row(direction, port.name, port.describe() if direction == "in" else "", escape(port.doc))
    shape_rule = inspect.getdoc(entry.cls.infer) or "output has the shape of the first input"
    return Group(
        Markdown(f"# {entry.name}\n\n{entry.doc}\n\nfamily: **{entry.family}**, source: **{entry.source}**"),
        params,
        ports,
        Markdown(f"**shape rule:** {shape_rule}"),
        Syntax(example_snippet(entry), "yaml", theme="ansi_dark"),
    )


def markdown_reference() -> str:
    """The built-in block reference as Markdown, generated from the registry (docs/blocks.md)."""
    lines = ["# Block reference", "", "Generated from the registry by `blockgraph blocks --markdown`; do not edit.", ""]
    for entry in (e for e in REGISTRY.list() if e.source == "built-in"):
        lines += [f"## `{entry.name}`", "", entry.doc, "", f"Family: {entry.family}. Source: {entry.source}.", ""]
        lines += ["| parameter | type | default | description |", "|---|---|---|---|"]
        lines += [f"| `{n}` | {_cell(t)} | {_cell(d)} | {_cell(desc)} |" for n, t, d, desc in param_rows(entry)]
        lines += ["", "| port | direction | accepts | doc |", "|---|---|---|---|"]
        lines += [f"| `{p.name}` | in | {p.describe()} | {_cell(p.doc)} |" for p in entry.cls.in_ports]
        lines += [f"| `{p.name}` | out | | {_cell(p.doc)} |" for p in entry.cls.out_ports]
        lines += ["", "```yaml", example_snippet(entry).rstrip(), "```", ""]
    return "\n".join(lines)


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")
