"""A Rich table that never breaks a word, at any terminal width (80 columns, a pipe).

Rich shrinks a table that is too wide column by column, down into the middle of words ("trainab le"). A
`FittedTable` instead gives each column at least its longest word (all of it for `no_wrap` columns) and, when the
columns cannot all fit side by side, deals them into several tables, one under the other, each repeating the first
column (the row's name) so that every row can still be read across.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.table import Column, Table
from rich.text import Text


class FittedTable(Table):
    """A `Table` whose columns after the first are dealt, in `groups` that stay together when they fit, into as many
    tables as the width needs; each column is as wide as its longest word at least."""

    def __init__(self, *headers: str | Column, groups: Sequence[Sequence[str]] = (), **settings: Any) -> None:
        super().__init__(*headers, **settings)
        self.groups = [list(g) for g in groups]  # column headers, e.g. [["block", "inputs"], ["params", "FLOPs"]]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if not self.columns:
            return
        spans = [self._span(console, options, column) for column in self.columns]
        parts = self._deal(spans, options.max_width)
        for n, indices in enumerate(parts):
            if n:
                yield ""
            widths = self._widths(indices, spans, options.max_width)
            yield self._part(indices, widths, first=n == 0, last=n == len(parts) - 1)

    def _span(self, console: Console, options: ConsoleOptions, column: Column) -> tuple[int, int]:
        """(narrowest, widest) content width of a column: its longest word (whole cells when `no_wrap`) or its
        `min_width` (a column of prose that would read a few words a line), its longest line."""
        narrowest = widest = 1
        for cell in (column.header, *column.cells):
            measured = Measurement.get(console, options, cell)
            narrowest = max(narrowest, measured.maximum if column.no_wrap else measured.minimum)
            widest = max(widest, measured.maximum)
        return max(narrowest, min(column.min_width or 0, widest)), widest  # prose below min_width moves instead

    def _overhead(self, columns: int) -> int:
        """Borders and padding of a table of `columns` columns."""
        _, right, _, left = self.padding
        padding = columns * (left + right) - (0 if self.pad_edge else left + right)
        borders = ((2 if self.show_edge else 0) + columns - 1) if self.box else 0
        return padding + borders

    def _fits(self, indices: list[int], spans: list[tuple[int, int]], width: int) -> bool:
        return sum(spans[i][0] for i in indices) + self._overhead(len(indices)) <= width

    def _deal(self, spans: list[tuple[int, int]], width: int) -> list[list[int]]:
        """Column indices of each table: the first column, then groups while they fit, column by column where a
        group alone is too wide."""
        index = {str(column.header): i for i, column in enumerate(self.columns)}
        grouped = {index[h] for g in self.groups for h in g}
        groups = [[index[h] for h in g] for g in self.groups] + [[i] for i in range(1, len(spans)) if i not in grouped]
        parts, current = [], [0]
        for group in groups:
            if self._fits(current + group, spans, width):
                current += group
                continue
            if len(current) > 1:
                parts.append(current)
                current = [0]
            for i in group:
                if len(current) > 1 and not self._fits([*current, i], spans, width):
                    parts.append(current)
                    current = [0]
                current.append(i)
        parts.append(current)
        return parts

    def _widths(self, indices: list[int], spans: list[tuple[int, int]], width: int) -> list[int]:
        """Each column at its widest, the widest narrowed first, none below its longest word."""
        widths = [spans[i][1] for i in indices]
        excess = sum(widths) + self._overhead(len(indices)) - width
        while excess > 0:
            slack = [k for k, i in enumerate(indices) if widths[k] > spans[i][0]]
            if not slack:
                break  # a single word wider than the terminal: Rich folds it, nothing else can
            widest = max(slack, key=lambda k: widths[k])
            widths[widest] -= 1
            excess -= 1
        return widths

    def _part(self, indices: list[int], widths: list[int], *, first: bool, last: bool) -> Table:
        """One of the tables: these columns at these widths, the title over the first, the caption under the last."""
        part = Table(
            title=self.title if first else None,
            caption=self.caption if last else None,
            box=self.box,
            show_header=self.show_header,
            show_edge=self.show_edge,
            header_style=self.header_style,
            padding=self.padding,
            pad_edge=self.pad_edge,
            title_justify=self.title_justify,
            title_style=self.title_style,
        )
        for i, width in zip(indices, widths, strict=True):
            column = self.columns[i]
            part.add_column(
                column.header,
                justify=column.justify,
                style=column.style,
                header_style=column.header_style,
                no_wrap=column.no_wrap,
                overflow="fold",
                width=width,
            )
        cells = [list(self.columns[i].cells) for i in indices]
        rows = [r for r in range(len(self.rows)) if r == 0 or not all(_blank(c[r]) for c in cells[1:])]
        for n, r in enumerate(rows):  # a row with nothing in these columns (a total of the numbers) is left out
            section = self.rows[r].end_section and n + 1 < len(rows)
            part.add_row(*(column[r] for column in cells), style=self.rows[r].style, end_section=section)
        return part


def _blank(cell: Any) -> bool:
    return isinstance(cell, str | Text) and not str(cell).strip()


class Flow:
    """Lines of pieces that break only between pieces: the shapes `[batch, seq, 64], [batch, seq]` of a table cell
    fold after a comma, never inside a shape. Each line starts a new line; its pieces fill the width."""

    def __init__(self, lines: Sequence[Sequence[str]], style: str = "") -> None:
        self.lines = [list(line) for line in lines if line]
        self.style = style

    def __str__(self) -> str:
        return "\n".join(" ".join(line) for line in self.lines)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        pieces = [piece for line in self.lines for piece in line]
        widest = max((len(line) for line in str(self).splitlines()), default=0)
        return Measurement(max((len(piece) for piece in pieces), default=0), widest)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        out: list[str] = []
        for line in self.lines:
            current = ""
            for piece in line:
                if current and len(current) + 1 + len(piece) > options.max_width:
                    out.append(current)
                    current = piece
                else:
                    current = f"{current} {piece}" if current else piece
            out.append(current)
        yield Text("\n".join(out), style=self.style)
