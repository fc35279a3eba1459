"""Numbers as `inspect` and `build` print them: counts (1.23M), FLOPs (734.80T), bytes (1.50 KiB)."""

from __future__ import annotations

from blockgraph.common.text import binary_size


def _scaled(n: int, units: tuple[tuple[str, float], ...]) -> str:
    for unit, size in units:
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def count(n: int) -> str:
    """1234567 → 1.23M (parameters: B for billions)."""
    return _scaled(n, (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)))


def flops_text(n: int | None) -> str:
    """734804261732352 → 734.80T; None → –."""
    units = (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3))
    return "–" if n is None else _scaled(n, units)


def bytes_text(n: int | None) -> str:
    """Binary units: 1536 → 1.50 KiB; None → –."""
    return "–" if n is None else binary_size(n)


def plural(n: int, noun: str) -> str:
    """1 → "1 block", 3 → "3 blocks" (the count with thousands separators)."""
    return f"{n:,} {noun}" + ("" if n == 1 else "s")
