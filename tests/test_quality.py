"""Project hygiene that must hold on every commit: lint, formatting, and generated docs in sync with the code."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

from blockgraph.builder import blockdoc
from blockgraph.builder.schema import fields_markdown


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]], ids=["lint", "format"])
def test_ruff(args):
    ruff = shutil.which("ruff", path=str(ROOT / ".venv" / "bin")) or shutil.which("ruff")
    command = [ruff, *args] if ruff else [sys.executable, "-m", "ruff", *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_package_type_checks(tmp_path):
    """mypy over the installed namespace: a folder whose `blockgraph` is this checkout gives mypy the package name
    the repository's folders are installed under (pyproject.toml's [tool.mypy] holds the settings)."""
    (tmp_path / "blockgraph").symlink_to(ROOT, target_is_directory=True)
    command = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), "-p", "blockgraph"]
    command += ["--cache-dir", str(tmp_path / "cache")]
    result = subprocess.run(command, cwd=tmp_path, env={**os.environ, "MYPYPATH": str(tmp_path)}, capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


def test_block_reference_is_generated_from_the_registry():
    on_disk = (ROOT / "docs" / "blocks.md").read_text(encoding="utf-8")
    assert on_disk == blockdoc.markdown_reference(), "run `blockgraph blocks --markdown > docs/blocks.md`"


def test_spec_reference_is_generated_from_the_models():
    text = (ROOT / "docs" / "spec.md").read_text(encoding="utf-8")
    generated = text.split("<!-- generated: spec keys -->\n", 1)[1].split("<!-- end generated -->", 1)[0]
    assert generated == fields_markdown(), "regenerate the section with `blockgraph schema --markdown`"


def test_the_architecture_page_shows_the_generated_forward():
    from blockgraph import builder

    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    shown = text.split("<!-- generated: tiny_encoder forward -->\n```python\n", 1)[1].split("```\n<!-- end", 1)[0]
    assert shown == builder.build(ROOT / "specs" / "tiny_encoder.yaml", device="meta").code
