"""The two consoles every command prints through, and plain output: no control character reaches a terminal raw.

Rich passes escape sequences in text through untouched, so each console carries a render hook that rewrites
the text of every segment with `common.text.clean` (Rich's own styling travels in segment styles, not text).
Machine-readable output (JSON, YAML, drawings, translations) bypasses Rich through `write_plain`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderHook, RenderResult
from rich.segment import Segment
from rich.text import Text

from blockgraph.common.errors import BlockgraphError, Problem
from blockgraph.common.text import clean, clean_json


class _Cleaned:
    """A renderable rendered as usual, each text segment cleaned of control characters."""

    def __init__(self, inner: RenderableType):
        self.inner = inner

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        for segment in console.render(self.inner, options):
            yield segment if segment.control else Segment(clean(segment.text), segment.style)


class _CleanHook(RenderHook):
    def process_renderables(self, renderables: list) -> list:
        return [_Cleaned(r) for r in renderables]


def problems_view(items: Iterable[Problem]) -> RenderableType:
    """Each problem as `file:line:col  path`, the message, and a hint, errors in red and warnings in yellow."""
    parts = []
    for p in items:
        colour = "red" if p.severity == "error" else "yellow"
        head = Text.assemble((f"{p.severity}: ", f"bold {colour}"), (p.message, "bold"))
        where = Text(f"  at {p.location}" if str(p.location) else " ", style="cyan")
        if p.node:
            where.append(f"  node {p.node}", style="magenta")
        parts += [head, where] if where.plain.strip() else [head]
        if p.hint:
            parts.append(Text(f"  hint: {p.hint}", style="green"))
    return Group(*parts)


def report(error: BlockgraphError) -> None:
    """Print every problem of `error` to stderr, then how many: the one way errors reach the user."""
    err.print(problems_view(error.problems))
    count = len(error.problems)
    err.print(f"[red]{count} error{'s' if count != 1 else ''}[/]")


def safe_console(*, stderr: bool = False) -> Console:
    """A Rich console whose output holds no control characters but its own styling."""
    console = Console(stderr=stderr, highlight=False)
    console.push_render_hook(_CleanHook())
    return console


out = safe_console()
err = safe_console(stderr=True)


def write_plain(text: str, *, json: bool = False) -> None:
    """Write `text` (with a final newline) to stdout as is, but cleaned: JSON keeps valid escapes."""
    text = clean_json(text) if json else clean(text)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
