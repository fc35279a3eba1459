"""What a new user tripped over in the spec tools (issue 17): the editor schema refusing shipped specs and missing
misspelt block types, `validate --resolved` printing what does not validate again, and errors coming in rounds."""

from __future__ import annotations

import ast
import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import torch
import yaml
from conftest import SPECS, meta_model
from pydantic import TypeAdapter, ValidationError

from blockgraph import builder
from blockgraph.builder import SpecError
from blockgraph.builder.expressions import PLACEHOLDER
from blockgraph.builder.schema import spec_schema

SHIPPED = sorted(SPECS.glob("*.yaml"))


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(spec_schema())


def editor_view(path: Path) -> dict:
    """A spec as an editor's YAML plugin reads it (YAML 1.1: `1e-12` is a string)."""
    return yaml.safe_load(path.read_text())


def schema_errors(validator: jsonschema.Draft202012Validator, data: dict) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(data)]


def tool_accepts(data: dict) -> bool:
    try:
        builder.load_spec(data)
    except SpecError:
        return False
    return True


# --- the editor schema --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_spec_passes_the_schema_as_written(validator, path):
    """Partial specs (`extends:`) and ones overriding a base node's params included, without merging first."""
    assert schema_errors(validator, editor_view(path)) == []


LM = SPECS / "lstm_lm.yaml"  # a spec without blocks: its node types can only be registered blocks


def test_the_schema_flags_a_misspelt_block_type(validator):
    data = editor_view(LM)
    assert "blocks" not in data and validator.is_valid(data)
    data["nodes"]["lstm"]["type"] = "lsmt"
    assert not validator.is_valid(data) and not tool_accepts(data)
    data["nodes"]["lstm"]["type"] = "multi_head_atention"
    assert not validator.is_valid(data)


def test_a_partial_spec_is_checked_for_what_it_writes(validator):
    child = editor_view(SPECS / "rnn_seq2seq_local.yaml")  # the base's attn params are merged in: none required
    assert validator.is_valid(child)
    assert validator.is_valid({**child, "nodes": {**child["nodes"], "bridge": None}})  # null deletes a base's key
    misspelt = copy.deepcopy(child)
    misspelt["nodes"]["attn"]["params"]["windw"] = 4
    assert not validator.is_valid(misspelt)
    misspelt = copy.deepcopy(child)
    misspelt["nodes"]["attn"]["parms"] = misspelt["nodes"]["attn"].pop("params")
    assert not validator.is_valid(misspelt)
    assert not validator.is_valid({**child, "nodse": {}})


def linear_spec(params: dict, **top: object) -> dict:
    return {
        "name": "one",
        "inputs": {"x": {"shape": ["batch", 4]}},
        "nodes": {
            "lin": {"type": "linear", "params": {"in_features": 4, "out_features": 4, **params}, "in": "x"},
            "norm": {"type": "layer_norm", "params": {"dim": 4}, "in": "lin"},
        },
        "outputs": "norm",
        **top,
    }


NUMBER_TEXTS = ["1e-12", "1.0e-5", " 0.5 ", ".5", "5.", "-3", "+inf", "NaN", "1_000.5", "12", "1e", "abc", "0x10", ""]
INT_TEXTS = ["12", " 12 ", "+12", "1_000", "12.0", "12.5", "1e3", "0x10", "twelve", ""]
BOOL_TEXTS = ["true", "False", "YES", "no", "on", "Off", "t", "n", "1", "0", "2", "maybe", " yes"]


@pytest.mark.parametrize(
    ("field", "kind", "texts"),
    [
        (("norm", "eps"), float, NUMBER_TEXTS),
        (("lin", "out_features"), int, INT_TEXTS),
        (("lin", "bias"), bool, BOOL_TEXTS),
    ],
)
def test_numbers_and_flags_written_as_text_pass_the_schema_as_they_pass_the_tool(validator, field, kind, texts):
    node, name = field
    for text in texts:
        pydantic_reads = _reads(kind, text)
        data = linear_spec({})
        data["nodes"][node]["params"][name] = text
        assert validator.is_valid(data) == pydantic_reads, (name, text)
    data = linear_spec({})
    data["nodes"]["norm"]["params"]["eps"] = "1e-12"  # how YAML 1.1 reads `eps: 1e-12`
    assert validator.is_valid(data) and builder.load_spec(data).top.uses["norm"].params.eps == 1e-12


