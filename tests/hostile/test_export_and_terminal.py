"""Class 9: `export` refuses what `build` refuses; escape sequences and markup in names never reach a terminal raw.

`assert_clean` fails any case whose output holds a raw ESC or CSI byte; here the names come from spec names,
descriptions, keys, paths, sentences and vocabularies, and the output must still say them (escaped).
"""

from __future__ import annotations

import json

import pytest
from harness import assert_clean, bounded, tiny_spec

pytest_plugins = ("harness",)

ESCAPES = ["\x1b[2J\x1b[31mred", "\x1b]0;title\x07", "\x9b31m", "[/x] [red]markup[/red]", "\r\x08\x7f"]


BF16_INPUT = {  # a bfloat16 input into float32 weights: the forward fails, so build refuses the spec
    'tokens: {dtype: int64, shape: [batch, seq], high: "${vocab}"}': (
        "tokens: {dtype: bfloat16, shape: [batch, seq, 8]}"
    ),
    'type: token_embedding, params: {vocab: "${vocab}", dim: "${d_model}"}': (
        "type: linear, params: {in_features: 8, out_features: 8}"
    ),
}


def test_export_refuses_what_build_refuses(tmp_path):
    spec = tiny_spec(tmp_path, replace=BF16_INPUT)
    assert_clean(bounded("build-bf16", "build", spec), 1, "failed on the trial inputs")
    outcome = bounded("export-bf16", "export", spec, "--format", "exported-program", "--out", tmp_path / "m.pt2")
    assert_clean(outcome, 1, "failed on the trial inputs")
    assert not (tmp_path / "m.pt2").exists()


@pytest.mark.parametrize("name", ESCAPES)
@pytest.mark.parametrize("command", ["build", "inspect", "table", "json", "mermaid", "dot", "resolved"])
def test_names_with_escapes(tmp_path, name, command):
    spec = tiny_spec(tmp_path, replace={"name: tiny": f"name: {json.dumps(name)}\ndescription: {json.dumps(name)}"})
    args = {
        "build": ("build", spec),
        "inspect": ("inspect", spec),
        "resolved": ("validate", spec, "--resolved", "yaml"),
    }.get(command, ("inspect", spec, "--format", command))
    outcome = bounded(f"escape-{command}", *args)
    assert_clean(outcome, 0)
    if command == "json":
        assert json.loads(outcome.stdout)["name"] == name  # still the name, escaped the JSON way


@pytest.mark.parametrize("name", ESCAPES)
def test_escapes_in_error_messages(tmp_path, name):
    key = tiny_spec(tmp_path, "key.yaml", replace={"dims:": f"{json.dumps(name)}: 1\ndims:"})
    assert_clean(bounded("escape-key", "validate", key), 1, "unknown key")
    path = tiny_spec(tmp_path, f"{name.replace('/', '_')}.yaml", replace={"vocab: 20": "vocab: -1"})
    assert_clean(bounded("escape-path", "validate", path), 1, "greater than 0")
    assert_clean(bounded("escape-path-ok", "build", tiny_spec(tmp_path, f"ok{name.replace('/', '_')}.yaml")), 0)


@pytest.mark.parametrize("text", ESCAPES)
def test_escapes_in_sentences_and_vocabularies(run_dir, text):
    assert_clean(bounded("escape-sentence", "translate", run_dir, f"1 2 {text}"), 0, "not in the source vocabulary")
    vocab = run_dir / "checkpoint" / "vocab.json"
    data = json.loads(vocab.read_text())
    data["tgt"]["tokens"][4:] = [f"{text}{i}" for i in range(len(data["tgt"]["tokens"]) - 4)]
    vocab.write_text(json.dumps(data))
    assert_clean(bounded("escape-vocab", "translate", run_dir, "1 2 3"), 0)


def test_escapes_in_a_plugins_block(tmp_path):
    plugin = tmp_path / "plug.py"
    plugin.write_text(
        "from blockgraph.blocks import Block, register\n\n"
        "@register('evil_block', family='\\x1b[2Jfam')\n"
        "class Evil(Block):\n    '''\\x1b]0;pwned\\x07 summary [/x]'''\n"
        "    def forward(self, x):\n        return x\n"
    )
    assert_clean(bounded("escape-plugin", "--plugin", plugin, "blocks", "list"), 0, "evil_block")
