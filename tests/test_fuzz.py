"""Random damage to valid specs never crashes blockgraph: every outcome is a model or a clean `BlockgraphError`
(exit code 1 on the command line), never a traceback.

Mutations start from specs/tiny_encoder.yaml and a small linear chain that uses every language feature
(vars, a sub-graph with params, repeat, share, tie, an optional input, a mapping of outputs). Crashes found
here are fixed in the builder and kept below as `@example`s.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Any

import yaml
from conftest import SPECS
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from blockgraph import builder, cli
from blockgraph.builder import BlockgraphError
from blockgraph.builder.compile import compile_graph
from blockgraph.builder.source import load_text
from blockgraph.builder.validate import validate_document

CHAIN = """
name: chain
vars: {w: 4, n: 2, h: "${w * 2}"}
dims: {batch: 2}
inputs:
  x: {shape: [batch, "${w}"]}
  skip: {shape: [batch, "${w}"], optional: true}
blocks:
  mlp:
    inputs: [h]
    params: {width: "${w}", hidden: "${width * 2}"}
    nodes:
      up: {type: linear, params: {in_features: "${width}", out_features: "${hidden}"}, in: h}
      down: {type: linear, params: {in_features: "${hidden}", out_features: "${width}"}, in: up}
    outputs: down
nodes:
  first: {type: linear, params: {in_features: "${w}", out_features: "${w}"}, in: x}
  again: {type: linear, share: first, in: first}
  stack: {type: mlp, repeat: "${n}", params: {hidden: "${h}"}, in: again}
  mix: {type: add, in: [stack, again]}
  norm: {type: layer_norm, params: {dim: "${w}"}, in: mix}
  out: {type: linear, params: {in_features: "${w}", out_features: "${w}"}, in: norm}
outputs: {y: out, hidden: norm}
tie: {out.proj.weight: first.proj.weight}
"""
TINY_TEXT = (SPECS / "tiny_encoder.yaml").read_text()
BASES = {"chain": yaml.safe_load(CHAIN), "tiny": yaml.safe_load(TINY_TEXT)}
TEXTS = {"chain.yaml": CHAIN, "tiny.yaml": TINY_TEXT, "chain.json": json.dumps(BASES["chain"], indent=1)}

SPECIAL_STRINGS = [
    "${w}",
    "${d_model}",
    "${nope}",
    "${w * 0}",
    "${1/0}",
    "${w.real}",
    "${",
    "}",
    "${w // 3}",
    "${layers - 2}",
    "${'a' * 20000}",
    "${[1, 2]}",
    "batch",
    "x",
    "x.y",
    "first.y",
    "first.nope",
    "embed.lut.weight",
    "tokens",
    "encoder",
    "mlp",
    "linear",
    "..",
    "",
    " ",
    "a.b.c",
    "nodes",
    "training",
    "forward",
    "items",
    "class",
    "self",
    "_m",
]
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 40),
    st.sampled_from([10**6, 10**30, 2**63, 1.5, 0.0, -0.5, float("nan"), float("inf")]),
    st.text(max_size=10),
    st.sampled_from(SPECIAL_STRINGS),
    st.lists(st.integers(-2, 10) | st.sampled_from(SPECIAL_STRINGS), max_size=3),
    st.dictionaries(st.sampled_from(["a", "x", "type", "in", "y", "1"]), st.integers(-2, 10) | st.text(max_size=4)),
)
STABLE_BLOCKS = [
    "linear",
    "add",
    "layer_norm",
    "add_norm",
    "feed_forward",
    "multi_head_attention",
    "token_embedding",
    "sinusoidal_position",
    "generator",
    "dropout",
]
NAMES = st.sampled_from(SPECIAL_STRINGS) | st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}(\.[a-z_]{1,4})?", fullmatch=True)
SNIPPETS = st.sampled_from(
    [
        ":",
        "- ",
        "{",
        "}",
        "[",
        "]",
        ",",
        "&a ",
        "*a",
        "*b",
        "!!python/name:os.system ",
        "!!binary ",
        "!foo ",
        "\t",
        "\n---\n",
        '"',
        "'",
        "#",
        "<<: *a",
        "${",
        "\n  ",
        ": &a {x: *a}",
        "\x00",
        "\x85",
        "\ufeff",
        "? ",
        "|",
        ">",
    ]
)


def _paths(data: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value below `data` (not `data` itself)."""
    found = []
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        found.append((*prefix, key))
        found += _paths(value, (*prefix, key))
    return found


def _swap_type(value: Any) -> Any:
    if isinstance(value, bool):
        return "yes"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return value[0] if value else {}
    if isinstance(value, dict):
        return list(value.values())
    return 0


@st.composite
def mutated_specs(draw: st.DrawFn) -> dict:
    """A valid spec with one to three random mutations."""
    data = copy.deepcopy(BASES[draw(st.sampled_from(sorted(BASES)))])
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(data)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        kind = draw(st.sampled_from(["delete", "junk", "ref", "swap", "rename", "copy", "retype", "small"]))
        if kind == "copy":  # a value that is valid somewhere else
            source = draw(st.sampled_from(paths))
            value = data
            for part in source:
                value = value[part]
            parent[key] = copy.deepcopy(value)
        elif kind == "retype":
            parent[key] = draw(st.sampled_from(STABLE_BLOCKS))
        elif kind == "small":
            parent[key] = draw(st.integers(0, 9))
        elif kind == "delete":
            del parent[key]
        elif kind == "junk":
            parent[key] = draw(JUNK)
        elif kind == "ref":
            parent[key] = draw(NAMES)
        elif kind == "swap":
            parent[key] = _swap_type(parent[key])
        elif isinstance(parent, dict):
            parent[draw(NAMES)] = parent.pop(key)
    return data


