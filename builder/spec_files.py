"""Files a spec names (`extends:`, and block params such as `pretrained:` and `vocab_file:`): where they may be.

A spec is something people download and share, so by default it may name files only in its own folder and the
folders below it: an absolute path, a `~` path, or a `..` (or a link) that leads out of that folder is refused
before the file is opened, so that `pretrained: /etc/passwd` or `extends: ../../etc/shadow` reads nothing.
`--allow-external-files` (`allow_external_files=True` in the API) lifts the rule for a spec the user trusts.
A spec given as a mapping in Python has the working directory as its folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from blockgraph.common.errors import Location, Problem, SpecError
from blockgraph.common.files import inside
from blockgraph.common.text import excerpt

HINT = (
    "a spec may name files in its own folder and below; pass --allow-external-files "
    "(allow_external_files=True in Python) if you trust it to read others"
)


@dataclass(frozen=True)
class FileAccess:
    """The folder a spec's files must stay in, unless external files are allowed."""

    root: Path
    external: bool = False

    def resolve(self, written: str, base: Path, where: Location, what: str) -> Path:
        """The path `written` in the spec, relative to `base` (the folder of the file that names it; the empty
        relative path for a spec given as a mapping, so that its paths stay relative to the working directory)."""
        path = Path(written).expanduser()
        full = base / path
        if self.external:
            return full
        if path.is_absolute():
            raise SpecError(Problem(f"{what} {excerpt(written, 80)} is an absolute path", where, hint=HINT))
        if not inside(full, self.root):
            raise SpecError(
                Problem(f"{what} {excerpt(written, 80)} leads outside the spec's folder {self.root}", where, hint=HINT)
            )
        return full
