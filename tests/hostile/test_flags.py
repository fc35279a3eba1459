"""Class 11: what the command line gives. Every numeric flag has bounds, says them in its help and refuses what
lies outside with a usage error (exit 2, never an overflow deep in torch); the older doors (empty sentences, a
user tokenizer that fails) end in clean messages."""

from __future__ import annotations

import sys

import pytest
import typer
from harness import TRANSFORMER, assert_clean, bounded, tiny_spec

from blockgraph import cli

pytest_plugins = ("harness",)

BEYOND_64_BITS = str(2**70)
NUMBERS = (int, float, int | None, float | None)


def _options():
    """(command, option) for every numeric option of every command."""
    found = []

    def walk(command, name: str) -> None:
        for child, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{name} {child}".strip())
        for param in getattr(command, "params", []):
            if getattr(getattr(param, "type_descriptor", None), "annotation", None) in NUMBERS:
                found.append((name, param))

    walk(typer.main.get_command(cli.app), "")
    return found


def test_every_numeric_flag_has_both_bounds_and_shows_them():
    options = _options()
    assert len(options) > 25  # train's, translate's, generate's, inspect's: the walk found them
    unbounded = [f"{command} {param.opts[0]}" for command, param in options if param.min is None or param.max is None]
    assert not unbounded, unbounded
    help_text = bounded("help-bounds", "generate", "--help").output
    assert "0<=x<=4294967295" in help_text.replace(" ", "")


@pytest.mark.parametrize(
    ("args", "flag", "says"),
    [
        (("generate", "RUN", "1 2", "--seed", BEYOND_64_BITS), "--seed", "less than or equal to 4294967295"),
        (("train", TRANSFORMER, "--task", "copy", "--seed", BEYOND_64_BITS), "--seed", "less than or equal"),
        (("train", TRANSFORMER, "--task", "copy", "--seed", "-1"), "--seed", "greater than or equal to 0"),
        (("train", TRANSFORMER, "--task", "copy", "--lr", "inf"), "--lr", "less than or equal to 100"),
        (("train", TRANSFORMER, "--task", "copy", "--epochs", BEYOND_64_BITS), "--epochs", "less than or equal"),
        (("translate", "RUN", "1 2", "--beam", BEYOND_64_BITS), "--beam", "less than or equal to 1024"),
        (("translate", "RUN", "1 2", "--batch-size", BEYOND_64_BITS), "--batch-size", "less than or equal"),
        (("translate", "RUN", "1 2", "--max-len", BEYOND_64_BITS), "--max-len", "less than or equal to 100000"),
        (("translate", "RUN", "1 2", "--alpha", "nan"), "--alpha", "less than or equal to 10"),
        (("generate", "RUN", "1 2", "--temperature", "1e400"), "--temperature", "less than or equal to 100"),
        (("generate", "RUN", "1 2", "--top-k", BEYOND_64_BITS), "--top-k", "less than or equal"),
        (("inspect", "SPEC", "--ranks", BEYOND_64_BITS), "--ranks", "less than or equal to 65536"),
    ],
)
def test_a_number_beyond_a_flags_bounds_is_a_usage_error(run_dir, tmp_path, args, flag, says):
    spec = tiny_spec(tmp_path)
    args = tuple({"RUN": run_dir, "SPEC": spec}.get(a, a) if isinstance(a, str) else a for a in args)
    outcome = bounded(f"flag{flag}", *args)
    assert_clean(outcome, 2, f"Invalid value for '{flag}'", says)


@pytest.mark.parametrize(
    ("content", "lines"),
    [("", 0), ("\n", 1), ("\n\n\n", 3), ("1 2\n\n3 4\n", 3), ("   \n", 1)],
)
def test_translating_empty_files_and_empty_lines(run_dir, tmp_path, content, lines):
    sentences = tmp_path / "in.txt"
    sentences.write_text(content, encoding="utf-8")
    outcome = bounded("translate-empty-lines", "translate", run_dir, "--file", sentences)
    assert_clean(outcome, 0)
    assert len(outcome.stdout.splitlines()) == lines
    assert_clean(bounded("translate-empty-argument", "translate", run_dir, ""), 0)


@pytest.fixture
def failing_tokenizer(tmp_path, monkeypatch):
    folder = tmp_path / "pythonpath"
    folder.mkdir()
    (folder / "badtok.py").write_text("def split(text):\n    raise ValueError('no tokens today')\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(folder))
    yield "badtok:split"
    sys.modules.pop("badtok", None)


def test_a_user_tokenizer_that_raises_is_named_not_traced(run_dir, failing_tokenizer):
    outcome = bounded("user-tokenizer-raises", "translate", run_dir, "1 2", "--tokenizer", failing_tokenizer)
    assert_clean(outcome, 1, "tokenizer 'badtok:split' failed: ValueError", "it is your code")
    pairs = run_dir.parent / "pairs.tsv"
    pairs.write_text("a b\tb a\n" * 20, encoding="utf-8")
    train = bounded("user-tokenizer-raises-train", "train", TRANSFORMER, "--data", pairs, "--tokenizer",
                    failing_tokenizer, "--max-steps", "1", "--out", run_dir.parent / "new", "--quiet")  # fmt: skip
    assert_clean(train, 1, "tokenizer 'badtok:split' failed: ValueError")
