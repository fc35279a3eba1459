"""Values written on the command line that more than one layer reads: `NAME=VALUE` pairs (`--set`, `--dim`)."""

from __future__ import annotations

from typing import Any

import typer
import yaml


def parse_pairs(values: list[str], option: str, *, typed: bool) -> dict[str, Any]:
    """`["d_model=256", "heads=4"]` → `{"d_model": 256, "heads": 4}` (values parsed as YAML scalars when typed)."""
    pairs: dict[str, Any] = {}
    for item in values:
        name, sep, raw = item.partition("=")
        if not sep or not name.strip():
            raise typer.BadParameter(f"expected NAME=VALUE, got {item!r}", param_hint=option)
        try:
            value = yaml.safe_load(raw) if typed else raw
        except yaml.YAMLError as exc:
            raise typer.BadParameter(f"cannot parse the value of {item!r}", param_hint=option) from exc
        pairs[name.strip()] = value
    return pairs