def _reads(kind: type, text: str) -> bool:
    try:
        TypeAdapter(kind).validate_python(text)
    except ValidationError:
        return False
    return True


PASS_ON = {"type": "linear", "params": {"in_features": 4, "out_features": 4}, "in": "u"}
SUBGRAPH = {"g": {"inputs": ["u"], "nodes": {"p": PASS_ON}, "outputs": "p"}}


@pytest.mark.parametrize(
    ("mutate", "accepted"),
    [
        (lambda s: s["dims"].update(batch="2"), False),  # dims are strict integers in the tool too
        (lambda s: s["dims"].update(batch="${b}"), True),
        (lambda s: s["inputs"]["x"].update(shape=["batch", "${w}"]), True),
        (lambda s: s["inputs"]["x"].update(shape=["batch", "4"]), False),
        (lambda s: s["inputs"]["x"].update(dtype="flaot32"), False),
        (lambda s: s["nodes"]["lin"].update({"in": "${src}"}), True),  # the spec's own nodes are substituted
        (lambda s: s["nodes"]["lin"]["params"].update(out_features="${w}"), True),
        (lambda s: s["nodes"]["lin"].update({"in": "x y"}), False),
        (lambda s: s["nodes"].update({"bad-name": s["nodes"]["lin"]}), False),
        (lambda s: s.update(blocks=SUBGRAPH), True),
        (lambda s: s.update(blocks={"g": {**SUBGRAPH["g"], "nodes": {"p": {**PASS_ON, "in": "${u}"}}}}), False),
        (lambda s: s.update(blocks={"g": {**SUBGRAPH["g"], "nodes": {"p": {**PASS_ON, "repeat": "${w}"}}}}), True),
    ],
)
def test_the_schema_takes_expressions_where_they_are_substituted_and_agrees_with_the_tool(validator, mutate, accepted):
    data = linear_spec({}, vars={"w": 4, "b": 2, "src": "x"}, dims={"batch": 2})
    mutate(data)
    assert validator.is_valid(data) == accepted, schema_errors(validator, data)
    assert tool_accepts(data) == accepted


# --- validate --resolved ------------------------------------------------------------------------------------------


def test_resolved_yaml_of_every_shipped_spec_validates_again_and_builds_the_same_model(run_cli, tmp_path):
    result = run_cli("validate", *SHIPPED, "--resolved", "yaml")
    assert result.code == 0, result.stderr
    documents = list(yaml.safe_load_all(result.stdout))  # one YAML document per spec, separated by ---
    assert [d["name"] for d in documents] == [builder.load_spec(p).spec.name for p in SHIPPED]
    left = [text for document in documents for text in _strings(document) if "${" in text]
    assert all(_reads_only_copy(text) for text in left), left  # what differs between a stack's copies, per copy
    saved = []
    for path, text in zip(SHIPPED, re.split(r"(?m)^---\n", result.stdout), strict=True):
        saved.append(tmp_path / path.name)
        saved[-1].write_text(text)
    again = run_cli("validate", *saved)
    assert again.code == 0, again.stderr
    for path, copy_path in zip(SHIPPED, saved, strict=True):
        _assert_same_model(path, copy_path)


def _strings(value: object) -> list[str]:
    if isinstance(value, dict):
        return [text for item in value.values() for text in _strings(item)]
    if isinstance(value, list):
        return [text for item in value for text in _strings(item)]
    return [value] if isinstance(value, str) else []


