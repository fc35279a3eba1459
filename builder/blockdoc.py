"""Block documentation generated from the registry: `blockgraph blocks show` and docs/blocks.md."""

from __future__ import annotations

import difflib
import inspect
import typing
from dataclasses import dataclass
from typing import Any

import torch
import yaml
from pydantic_core import PydanticUndefined
from rich.console import Group, RenderableType
from rich.markdown import Markdown
from rich.markup import escape
from rich.syntax import Syntax

from blockgraph.blocks import REGISTRY, Block, BlockEntry
from blockgraph.blocks.registry import UnknownBlockError, is_wildcard
from blockgraph.builder.views.fitted import FittedTable
from blockgraph.common.errors import Problem, UsageError


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


def list_table(pattern: str = "*") -> RenderableType:
    """`blockgraph blocks list PATTERN`: the matching blocks, or a UsageError that says how patterns match."""
    entries = REGISTRY.list(pattern)
    if not entries:
        raise UsageError(Problem(f"no block matches {pattern!r}", hint=_no_match_hint(pattern)))
    table = FittedTable(header_style="bold", groups=[["family", "source"], ["summary"]])
    for column in ("block", "family", "source", "summary"):  # a summary moves under the names rather than squeeze
        table.add_column(column, no_wrap=column in ("block", "family"), min_width=40 if column == "summary" else None)
    for entry in entries:
        table.add_row(f"[cyan]{entry.name}[/]", escape(entry.family), escape(entry.source), escape(entry.summary))
    return table


def _no_match_hint(pattern: str) -> str:
    """How patterns match, and the blocks whose name is close or whose documentation mentions the word."""
    hint = "a word matches the names and families holding it; wildcards match whole names or families, e.g. '*attn*'"
    if is_wildcard(pattern):
        return hint
    word = pattern.lower()
    close = difflib.get_close_matches(word, REGISTRY.names(), n=3, cutoff=0.6)
    mentions = [e.name for e in REGISTRY.list() if word in e.doc.lower() and e.name not in close]
    if close:
        hint += f"; did you mean {' or '.join(map(repr, close))}?"
    if mentions:
        hint += f"; {', '.join(mentions[:5])} mention {pattern!r} (blockgraph blocks show NAME)"
    return hint


@dataclass(frozen=True)
class StateKeys:
    """A block's state_dict keys (the names `tie:` takes, after the node's path) at its example params, and the
    buffers it does not save."""

    rows: list[tuple[str, str, str]]  # (key, shape, kind)
    at: str  # the params the shapes are for
    error: str | None = None  # why the block could not be built from them


def state_keys(entry: BlockEntry) -> StateKeys:
    """Each parameter and saved buffer of the block built from its example params, on meta (nothing allocated)."""
    example = dict(entry.cls.example or {})
    at = ", ".join(f"{k}={v}" for k, v in example.items()) or "the default params"
    try:
        with torch.device("meta"):
            module = entry.cls(entry.cls.Params(**example))
    except Exception as exc:  # no complete example (or a plugin's bug): the rest of the documentation still shows
        return StateKeys([], at, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip())
    parameters = dict(module.named_parameters(remove_duplicate=False))
    saved = module.state_dict(keep_vars=True)
    rows = []
    for name, tensor in saved.items():
        parameter = parameters.get(name)
        kind = "buffer" if parameter is None else "parameter" if parameter.requires_grad else "frozen parameter"
        rows.append((name, str(list(tensor.shape)), kind))
    unsaved = ((n, b) for n, b in module.named_buffers(remove_duplicate=False) if n not in saved)
    rows += [(name, str(list(tensor.shape)), "buffer, not saved") for name, tensor in unsaved]
    return StateKeys(rows, at)


def render_block(entry: BlockEntry) -> RenderableType:
    """`blockgraph blocks show NAME`; names and words are never cut on a narrow terminal (FittedTable)."""
    params = FittedTable(title="parameters", header_style="bold", title_justify="left")
    for column in ("name", "type", "default", "description"):
        params.add_column(column, no_wrap=column == "name")
    for row in param_rows(entry):
        params.add_row(*map(escape, row))
    ports = FittedTable(title="ports", header_style="bold", title_justify="left")
    for column in ("name", "direction", "accepts", "doc"):
        ports.add_column(column, no_wrap=column in ("name", "direction"))
    for direction, group in (("in", entry.cls.in_ports), ("out", entry.cls.out_ports)):
        for port in group:
            ports.add_row(port.name, direction, port.describe() if direction == "in" else "", escape(port.doc))
    # the class's own shape rule or an ancestor's, not the base's (whose docstring documents the API)
    own = inspect.getattr_static(entry.cls, "infer") is not inspect.getattr_static(Block, "infer")
    shape_rule = (inspect.getdoc(entry.cls.infer) if own else None) or "output has the shape of the first input"
    return Group(
        Markdown(f"# {entry.name}\n\n{entry.doc}\n\nfamily: **{entry.family}**, source: **{entry.source}**"),
        params,
        ports,
        _state_table(entry),
        Markdown(f"**shape rule:** {shape_rule}"),
        Syntax(example_snippet(entry), "yaml", theme="ansi_dark"),
    )


def _state_table(entry: BlockEntry) -> RenderableType:
    keys = state_keys(entry)
    if keys.error is not None:
        return Markdown(f"**parameters and buffers:** not listed: built from {keys.at} it fails ({keys.error})")
    if not keys.rows:
        return Markdown("**parameters and buffers:** none")
    table = FittedTable(header_style="bold")
    for column in ("key", "shape", "kind"):
        table.add_column(column, no_wrap=column == "key")
    for row in keys.rows:
        table.add_row(*map(escape, row))
    first = keys.rows[0][0]
    where = (
        f"**parameters and buffers** by state_dict key, after the node's path (`NODE.{first}`), shapes at {keys.at}:"
    )
    return Group(Markdown(where), table)


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
        lines += ["", *_state_markdown(entry), "```yaml", example_snippet(entry).rstrip(), "```", ""]
    return "\n".join(lines)


def _state_markdown(entry: BlockEntry) -> list[str]:
    keys = state_keys(entry)
    if keys.error is not None or not keys.rows:
        return ["Parameters and buffers: none.", ""] if keys.error is None else []
    lines = [f"Parameters and buffers by state_dict key (after the node's path; shapes at {_cell(keys.at)}):", ""]
    lines += ["| key | shape | kind |", "|---|---|---|"]
    lines += [f"| `{name}` | {shape} | {kind} |" for name, shape, kind in keys.rows]
    return [*lines, ""]


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")
