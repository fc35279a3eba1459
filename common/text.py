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