@st.composite
def damaged_texts(draw: st.DrawFn) -> tuple[str, str]:
    """(file name, text) of a spec file cut short, or with junk inserted, or with a span removed."""
    name = draw(st.sampled_from(sorted(TEXTS)))
    text = TEXTS[name]
    for _ in range(draw(st.integers(1, 2))):
        pos = draw(st.integers(0, len(text)))
        kind = draw(st.sampled_from(["truncate", "insert", "insert", "cut"]))
        if kind == "truncate":
            text = text[:pos]
        elif kind == "insert":
            text = text[:pos] + draw(SNIPPETS | st.text(max_size=6)) + text[pos:]
        else:
            text = text[:pos] + text[pos + draw(st.integers(1, 40)) :]
    return name, text


def assert_clean(run: Any) -> None:
    """`run()` builds or raises a `BlockgraphError` whose problems all render as located text."""
    try:
        run()
    except BlockgraphError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert isinstance(problem.message, str) and problem.message
            assert "Traceback" not in str(problem)


def through_the_api(source: Any) -> None:
    compile_graph(builder.typed_graph(source), device="meta")


def text_through_the_api(name: str, text: str) -> None:
    document = load_text(text, name, json_syntax=name.endswith(".json"))
    compile_graph(builder.typed_graph(validate_document(document)), device="meta")


FAST = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(FAST, max_examples=120)
@given(spec=mutated_specs())
@example(spec={**BASES["chain"], "vars": {"w": 4, "n": 2, "h": "${" + "+".join(["1"] * 3000) + "}"}})
@example(spec={**BASES["chain"], "vars": {f"v{i}": f"${{v{i + 1}}}" for i in range(2000)} | {"w": "${v0}"}})
@example(spec={**BASES["chain"], "vars": {"w": 4, "n": 2, "h": "${'%099999999d' % 1}"}})
@example(spec={**BASES["chain"], "inputs": {"x": {"shape": []}}})
@example(spec={**BASES["chain"], "nodes": {**BASES["chain"]["nodes"], "again": {"type": "linear", "share": "x"}}})
@example(spec={**BASES["chain"], "extends": "\x00"})
@example(spec={**BASES["tiny"], "vars": {**BASES["tiny"]["vars"], "layers": True}})
@example(spec={**BASES["chain"], "vars": {"w": 4, "n": 2, "h": "${round(5, -10**8)}"}})
@example(spec={**BASES["chain"], "nodes": {"training": BASES["chain"]["nodes"]["first"]}, "outputs": "training"})
@example(spec={**BASES["chain"], "inputs": {"class": {"shape": ["batch", 4]}}})
@example(spec={**BASES["chain"], "inputs": {"_m": {"shape": ["batch", 4]}}})
@example(spec={**BASES["chain"], "outputs": {"y": "out", "s": "skip"}})
@example(spec={**BASES["chain"], "nodes": {"s": {"type": "mlp", "params": {}}}, "outputs": "s"})
@example(spec={**BASES["chain"], "nodes": {"s": {"type": "mlp", "repeat": 3}, "t": {"type": "s"}}, "outputs": "s"})
def test_mutated_specs_build_or_fail_cleanly(spec: dict) -> None:
    assert_clean(lambda: through_the_api(spec))


@settings(FAST, max_examples=120)
@given(named=damaged_texts())
@example(named=("chain.yaml", CHAIN.replace("name: chain", "name: chain\x07")))
@example(named=("chain.yaml", CHAIN + "extra: " + "[" * 20_000))
@example(named=("chain.json", "{" + '"a": [' * 20_000))
@example(named=("chain.yaml", CHAIN.replace("w: 4", "w: " + "9" * 5000)))
@example(named=("chain.json", '{"name": ' + "9" * 5000 + "}"))
@example(named=("chain.yaml", CHAIN.replace("name: chain", "name: \ud800")))
@example(named=("chain.yaml", CHAIN.replace("dims:", "!!python/name:os.system : 1\ndims:")))
def test_damaged_text_loads_or_fails_cleanly(named: tuple[str, str]) -> None:
    assert_clean(lambda: text_through_the_api(*named))


@settings(FAST, max_examples=40)
@given(data=st.data())
def test_random_bytes_in_a_spec_file_fail_cleanly(data: st.DataObject) -> None:
    raw = CHAIN.encode()
    pos = data.draw(st.integers(0, len(raw)))
    raw = raw[:pos] + data.draw(st.binary(min_size=1, max_size=8)) + raw[pos:]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bytes.yaml"
        path.write_bytes(raw)
        assert_clean(lambda: through_the_api(path))


@settings(FAST, max_examples=25)
@given(named=damaged_texts(), spec=mutated_specs(), as_text=st.booleans())
def test_the_cli_never_shows_a_traceback(named: tuple[str, str], spec: dict, as_text: bool) -> None:
    name, text = named if as_text else ("spec.yaml", yaml.safe_dump(spec, sort_keys=False))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        result = CliRunner().invoke(cli.app, ["validate", str(path)], env={"COLUMNS": "200"})
    exception = result.exception if not isinstance(result.exception, SystemExit) else None
    assert exception is None, repr(exception)
    assert result.exit_code in (0, 1), result.output
    assert "Traceback" not in result.output