def _reads_only_copy(text: str) -> bool:
    """A whole `${...}` whose only variable is `copy`."""
    whole = PLACEHOLDER.fullmatch(text)
    tree = ast.parse(whole.group(1), mode="eval") if whole else None
    return tree is not None and {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)} == {"copy"}


def _assert_same_model(original: Path | dict, resolved: Path | dict, overrides: dict | None = None) -> None:
    plain = isinstance(original, Path) and not overrides
    first = meta_model(original) if plain else builder.build(original, device="meta", overrides=overrides)
    second = builder.build(resolved, device="meta")
    shapes = {name: tuple(t.shape) for name, t in first.state_dict().items()}
    assert {name: tuple(t.shape) for name, t in second.state_dict().items()} == shapes
    graph, again = first.typed_graph.graph, second.typed_graph.graph
    assert {n: i.params for n, i in again.nodes.items()} == {n: i.params for n, i in graph.nodes.items()}
    assert second.code == first.code


SPECIALISED = """
name: specialised
vars: {d: 4, wide: 16, layers: 2}
inputs:
  x: {shape: [batch, "${d}"]}
blocks:
  layer:
    inputs: [h]
    params: {width: "${d}", hidden: "${d * 2}"}
    nodes:
      up: {type: linear, params: {in_features: "${width}", out_features: "${hidden}"}, in: h}
      down: {type: linear, params: {in_features: "${hidden}", out_features: "${width}"}, in: up}
    outputs: down
nodes:
  narrow: {type: layer, repeat: "${layers}", in: x}
  broad: {type: layer, params: {hidden: "${wide}"}, in: narrow, doc: the wide one}
  again: {type: linear, params: {in_features: "${d}", out_features: "${d}"}, in: broad}
  same: {type: linear, share: again, in: again}
outputs: {y: same}
"""


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_resolved_specialises_each_subgraph_for_its_params(run_cli, write_spec, fmt):
    path = write_spec(SPECIALISED)
    result = run_cli("validate", path, "--resolved", fmt, "--set", "layers=3")
    assert result.code == 0, result.stderr
    data = json.loads(result.stdout) if fmt == "json" else yaml.safe_load(result.stdout)
    assert "vars" not in data and "${" not in result.stdout
    assert data["blocks"]["layer"]["nodes"]["up"]["params"]["out_features"] == 8
    assert data["blocks"]["layer_2"]["nodes"]["up"]["params"]["out_features"] == 16  # the use's hidden: wide
    assert data["nodes"]["narrow"] == {"type": "layer", "in": {"h": "x"}, "repeat": 3}
    assert data["nodes"]["broad"]["type"] == "layer_2" and data["nodes"]["broad"]["doc"] == "the wide one"
    assert data["nodes"]["same"] == {"type": "linear", "in": {"x": "again"}, "share": "again"}
    copy_path = path.with_name(f"resolved.{fmt}")
    copy_path.write_text(result.stdout)
    assert run_cli("validate", copy_path, "--strict").code == 0
    _assert_same_model(path, copy_path, overrides={"layers": 3})


# --- every error at once ------------------------------------------------------------------------------------------

THREE_MISTAKES = """\
name: three
inputs:
  x: {shape: [batch, 8]}
nodes:
  a: {type: linear, parms: {in_features: 8, out_features: 8}, in: x}
  b: {type: lineer, params: {in_features: 8, out_features: 8}, in: a}
  c: {type: linear, params: {in_features: 8, out_feature: 8}, in: b}
outputs: c
"""


def errors_of(result) -> list[str]:
    """The messages of a failed `validate` run, each with the lines under it, whitespace folded."""
    return [" ".join(block.split()) for block in re.split(r"(?m)^(?=error:)", result.stderr) if block.strip()]


