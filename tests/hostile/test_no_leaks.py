"""Class 2: messages never show what a file holds.

Files a spec reaches (`extends:`, `pretrained:`, `vocab_file:`) outside its own folder are refused before they
are opened; those inside it, and files the user passes directly, are reported by place (file, line, field) and
what was expected, never quoted. Every file here holds `SECRET`, and no output may contain it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from harness import SECRET, assert_clean, bounded, tiny_spec

pytest_plugins = ("harness",)  # its fixtures: a trained run, a saved model, the canary module

SECRET_LINES = f"{SECRET} 1 2\nroot:x:0:0:{SECRET}:/root:/bin/bash\n"


@pytest.fixture
def secret(tmp_path) -> Path:
    """A file outside the spec's folder (the spec lives in tmp_path/spec/)."""
    path = tmp_path / "secret.txt"
    path.write_text(SECRET_LINES, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("param", "value", "fragment"),
    [
        ("pretrained", "ABS", "is an absolute path"),
        ("pretrained", "../secret.txt", "leads outside the spec's folder"),
        ("pretrained", "sub/../../secret.txt", "leads outside the spec's folder"),
        ("pretrained", "~/../../secret.txt", "is an absolute path"),
        ("pretrained", "link.txt", "leads outside the spec's folder"),  # a link inside, to the file outside
    ],
)
def test_block_file_params_stay_in_the_spec_folder(tmp_path, secret, param, value, fragment):
    folder = tmp_path / "spec"
    value = str(secret) if value == "ABS" else value
    spec = tiny_spec(folder, embed_params=f", {param}: {json.dumps(value)}")
    os.symlink(secret, folder / "link.txt")
    for command in ("validate", "build"):
        outcome = bounded(f"{param}={value}", command, spec)
        assert_clean(outcome, 1, fragment, "--allow-external-files", absent=(SECRET,))


def test_extends_stays_in_the_spec_folder(tmp_path, secret):
    folder = tmp_path / "spec"
    for i, target in enumerate([str(secret), "../secret.txt", "../../../../../../etc/passwd", "/etc/shadow"]):
        spec = tiny_spec(folder, f"s{i}.yaml", replace={"name: tiny": f"name: tiny\nextends: {json.dumps(target)}"})
        outcome = bounded(f"extends={target}", "validate", spec)
        assert_clean(outcome, 1, "extends:", absent=(SECRET, "root:"))


def test_allow_external_files_lets_a_trusted_spec_read_them(tmp_path):
    vectors = tmp_path / "vectors.txt"
    vectors.write_text("".join(f"w{i} {i} 0 0 0 0 0 0 1\n" for i in range(20)), encoding="utf-8")
    spec = tiny_spec(tmp_path / "spec", embed_params=f", pretrained: {json.dumps(str(vectors))}")
    assert_clean(bounded("allowed-external", "build", spec, "--allow-external-files"), 0)


@pytest.mark.parametrize(
    ("vectors", "fragment"),
    [
        (f"{SECRET} 1 2\n", "line 1: 2 values after the word, expected dim=8"),
        ("w 1 2 3 4 5 6 7 8\n" + f"w2 1 2 3 {SECRET} 5 6 7 8\n", "line 2: value 4 after the word is not a number"),
        (f"{SECRET}\n", "line 1: 0 values after the word"),
        ("\xff\xfe" + SECRET, "not UTF-8"),
    ],
)
def test_a_malformed_vectors_file_is_described_not_quoted(tmp_path, vectors, fragment):
    folder = tmp_path / "spec"
    folder.mkdir()
    (folder / "vectors.txt").write_bytes(vectors.encode("utf-8", "surrogateescape") if "\xff" not in vectors
                                         else b"\xff\xfe" + SECRET.encode())  # fmt: skip
    spec = tiny_spec(folder, embed_params=", pretrained: vectors.txt")
    assert_clean(bounded("vectors-malformed", "build", spec), 1, fragment, absent=(SECRET,))


def test_a_vocabulary_file_is_described_not_quoted(tmp_path):
    folder = tmp_path / "spec"
    folder.mkdir()
    (folder / "vectors.txt").write_text("a 1 2 3 4 5 6 7 8\n", encoding="utf-8")
    (folder / "vocab.txt").write_text(f"{SECRET}\n\nb\n", encoding="utf-8")
    spec = tiny_spec(folder, embed_params=", pretrained: vectors.txt, vocab_file: vocab.txt")
    assert_clean(bounded("vocab-malformed", "build", spec), 1, "vocab.txt line 2: empty line", absent=(SECRET,))


@pytest.mark.parametrize(
    "base",
    [
        f"{SECRET}: [unclosed\n",
        f"key: *{SECRET}\n",
        f'key: "\\q{SECRET}"\n',
        f"- {SECRET}\n",
        f"{SECRET}\n",
    ],
)
def test_a_base_spec_that_is_no_spec_is_not_quoted(tmp_path, base):
    folder = tmp_path / "spec"
    folder.mkdir()
    (folder / "base.yaml").write_text(base, encoding="utf-8")
    spec = tiny_spec(folder, replace={"name: tiny": "name: tiny\nextends: base.yaml"})
    assert_clean(bounded("extends-not-a-spec", "validate", spec), 1, "extends", absent=(SECRET,))


