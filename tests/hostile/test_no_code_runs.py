"""Class 1: no file makes blockgraph import or run code. Only what the user names in this invocation is imported.

Each case points a checkpoint, a saved model or a spec at `evilmod` (a module whose import leaves a marker file)
or at `os:system`, and checks that the marker never appears and the module is never imported.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from harness import assert_clean, bounded

pytest_plugins = ("harness",)  # its fixtures: a trained run, a saved model, the canary module

VOCAB = Path("checkpoint") / "vocab.json"
TRAINER = Path("checkpoint") / "trainer.json"


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def _never_ran(marker: Path) -> None:
    assert not marker.exists(), "the module named by a file was imported"
    assert "evilmod" not in sys.modules


@pytest.mark.parametrize("side", ["src", "tgt"])
@pytest.mark.parametrize("name", ["evilmod:run", "os:system", "evilmod.sub:run.call"])
def test_translate_never_imports_a_tokenizer_named_by_a_checkpoint(run_dir, canary, side, name):
    _edit(run_dir / VOCAB, lambda d: d[side].__setitem__("tokenizer", name))
    outcome = bounded(f"translate-{side}-{name}", "translate", run_dir, "1 2 3")
    assert_clean(outcome, 1, "user tokenizer", f"--tokenizer {name}")
    _never_ran(canary)


def test_resume_never_imports_a_tokenizer_named_by_a_checkpoint(run_dir, canary):
    _edit(run_dir / VOCAB, lambda d: d["tgt"].__setitem__("tokenizer", "evilmod:run"))
    outcome = bounded("resume-vocab-tokenizer", "train", "--resume", run_dir, "--max-steps", "3", "--quiet")
    assert_clean(outcome, 1, "--tokenizer evilmod:run")
    _never_ran(canary)


def test_resume_ignores_the_tokenizer_names_of_the_saved_options(run_dir, canary):
    """trainer.json's options name tokenizers too; the data is read with the vocabularies' own."""

    def poison(data):
        data["config"]["src_tokenizer"] = data["config"]["tgt_tokenizer"] = "evilmod:run"

    _edit(run_dir / TRAINER, poison)
    outcome = bounded("resume-config-tokenizer", "train", "--resume", run_dir, "--max-steps", "3", "--quiet")
    assert_clean(outcome, 0)
    _never_ran(canary)


def test_a_tokenizer_named_again_on_the_command_line_is_used(run_dir, canary):
    """The one way a checkpoint's user tokenizer runs: the user names it in this invocation."""
    _edit(run_dir / VOCAB, lambda d: [d[s].__setitem__("tokenizer", "evilmod:run") for s in ("src", "tgt")])
    outcome = bounded("translate-named-tokenizer", "translate", run_dir, "1 2 3", "--tokenizer", "evilmod:run")
    assert_clean(outcome, 0)
    assert canary.exists() and canary.with_suffix(".called").read_text() == "1 2 3"


def test_a_saved_models_plugin_list_is_not_imported(saved_model, canary, tmp_path):
    _edit(saved_model / "blockgraph.json", lambda d: d.__setitem__("plugins", ["evilmod", str(canary.parent)]))
    outcome = bounded("manifest-plugins", "export", saved_model, "--format", "exported-program", "--out",
                      tmp_path / "m.pt2")  # fmt: skip
    assert_clean(outcome, 0)
    _never_ran(canary)


def test_a_saved_spec_naming_an_unknown_block_imports_nothing(saved_model, canary, tmp_path):
    spec = saved_model / "spec.yaml"
    spec.write_text(spec.read_text().replace("type: generator", "type: evilmod"), encoding="utf-8")
    outcome = bounded("saved-spec-block", "export", saved_model, "--format", "exported-program", "--out",
                      tmp_path / "m.pt2")  # fmt: skip
    assert_clean(outcome, 1, "unknown block type 'evilmod'", "cannot rebuild the saved spec")
    _never_ran(canary)


@pytest.mark.parametrize(
    "tag",
    [
        "!!python/object/apply:os.system ['touch MARK']",
        "!!python/name:evilmod.run",
        "!!python/module:evilmod",
        "!!binary aGVsbG8=",
    ],
)
def test_yaml_tags_in_a_saved_spec_construct_nothing(saved_model, canary, tmp_path, tag):
    spec = saved_model / "spec.yaml"
    spec.write_text(f"{spec.read_text()}description: {tag}\n", encoding="utf-8")
    outcome = bounded("saved-spec-tag", "export", saved_model, "--format", "exported-program", "--out",
                      tmp_path / "m.pt2", env={"MARK": str(canary)})  # fmt: skip
    assert_clean(outcome, 1, "is not allowed")
    _never_ran(canary)
    assert not (Path.cwd() / "MARK").exists()
