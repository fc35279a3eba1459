"""Class 4: every read is bounded. FIFOs, devices, sparse multi-gigabyte files and endless lines give a clean
error within seconds and a few megabytes, never a hang or an out-of-memory kill (the harness caps both)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from harness import assert_clean, bounded, tiny_spec

pytest_plugins = ("harness",)

GB5 = 5 << 30


def _special(path: Path, kind: str) -> Path:
    """A hostile file at `path`: a FIFO nobody writes, a link to /dev/zero, or a sparse 5 GiB file of zeros."""
    if path.exists() or path.is_symlink():
        path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "zero":
        path.symlink_to("/dev/zero")
    else:
        with path.open("wb") as handle:
            handle.truncate(GB5)
    return path


KINDS = ["fifo", "zero", "sparse"]
SAYS = {"fifo": "FIFO", "zero": "character device", "sparse": ""}


@pytest.mark.parametrize("kind", KINDS)
def test_spec_file(tmp_path, kind):
    spec = _special(tmp_path / "spec.yaml", kind)
    assert_clean(bounded(f"spec-{kind}", "validate", spec), 1, SAYS[kind] or "too large")


@pytest.mark.parametrize("kind", KINDS)
def test_extends(tmp_path, kind):
    _special(tmp_path / "base.yaml", kind)
    spec = tiny_spec(tmp_path, replace={"name: tiny": "name: tiny\nextends: base.yaml"})
    outcome = bounded(f"extends-{kind}", "validate", spec, "--allow-external-files")  # /dev/zero is outside
    assert_clean(outcome, 1, "extends:", SAYS[kind] or "too large")


@pytest.mark.parametrize("param", ["pretrained", "vocab_file"])
@pytest.mark.parametrize("kind", KINDS)
def test_spec_named_vectors_and_vocabularies(tmp_path, param, kind):
    (tmp_path / "vectors.txt").write_text("a 1 2 3 4 5 6 7 8\n", encoding="utf-8")
    _special(tmp_path / "file.txt", kind)
    params = ", pretrained: file.txt" if param == "pretrained" else ", pretrained: vectors.txt, vocab_file: file.txt"
    spec = tiny_spec(tmp_path, embed_params=params)
    outcome = bounded(f"{param}-{kind}", "build", spec, "--allow-external-files")
    assert_clean(outcome, 1, *([SAYS[kind]] if SAYS[kind] else ["line 1 of the", "is longer than"]))


@pytest.mark.parametrize("option", ["--data", "--valid"])
@pytest.mark.parametrize("kind", KINDS)
def test_training_data(tmp_path, option, kind):
    good = tmp_path / "good.tsv"
    good.write_text("a b\tc d\n" * 20, encoding="utf-8")
    bad = _special(tmp_path / "bad.tsv", kind)
    files = ["--data", bad] if option == "--data" else ["--data", good, "--valid", bad]
    spec = Path(__file__).resolve().parents[2] / "specs" / "transformer.yaml"
    outcome = bounded(f"data{option}-{kind}", "train", spec, *files, "--out", tmp_path / "run", "--set", "d_model=16",
                      "--set", "heads=2", "--quiet")  # fmt: skip
    assert_clean(outcome, 1, SAYS[kind] or "longer than 1 MiB")


@pytest.mark.parametrize("name", ["spec.yaml", "blockgraph.json", "model.safetensors"])
@pytest.mark.parametrize("kind", KINDS)
def test_saved_model_files(saved_model, tmp_path, name, kind):
    _special(saved_model / name, kind)
    outcome = bounded(f"saved-{name}-{kind}", "export", saved_model, "--format", "exported-program", "--out",
                      tmp_path / "m.pt2")  # fmt: skip
    if name == "blockgraph.json" and kind != "sparse":  # no manifest file: not a saved model, so not read as one
        assert_clean(outcome, 1, "holds no model", "blockgraph.json")
    else:
        assert_clean(outcome, 1, SAYS[kind] or ("corrupt" if name.endswith("safetensors") else "too large"))
    assert not (tmp_path / "m.pt2").exists()


@pytest.mark.parametrize("name", ["trainer.json", "vocab.json", "state.safetensors"])
@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_files(run_dir, name, kind):
    _special(run_dir / "checkpoint" / name, kind)
    outcome = bounded(f"checkpoint-{name}-{kind}", "translate", run_dir, "1 2")
    expected = SAYS[kind] or ("corrupt" if name.endswith("safetensors") else "too large")
    if name == "trainer.json" and kind != "sparse":
        expected = "holds no model"  # without a regular trainer.json the directory is no checkpoint
    assert_clean(outcome, 1, expected)


@pytest.mark.parametrize(
    ("header", "fragment"),
    [
        (struct.pack("<Q", 1 << 60), "truncated or not a safetensors file"),
        (struct.pack("<Q", 90 << 20) + b"{", "truncated or not a safetensors file"),
        (struct.pack("<Q", 12) + b"[[[[[[[[[[[[", "not valid JSON"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
        (b"\x01\x02", "truncated"),
    ],
)
def test_hostile_safetensors_headers(saved_model, tmp_path, header, fragment):
    (saved_model / "model.safetensors").write_bytes(header)
    outcome = bounded("safetensors-header", "export", saved_model, "--format", "exported-program", "--out",
                      tmp_path / "m.pt2")  # fmt: skip
    assert_clean(outcome, 1, fragment)


def test_deeply_nested_json(run_dir):
    (run_dir / "checkpoint" / "trainer.json").write_text("[" * 100_000 + "]" * 100_000)
    assert_clean(bounded("json-deep", "translate", run_dir, "1 2"), 1, "nested too deeply")


def test_a_huge_json_number(run_dir):
    path = run_dir / "checkpoint" / "trainer.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps(data).replace('"epoch": ', '"epoch": 1' + "0" * 5000 + ', "x": '))
    assert_clean(bounded("json-digits", "translate", run_dir, "1 2"), 1, "trainer.json")


def test_translate_reads_standard_input_line_by_line_and_bounded(run_dir):
    outcome = bounded("stdin-lines", "translate", run_dir, "-", stdin="1 2\n3 4\n")
    assert_clean(outcome, 0)
    assert len(outcome.stdout.splitlines()) == 2
    endless = "1 " * (1 << 20)  # 2 MiB on one line, no newline
    assert_clean(bounded("stdin-endless-line", "translate", run_dir, "-", stdin=endless), 1, "<stdin>:1", "longer")
    garbage = b"1 2\n\xff\xfe 3\n"
    assert_clean(bounded("stdin-not-utf8", "translate", run_dir, "-", stdin=garbage), 1, "<stdin>:2", "not UTF-8")
