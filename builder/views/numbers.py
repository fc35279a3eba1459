"""Numbers as `inspect` and `build` print them: counts (1.23M), FLOPs (734.80T), bytes (1.50 KiB), sizes."""

from __future__ import annotations


def count(n: int) -> str:
    """1234567 → 1.23M."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def flops_text(n: int | None) -> str:
    """734804261732352 → 734.80T; None → –."""
    if n is None:
        return "–"
    for unit, size in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def bytes_text(n: int | None) -> str:
    """Binary units: 1536 → 1.50 KiB; None → –."""
    if n is None:
        return "–"
    for unit, size in (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def sizes_text(dims: dict[str, int]) -> str:
    return ", ".join(f"{name}={size}" for name, size in dims.items())