def test_three_independent_mistakes_are_reported_in_one_run(run_cli, write_spec):
    path = write_spec(THREE_MISTAKES)
    result = run_cli("validate", path)
    assert result.code == 1 and result.exception is None
    errors = [e for e in errors_of(result) if e.startswith("error:")]
    expected = [
        ("unknown key 'parms'", 5, "did you mean 'params'?"),
        ("unknown block type 'lineer'", 6, "did you mean 'linear'?"),
        ("unknown key 'out_feature'", 7, "did you mean 'out_features'?"),
    ]
    assert len(errors) == len(expected), errors  # nothing about the nodes that read a failed one
    for (message, line, hint), error in zip(expected, errors, strict=True):
        assert message in error and f"{path.name}:{line}:" in error and hint in error, error


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        ({"name: three": "nmae: three"}, ["unknown key 'nmae'"]),  # a required key misspelt
        ({"outputs: c": "ouputs: c"}, ["unknown key 'ouputs'"]),
        ({"inputs:": "inptus:"}, ["unknown key 'inptus'"]),  # refs to inputs are then not judged
        ({"outputs: c": '  d: {type: linear, params: {in_features: "${widht}"}, in: c}\noutputs: c'}, ["'widht'"]),
        ({"in: a}": "in: c}"}, ["the nodes form a cycle: b → c → b"]),
        ({"in: b}": "in: b, share: a}"}, []),  # a share of a node already reported wrong
        ({"  x: {shape": "  x: {dtype: flaot, shape"}, ["'flaot' is not a torch dtype"]),
    ],
)
def test_a_mistake_anywhere_does_not_hide_the_others(run_cli, write_spec, edit, expected):
    text = THREE_MISTAKES
    for old, new in edit.items():
        assert old in text
        text = text.replace(old, new, 1)
    result = run_cli("validate", write_spec(text))
    messages = " | ".join(errors_of(result))
    for fragment in [*expected, "unknown block type 'lineer'", "unknown key 'out_feature'"]:
        assert fragment in messages, messages
    assert "is not a node or input here" not in messages and "is not a block node" not in messages, messages


def test_a_subgraph_mistake_and_a_spec_mistake_come_together(run_cli, write_spec):
    spec = yaml.safe_load(SPECIALISED)
    spec["blocks"]["layer"]["nodes"]["up"]["inn"] = spec["blocks"]["layer"]["nodes"]["up"].pop("in")
    spec["nodes"]["again"]["params"]["out_featurs"] = spec["nodes"]["again"]["params"].pop("out_features")
    spec["vars"]["dd"] = "${d +}"
    result = run_cli("validate", write_spec(spec))
    messages = " | ".join(errors_of(result))
    for fragment in ("unknown key 'inn'", "unknown key 'out_featurs'", "cannot parse ${d +}"):
        assert fragment in messages, messages
    assert len(errors_of(result)) == 3, messages


def test_resolved_file_params_are_relative_to_the_spec_that_prints_them(run_cli, tmp_path):
    """A base in a sub-folder names its vectors relative to itself; the resolved child names them from its own."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "vectors.txt").write_text("a 0.1 0.2\nb 0.3 0.4\n")
    (base / "vocab.txt").write_text("a\nb\nc\n")
    (base / "base.yaml").write_text(
        "name: pretrained\ndims: {batch: 1, seq: 2}\ninputs: {tokens: {dtype: int64, shape: [batch, seq], high: 3}}\n"
        "nodes:\n  embed: {type: token_embedding, in: tokens,\n"
        "          params: {vocab: 3, dim: 2, pretrained: vectors.txt, vocab_file: vocab.txt}}\noutputs: embed\n"
    )
    child = tmp_path / "child.yaml"
    child.write_text("extends: base/base.yaml\nname: child\n")
    result = run_cli("validate", child, "--resolved", "yaml")
    assert result.code == 0, result.stderr
    params = yaml.safe_load(result.stdout)["nodes"]["embed"]["params"]
    assert (params["pretrained"], params["vocab_file"]) == ("base/vectors.txt", "base/vocab.txt")
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(result.stdout)
    loaded = builder.build(resolved).embed.lut.weight[:2]
    assert torch.equal(loaded, builder.build(child).embed.lut.weight[:2])
    assert torch.allclose(loaded, torch.tensor([[0.1, 0.2], [0.3, 0.4]]))
