"""Values written on the command line that more than one layer reads: `NAME=VALUE` pairs (`--set`, `--dim`)."""

from __future__ import annotations

from typing import Any

import yaml

from blockgraph.common.errors import Problem, UsageError

#: the help of options that `train` (trainer.config) and the other commands (cli) both take
SET_HELP = "Override a spec variable: --set d_model=256 (repeatable)."
EXTERNAL_FILES_HELP = (
    "Let the spec name files outside its own folder (absolute paths, ..) in extends: and block params such as "
    "pretrained: (docs/security.md)."
)


def parse_pairs(values: list[str], option: str, *, typed: bool) -> dict[str, Any]:
    """`["d_model=256", "heads=4"]` → `{"d_model": 256, "heads": 4}` (values parsed as YAML scalars when typed)."""
    pairs: dict[str, Any] = {}
    for item in values:
        name, sep, raw = item.partition("=")
        if not sep or not name.strip():
            raise UsageError(Problem(f"{option}: expected NAME=VALUE, got {item!r}", hint=f"{option} d_model=256"))
        try:
            value = yaml.safe_load(raw) if typed else raw
        except yaml.YAMLError as exc:
            raise UsageError(Problem(f"{option}: cannot parse the value of {item!r}")) from exc
        pairs[name.strip()] = value
    return pairs