def test_values_and_keys_of_a_base_spec_are_located_not_quoted(tmp_path):
    """A base spec is reached through `extends:`: its mistakes are shown by line, without its text."""
    folder = tmp_path / "spec"
    folder.mkdir()
    (folder / "base.yaml").write_text(
        f"vars: {{d_model: 8}}\n{SECRET}_key: 1\ndescription: ['{SECRET}']\n",
        encoding="utf-8",
    )
    spec = tiny_spec(folder, replace={"name: tiny": "name: tiny\nextends: base.yaml"})
    outcome = bounded("extends-values", "validate", spec)
    assert_clean(outcome, 1, "base.yaml:2", "base.yaml:3", "unknown key", absent=(SECRET,))


def test_bad_data_lines_are_located_not_quoted(tmp_path):
    data = tmp_path / "pairs.tsv"
    data.write_bytes(f"a b\tc d\n{SECRET} without a tab\n\t{SECRET}\n".encode() + b"\xff" + SECRET.encode() + b"\n")
    outcome = bounded("data-bad-lines", "train", tmp_path / "nope.yaml", "--data", data, "--out", tmp_path / "r")
    assert_clean(outcome, 1, absent=(SECRET,))
    spec = Path(__file__).resolve().parents[2] / "specs" / "transformer.yaml"
    outcome = bounded("data-bad-lines", "train", spec, "--data", data, "--out", tmp_path / "r", "--set", "d_model=16",
                      "--set", "heads=2")  # fmt: skip
    assert_clean(outcome, 1, "line 2: no tab", "line 3: empty source", "line 4: not UTF-8", absent=(SECRET,))


@pytest.mark.parametrize(
    ("file", "change"),
    [
        ("checkpoint/trainer.json", lambda d: d.__setitem__("epoch", SECRET)),
        ("checkpoint/trainer.json", lambda d: d["roles"].__setitem__("kind", SECRET)),
        ("checkpoint/vocab.json", lambda d: d["tgt"].__setitem__("tokenizer", SECRET)),
        ("checkpoint/vocab.json", lambda d: d["tgt"].__setitem__("tokens", SECRET)),
        ("checkpoint/model/blockgraph.json", lambda d: d.__setitem__("format", SECRET)),
        ("checkpoint/model/blockgraph.json", lambda d: d.__setitem__("format_version", SECRET)),
    ],
)
def test_wrong_values_in_checkpoint_json_are_named_by_field(run_dir, file, change):
    path = run_dir / file
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data), encoding="utf-8")
    outcome = bounded(f"json-{file}", "translate", run_dir, "1 2")
    assert_clean(outcome, 1, path.name, absent=(SECRET,))


NAME = SECRET.replace("-", "_")  # the canary as a key a spec accepts as a node name
TOKENS = "{type: token_embedding, params: {vocab: 20, dim: 8}, in: tokens}"


@pytest.mark.parametrize(
    ("base", "fragments"),
    [
        (f"vars: {{d_model: 8}}\n{SECRET}: 1\n{SECRET}: 2\n", ("base.yaml:3", "duplicate key")),
        (f"description: !{SECRET} x\n", ("base.yaml:1", "YAML tag")),
        (f"a: &{SECRET} 1\nb: &{SECRET} 2\n", ("base.yaml:2", "YAML syntax error")),
        (
            f"nodes:\n  {NAME}: {TOKENS}\n  dangling: {{type: generator, params: {{d_model: 8, vocab: 20}}, in: x}}\n",
            ("base.yaml:3", "is not a node or input here"),
        ),
        (
            f"nodes:\n  {NAME}: {{type: token_embedding, params: {{vocab: 20, dim: ['{SECRET}']}}, in: tokens}}\n",
            ("base.yaml:2", "Input should be a valid integer"),
        ),
        (f"extends: {SECRET}.yaml\n", ("base.yaml:1", "base spec not found")),
    ],
    ids=["duplicate-key", "yaml-tag", "syntax-error", "unknown-ref", "wrong-type", "missing-base-of-base"],
)
def test_mistakes_in_a_base_spec_are_located_not_quoted(tmp_path, base, fragments):
    """Each mistake names the base file and line, never its keys, values or node names."""
    folder = tmp_path / "spec"
    folder.mkdir()
    (folder / "base.yaml").write_text(base, encoding="utf-8")
    spec = tiny_spec(folder, replace={"name: tiny": "name: tiny\nextends: base.yaml"})
    for command in ("validate", "build"):
        outcome = bounded(f"extends-mistake-{command}", command, spec)
        assert_clean(outcome, 1, *fragments, absent=(SECRET, NAME))


def test_a_hint_in_the_spec_lists_no_name_of_its_base(tmp_path):
    """A mistake in the spec itself may list its names, never those of the base it extends."""
    folder = tmp_path / "spec"
    folder.mkdir()
    (folder / "base.yaml").write_text(f"vars: {{{NAME}: 1}}\nnodes:\n  {NAME}: {TOKENS}\n", encoding="utf-8")
    extends = {"name: tiny": "name: tiny\nextends: base.yaml"}
    spec = tiny_spec(folder, "ref.yaml", replace={**extends, "outputs: generator": "outputs: zz"})
    outcome = bounded("extends-ref-hint", "validate", spec)
    assert_clean(outcome, 1, "ref.yaml:11", "'zz' is not a node or input here", "known names: tokens", absent=(NAME,))
    outcome = bounded("extends-set-hint", "validate", tiny_spec(folder, replace=extends), "--set", "qq=1")
    assert_clean(outcome, 1, "spec.yaml", "no variable 'qq'", "variables: vocab, d_model", absent=(NAME,))
