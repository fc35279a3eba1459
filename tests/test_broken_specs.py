"""Every spec in tests/broken/ holds one mistake; the CLI must report it cleanly, located, without a traceback.

Each file starts with comments: `# expect: FRAGMENT` (one or more, all must appear in the message),
`# hint: FRAGMENT` (optional) and `# line: N` (the line the message must point at).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

BROKEN = sorted((Path(__file__).parent / "broken").glob("*.*"))


def expectations(path: Path) -> tuple[list[str], int | None]:
    fragments, line = [], None
    for text in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if m := re.match(r"#\s*(expect|hint):\s*(.+)", text):
            fragments.append(m.group(2).strip())
        elif m := re.match(r"#\s*line:\s*(\d+)", text):
            line = int(m.group(1))
    return fragments, line


def test_the_corpus_is_there():
    assert len(BROKEN) >= 12


@pytest.mark.parametrize("path", BROKEN, ids=[p.name for p in BROKEN])
def test_broken_spec_gets_a_located_message(path: Path, run_cli):
    fragments, line = expectations(path)
    assert fragments, f"{path.name} declares no `# expect:` fragment"
    result = run_cli("validate", path)
    message = " ".join(result.stderr.split())
    assert result.code == 1, result.stdout + result.stderr
    assert result.exception is None
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    if line is not None:
        assert re.search(rf"{re.escape(path.name)}:{line}(:\d+)? ", message), f"line {line} not in: {message}"
