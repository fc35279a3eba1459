"""Text that came from files or users, made safe to show: no control characters reach a terminal raw.

A name, path or file excerpt can hold escape sequences (`\\x1b[2J` clears a screen, `\\x1b]52;...` writes to the
clipboard). Everything blockgraph prints passes through `clean` (Rich output through the console's render hook,
plain output through `cli.write_plain`); JSON output escapes the same characters its own way with `clean_json`.
"""

from __future__ import annotations

import re

# C0 controls except tab and newline, DEL, and the C1 controls (U+0080-U+009F: U+009B is a one-byte CSI)
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean(text: str) -> str:
    """`text` with each control character written out as `\\xNN`, so that it shows instead of acting."""
    return _UNSAFE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def clean_json(text: str) -> str:
    """JSON text with the control characters `json.dumps` leaves raw (DEL, C1) escaped as `\\u00NN`.

    Outside strings JSON has only printable ASCII, so the result is the same JSON value.
    """
    return _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def excerpt(text: str, limit: int = 40) -> str:
    """A short quoted piece of `text` for a message: cleaned, and cut at `limit` characters."""
    short = text if len(text) <= limit else text[: limit - 1] + "…"
    return f"'{clean(short)}'"


def binary_size(n: int, *, trim: bool = False) -> str:
    """Bytes in binary units with two decimals (1536 → 1.50 KiB); `trim` drops them when zero (a limit: 2 MiB)."""
    for unit, size in (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            value = f"{n / size:.2f}"
            return f"{value.removesuffix('.00') if trim else value} {unit}"
    return f"{n} B"


def sizes_text(sizes: dict[str, int]) -> str:
    """{"batch": 2, "seq": 16} → batch=2, seq=16: the sizes a result was computed at, as --dim takes them."""
    return ", ".join(f"{name}={size}" for name, size in sizes.items())
