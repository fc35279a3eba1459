"""The spec language, feature by feature: repeat, sub-graphs, vars, overrides, extends, sharing, I/O, shapes,
error reporting, the resolved view, the JSON Schema and safe loading. Every test checks behaviour end to end."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import torch
import yaml
from conftest import SPECS

from blockgraph import builder
from blockgraph.builder import SpecError
from blockgraph.builder.schema import spec_schema
from blockgraph.builder.source import MAX_BYTES, MAX_DEPTH, load_text

TINY = SPECS / "tiny_encoder.yaml"


def chain(n: int = 1, width: int = 4) -> dict:
    """x → l0 → l1 → ... (linear layers of one width)."""
    nodes, prev = {}, "x"
    for i in range(n):
        nodes[f"l{i}"] = {"type": "linear", "params": {"in_features": width, "out_features": width}, "in": prev}
        prev = f"l{i}"
    return {"name": "chain", "inputs": {"x": {"shape": ["batch", width]}}, "nodes": nodes, "outputs": prev}


def problems_of(source, overrides: dict | None = None) -> list[builder.Problem]:
    """The problems of a spec that must fail before any weight exists."""
    with pytest.raises(SpecError) as info:
        builder.build(source, device="meta", overrides=overrides)
    return info.value.problems


def one_problem(source, overrides: dict | None = None) -> builder.Problem:
    found = problems_of(source, overrides)
    assert len(found) == 1, "\n".join(map(str, found))
    return found[0]


def line_of(path: Path, needle: str) -> int:
    """The 1-based line of the first line of `path` containing `needle`."""
    for number, text in enumerate(path.read_text().splitlines(), 1):
        if needle in text:
            return number
    raise AssertionError(f"{needle!r} not in {path}")


# --- repeat -------------------------------------------------------------------------------------------------------

STACK = """
name: stack
vars: {d: 4, layers: 3}
inputs:
  x: {shape: [batch, "${d}"]}
  memory: {shape: [batch, "${d}"]}
blocks:
  layer:
    inputs: [h, memory]
    nodes:
      mix: {type: add, in: [h, memory]}
      lin: {type: linear, params: {in_features: "${d}", out_features: "${d}"}, in: mix}
    outputs: lin
nodes:
  stack: {type: layer, repeat: "${layers}", in: {h: x, memory: memory}}
outputs: stack
"""


def test_repeat_makes_independent_copies_chained_with_side_inputs_to_every_copy(write_spec):
    model = builder.build(write_spec(STACK))
    weights = [k for k in model.state_dict() if k.endswith("weight")]
    assert weights == [f"stack.{i}.lin.proj.weight" for i in range(3)]
    assert not torch.equal(model.stack[0].lin.proj.weight, model.stack[1].lin.proj.weight)
    x, memory = torch.randn(2, 4), torch.randn(2, 4)
    expected = x
    for copy_ in model.stack.values() if isinstance(model.stack, torch.nn.ModuleDict) else model.stack:
        expected = copy_["lin"](expected + memory)
    torch.testing.assert_close(model(x, memory), expected)
    assert "memory" in model.code and model.code.count("memory") >= 4  # passed to each of the 3 copies


def test_repeat_of_a_block_feeds_its_first_port_and_every_copy_gets_the_others():
    spec = chain(0)
    spec["inputs"]["m"] = {"shape": ["batch", 4]}
    spec["nodes"] = {"acc": {"type": "add", "in": ["x", "m"], "repeat": 4}}
    spec["outputs"] = "acc"
    model = builder.build(spec)
    x, m = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(model(x, m), x + 4 * m)
    assert len(model.typed_graph.graph.nodes) == 4


def test_repeat_count_comes_from_a_variable_and_follows_overrides(write_spec):
    path = write_spec(STACK)
    assert len(builder.build(path, overrides={"layers": 5}).stack) == 5
    one = builder.build(path, overrides={"layers": 1})
    assert [k for k in one.state_dict() if k.endswith("weight")] == ["stack.0.lin.proj.weight"]


@pytest.mark.parametrize("value", [0, -1, "three", True, 2.5, 10_001, "${layers - 5}", "${layers / 2}"])
def test_bad_repeat_values_are_one_located_error(write_spec, value):
    spec = yaml.safe_load(STACK)
    spec["nodes"]["stack"]["repeat"] = value
    path = write_spec(spec)
    problem = one_problem(path)
    assert problem.location.path[:3] == ("nodes", "stack", "repeat")
    assert problem.location.line == line_of(path, "repeat:")
    assert "found" in problem.message


def test_nested_repeats_that_multiply_out_of_reach_are_stopped(write_spec, monkeypatch):
    monkeypatch.setattr(builder.graph, "MAX_EXPANDED", 500)  # the real limit (100,000) takes seconds to reach
    spec = yaml.safe_load(STACK)
    spec["blocks"]["outer"] = {"inputs": ["h", "m"], "nodes": {"s": {"type": "layer", "repeat": 40, "in": ["h", "m"]}}}
    spec["blocks"]["outer"]["outputs"] = "s"
    spec["nodes"]["stack"] = {"type": "outer", "repeat": 40, "in": ["x", "memory"]}
    problem = one_problem(write_spec(spec))
    assert "the graph expands to more than 500 blocks and sub-graphs" in problem.message
    assert problem.location.path[-1] == "repeat"


def test_bad_repeat_inside_a_sub_graph_is_located_there(write_spec):
    spec = yaml.safe_load(STACK)
    spec["blocks"]["layer"]["nodes"]["lin"]["repeat"] = "${d - 10}"
    path = write_spec(spec)
    problem = one_problem(path)
    assert "repeat must be an integer from 1 to 10000; found -6" in problem.message
    assert problem.location.path == ("blocks", "layer", "nodes", "lin", "repeat")


# --- sub-graphs ---------------------------------------------------------------------------------------------------

NESTED = """
name: nested
vars: {d: 8, mult: 2, width: 999}
inputs:
  x: {shape: [batch, seq, "${d}"]}
blocks:
  mlp:                                   # level 3
    inputs: [h]
    params: {width: "${d}", hidden: "${width * mult}"}
    nodes:
      up: {type: linear, params: {in_features: "${width}", out_features: "${hidden}"}, in: h}
      down: {type: linear, params: {in_features: "${hidden}", out_features: "${width}"}, in: up}
    outputs: down
  pair:                                  # level 2
    inputs: [h]
    params: {width: 8, mult: 3}          # mult here is pair's own param: mlp never sees it
    nodes:
      a: {type: mlp, params: {width: "${width}"}, in: h}
      b: {type: mlp, params: {width: "${width}", hidden: "${mult}"}, in: a}
    outputs: b
  tower:                                 # level 1
    inputs: [h]
    params: {width: 8}
    nodes:
      p: {type: pair, params: {width: "${width}"}, in: h, repeat: 2}
    outputs: p
nodes:
  t: {type: tower, in: x}
outputs: t
"""


def test_sub_graphs_nest_three_levels_with_params_defaults_and_overrides(write_spec):
    model = builder.build(write_spec(NESTED))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.endswith("weight")}
    # mlp's default `hidden: ${width * mult}` sees its own use-site width (8) and the spec's mult (2)
    assert shapes["t.p.0.a.up.proj.weight"] == (16, 8)
    # a use-site value overrides a default; it is evaluated where it is written (pair's mult = 3)
    assert shapes["t.p.1.b.up.proj.weight"] == (3, 8)
    # the sub-graph param `width` shadows the spec variable `width: 999`
    assert shapes["t.p.1.b.down.proj.weight"] == (8, 3)
    assert len(shapes) == 8
    x = torch.randn(2, 5, 8)
    m = dict(model.named_modules())
    expected = x
    for i in range(2):
        for half in "ab":
            expected = m[f"t.p.{i}.{half}.down"](m[f"t.p.{i}.{half}.up"](expected))
    torch.testing.assert_close(model(x), expected)


def test_param_default_sees_the_use_site_value_of_another_param(write_spec):
    spec = yaml.safe_load(NESTED)
    spec["nodes"]["t"] = {"type": "mlp", "params": {"width": 4}, "in": "x"}
    spec["inputs"]["x"]["shape"] = ["batch", 4]
    model = builder.build(write_spec(spec))
    assert tuple(model.t.up.proj.weight.shape) == (8, 4)  # hidden = width * mult = 4 * 2


def test_sub_graph_unknown_param_has_did_you_mean(write_spec):
    spec = yaml.safe_load(NESTED)
    spec["nodes"]["t"]["params"] = {"widht": 8}
    path = write_spec(spec)
    problem = one_problem(path)
    assert "sub-graph 'tower' has no parameter 'widht'" in problem.message
    assert problem.hint == "did you mean 'width'?"
    assert problem.location.line == line_of(path, "widht")


def test_sub_graph_that_uses_itself_is_an_error(write_spec):
    spec = yaml.safe_load(NESTED)
    spec["blocks"]["mlp"]["nodes"]["down"]["type"] = "tower"
    problem = one_problem(write_spec(spec))
    assert "sub-graph 'tower' uses itself: tower → pair → mlp → tower" in problem.message


def test_sub_graph_output_refers_to_a_missing_node(write_spec):
    spec = yaml.safe_load(NESTED)
    spec["blocks"]["mlp"]["outputs"] = "dwn"
    problem = one_problem(write_spec(spec))
    assert "'dwn' is not a node or input here" in problem.message and problem.hint == "did you mean 'down'?"
    assert problem.location.path == ("blocks", "mlp", "outputs")


# --- vars and expressions -----------------------------------------------------------------------------------------


def test_vars_keep_their_types_and_do_arithmetic(write_spec):
    spec = chain(1, width=8)
    spec["vars"] = {
        "d_model": 8,
        "heads": 2,
        "ff": "${d_model * 4}",
        "d_k": "${d_model // heads}",
        "ratio": "${d_model / heads}",
        "bias": False,
        "label": "w${d_model}-h${heads}",
        "dims": ["batch", "${d_model}"],
        "deep": "${ff + d_k}",
    }
    spec["inputs"]["x"]["shape"] = "${dims}"
    spec["nodes"]["l0"]["params"] = {"in_features": "${d_model}", "out_features": "${deep}", "bias": "${bias}"}
    spec["description"] = "${label}"
    valid = builder.load_spec(spec)
    values = valid.spec.vars
    assert values["ff"] == 32 and type(values["ff"]) is int
    assert values["d_k"] == 4 and type(values["d_k"]) is int
    assert values["ratio"] == 4.0 and type(values["ratio"]) is float
    assert values["bias"] is False and values["label"] == "w8-h2" and values["deep"] == 36
    assert valid.spec.description == "w8-h2" and valid.spec.inputs["x"].shape == ["batch", 8]
    model = builder.build(valid)
    assert model.l0.proj.out_features == 36 and model.l0.proj.bias is None


def test_a_cycle_of_vars_is_one_error_naming_the_cycle(write_spec):
    spec = chain(1)
    spec["vars"] = {"a": "${b + 1}", "b": "${c}", "c": "${a * 2}", "ok": 1}
    path = write_spec(spec)
    problem = one_problem(path)
    assert "variables refer to each other in a cycle: a → b → c → a" in problem.message
    assert problem.location.path == ("vars", "a") and problem.location.line is not None


def test_an_unknown_var_is_reported_at_the_var_that_uses_it_with_did_you_mean(write_spec):
    spec = chain(1)
    spec["vars"] = {"width": 4, "uses": "${widht * 2}", "other": "${uses}"}
    spec["nodes"]["l0"]["params"]["in_features"] = "${other // 2}"
    path = write_spec(spec)
    problem = one_problem(path)  # once: not again at `other` nor at the node that uses it
    assert "unknown variable 'widht'" in problem.message and problem.hint == "did you mean 'width'?"
    assert problem.location.path == ("vars", "uses")
    assert problem.location.line == line_of(path, "uses:")


SENTINEL = "blockgraph_pwned"


@pytest.mark.parametrize(
    "expression",
    [
        f"${{__import__('os').system('touch {SENTINEL}')}}",
        f"${{open('{SENTINEL}', 'w')}}",
        "${x.__class__}",
        "${x.__class__.__mro__[1].__subclasses__()}",
        "${(lambda: 1)()}",
        "${[i for i in range(10)]}",
        "${(i for i in [1, 2])}",
        "${10**100000}",
        "${9**9**9}",
        "${'a' * 10**9}",
        "${[0] * 10**15}",
        "${'%0999999999d' % 1}",
        "${" + "+".join(["1"] * 5000) + "}",
        "${" + "-" * 5000 + "1}",
        "${int('9' * 5000)}",
        "${1/0}",
        "${round(5, -10**8)}",
        "${min()}",
        "${exec('1')}",
        "${getattr(x, 'real')}",
        "${x if x else}",
    ],
)
def test_unsafe_or_broken_expressions_are_clean_errors_and_nothing_runs(expression, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = chain(1)
    spec["vars"] = {"x": 4, "evil": expression}
    problem = one_problem(spec)
    assert problem.location.path == ("vars", "evil")
    assert len(problem.message) < 700
    assert not (tmp_path / SENTINEL).exists()


def test_variables_cannot_multiply_into_a_billion_values():
    spec = chain(1)
    spec["vars"] = {"a": [1] * 10}
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        spec["vars"][name] = [f"${{{prev}}}"] * 10  # 10**9 values if expanded
    spec["vars"]["s"] = "x" * 8000
    spec["vars"]["t"] = "${s}${s}"
    found = problems_of(spec)
    messages = " | ".join(p.message for p in found)
    assert "expands to more than 200,000 items" in messages and "string over 10,000 characters" in messages


def test_long_chains_of_vars_end_in_an_error_not_a_recursion_crash():
    spec = chain(1)
    spec["vars"] = {f"v{i}": f"${{v{i + 1}}}" for i in range(500)} | {"v500": 4}
    spec["nodes"]["l0"]["params"]["in_features"] = "${v0}"
    assert any("more than 64 levels deep" in p.message for p in problems_of(spec))


# --- overrides ----------------------------------------------------------------------------------------------------


def test_api_overrides_are_typed_and_unknown_names_suggest():
    model = builder.build(TINY, device="meta", overrides={"d_model": 32, "heads": 2, "layers": 1})
    graph = model.typed_graph.graph
    assert graph.nodes["encoder.0.attn"].params.d_model == 32 and len(model.encoder) == 1
    problem = one_problem(TINY, overrides={"layres": 3})
    assert "the spec has no variable 'layres'" in problem.message and problem.hint == "did you mean 'layers'?"


def test_cli_set_values_are_typed(run_cli, write_spec):
    spec = chain(1)
    spec["vars"] = {"width": 4, "bias": False, "scale": 0.5}
    spec["inputs"]["x"]["shape"] = ["batch", "${width}"]
    spec["nodes"]["l0"]["params"] = {"in_features": "${width}", "out_features": "${width}", "bias": "${bias}"}
    spec["description"] = "scale ${scale}"
    path = write_spec(spec)
    result = run_cli("validate", path, "--resolved", "json", "--set", "width=32", "--set", "bias=true")
    assert result.code == 0, result.stderr
    resolved = json.loads(result.stdout)
    params = resolved["nodes"]["l0"]["params"]
    assert params["in_features"] == 32 and params["bias"] is True
    tiny = run_cli("validate", TINY, "--resolved", "json", "--set", "d_model=32", "--set", "layers=1")
    resolved_tiny = json.loads(tiny.stdout)
    attn = resolved_tiny["blocks"]["encoder_block"]["nodes"]["attn"]
    assert attn["params"]["d_model"] == 32 and resolved_tiny["nodes"]["encoder"]["repeat"] == 1


def test_cli_unknown_set_name_is_exit_1_with_did_you_mean(run_cli):
    result = run_cli("validate", TINY, "--set", "d_modle=32")
    assert result.code == 1 and result.exception is None
    assert "no variable 'd_modle'" in result.stderr and "did you mean 'd_model'" in result.stderr


# --- extends ------------------------------------------------------------------------------------------------------

BASE = """
name: base
vars: {w: 4, spare: 1}
inputs:
  x: {shape: [batch, "${w}"]}
nodes:
  a: {type: linear, params: {in_features: "${w}", out_features: "${w}"}, in: x}
  b: {type: linear, params: {in_features: "${w}", out_features: "${w}", bias: true}, in: a}
outputs: b
"""


def test_extends_merges_mappings_replaces_values_and_null_deletes(tmp_path):
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "base.yaml").write_text(BASE)
    child = tmp_path / "child.yaml"
    child.write_text(
        "extends: common/base.yaml\nname: child\nvars: {w: 8, spare: null}\nnodes:\n  b: {params: {bias: false}}\n"
    )
    valid = builder.load_spec(child)
    assert valid.spec.name == "child" and valid.spec.vars == {"w": 8}
    b = valid.spec.nodes["b"]
    assert b.type == "linear" and b.inputs == "a" and b.params == {"in_features": 8, "out_features": 8, "bias": False}
    grandchild = tmp_path / "sub" / "grand.yaml"
    grandchild.parent.mkdir()
    grandchild.write_text("extends: ../child.yaml\nname: grand\nnodes: {b: null}\noutputs: a\n")
    with pytest.raises(SpecError, match="leads outside the spec's folder"):  # the safe default (docs/security.md)
        builder.build(grandchild)
    model = builder.build(grandchild, allow_external_files=True)
    assert list(model.state_dict()) == ["a.proj.weight", "a.proj.bias"] and model.a.proj.in_features == 8


def test_errors_point_into_the_file_that_holds_the_mistake(tmp_path):
    (tmp_path / "base.yaml").write_text(BASE.replace("in: a}", "in: aa}"))
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\nname: child\nnodes:\n  a: {params: {out_features: 0}}\n")
    found = problems_of(child)
    by_file = {Path(p.location.file).name: p for p in found}
    assert set(by_file) == {"base.yaml", "child.yaml"}
    assert by_file["child.yaml"].location.line == 4 and "greater than 0" in by_file["child.yaml"].message
    assert by_file["base.yaml"].location.line == line_of(tmp_path / "base.yaml", "in: aa")


def test_a_cycle_of_extends_is_reported(tmp_path):
    (tmp_path / "one.yaml").write_text("extends: two.yaml\nname: one\n")
    (tmp_path / "two.yaml").write_text("name: two\nextends: three.yaml\n")
    (tmp_path / "three.yaml").write_text("extends: one.yaml\nname: three\n")
    problem = one_problem(tmp_path / "one.yaml")
    assert "extends forms a cycle: one.yaml → two.yaml → three.yaml → one.yaml" in problem.message
    (tmp_path / "self.yaml").write_text("name: self\nextends: ./self.yaml\n")
    assert "cycle" in one_problem(tmp_path / "self.yaml").message


def test_a_missing_or_unusable_base_is_reported_at_the_extends_line(tmp_path):
    child = tmp_path / "child.yaml"
    for target, fragment in [("nothere.yaml", "not found"), (".", "directory"), ("list.yaml", "not a mapping")]:
        (tmp_path / "list.yaml").write_text("- 1\n")
        child.write_text(f"name: child\n\nextends: {target}\n")
        problem = one_problem(child)
        assert fragment in problem.message
        assert (Path(problem.location.file).name, problem.location.line) == ("child.yaml", 3)


# --- weight tying and sharing -------------------------------------------------------------------------------------


def tied_tiny(write_spec) -> Path:
    spec = yaml.safe_load(TINY.read_text())
    spec["vars"]["dropout"] = 0.0
    spec["tie"] = {"generator.proj.weight": "embed.lut.weight"}
    return write_spec(spec)


def test_tie_shares_one_tensor_and_its_gradient(write_spec):
    untied = builder.build(TINY, overrides={"dropout": 0.0}).eval()
    tied = builder.build(tied_tiny(write_spec)).eval()
    assert tied.generator.proj.weight is tied.embed.lut.weight
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(untied) - count(tied) == 1000 * 64
    assert "generator.proj.weight" not in dict(tied.named_parameters())
    with torch.no_grad():  # same values, so both models compute the same function
        untied.generator.proj.weight.copy_(untied.embed.lut.weight)
    tied.load_state_dict(untied.state_dict())
    tokens = torch.randint(0, 1000, (2, 5))
    untied(tokens).sum().backward()
    tied(tokens).sum().backward()
    expected = untied.embed.lut.weight.grad + untied.generator.proj.weight.grad
    torch.testing.assert_close(tied.embed.lut.weight.grad, expected)


@pytest.mark.parametrize(
    ("target", "source", "fragment"),
    [
        ("generator.proj.weight", "embed.lut.wieght", "has no attribute"),
        ("embed.lut.weight", "generator.proj.weight", "is itself tied to"),
        ("generator.proj.weight", "embedd.lut.weight", "has no attribute"),
        ("generator.proj.bias", "embed.lut.weight", "shapes differ"),
    ],
)
def test_tie_errors_are_located_at_the_tie(write_spec, run_cli, target, source, fragment):
    spec = yaml.safe_load(TINY.read_text())
    spec["tie"] = {target: source}
    if source == "generator.proj.weight":  # a chain: embed → generator → embed's old tensor
        spec["tie"]["generator.proj.weight"] = "encoder.0.attn.w_q.weight"
    path = write_spec(spec)
    result = run_cli("validate", path)
    assert result.code == 1 and result.exception is None
    assert fragment in result.stderr
    assert f"spec.yaml:{line_of(path, target)}" in " ".join(result.stderr.split())


def test_share_reuses_the_owners_module():
    spec = chain(2)
    spec["nodes"]["l1"] = {"type": "linear", "share": "l0", "in": "l0"}
    model = builder.build(spec)
    assert list(model.state_dict()) == ["l0.proj.weight", "l0.proj.bias"]
    x = torch.randn(3, 4)
    torch.testing.assert_close(model(x), model.l0(model.l0(x)))
    same = chain(2)
    same["nodes"]["l1"]["share"] = "l0"  # identical params may be repeated
    assert list(builder.build(same).state_dict()) == ["l0.proj.weight", "l0.proj.bias"]


@pytest.mark.parametrize(
    ("l1", "fragment", "key"),
    [
        ({"type": "layer_norm", "params": {"dim": 4}, "share": "l0"}, "is a 'linear' block", "share"),
        ({"type": "linear", "params": {"in_features": 4, "out_features": 4, "bias": False}}, "params differ", "params"),
        ({"type": "linear", "share": "l9"}, "'l9' is not a block node at this level", "share"),
        ({"type": "linear", "share": "x"}, "'x' is not a block node at this level", "share"),
        ({"type": "linear", "share": "l1"}, "cycle: l1 → l1 (through share:)", "share"),
    ],
)
def test_share_errors(l1, fragment, key):
    spec = chain(2)
    l1 = {"in": "l0", "share": "l0", **l1}
    spec["nodes"]["l1"] = l1
    problem = one_problem(spec)
    assert fragment in problem.message
    assert problem.location.path == ("nodes", "l1", key)


# --- inputs and outputs -------------------------------------------------------------------------------------------

IO = """
name: io
inputs:
  x: {shape: [batch, seq, 8]}
  memory: {shape: [batch, src, 8]}
  pad: {dtype: bool, shape: [batch, src], optional: true}
nodes:
  attn: {type: multi_head_attention, params: {d_model: 8, heads: 2}, in: {query: x, key: memory, key_padding_mask: pad}}
  norm: {type: layer_norm, params: {dim: 8}, in: attn}
outputs: {attended: attn, normed: norm}
"""


def test_several_inputs_optional_ones_absent_and_a_dict_of_outputs(write_spec):
    model = builder.build(write_spec(IO)).eval()
    x, memory = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    out = model(x, memory)
    assert set(out) == {"attended", "normed"} and out["attended"].shape == (2, 3, 8)
    torch.testing.assert_close(out["normed"], model.norm(out["attended"]))
    pad = torch.zeros(2, 5, dtype=torch.bool)
    torch.testing.assert_close(model(x, memory, pad)["attended"], out["attended"])
    pad[:, 3:] = True
    masked = model(x, memory, pad=pad)["attended"]
    assert not torch.allclose(masked, out["attended"])
    changed = memory.clone()
    changed[:, 3:] = 100.0
    torch.testing.assert_close(model(x, changed, pad)["attended"], masked)  # padded keys are ignored


def test_one_output_is_a_tensor(write_spec):
    spec = yaml.safe_load(IO)
    spec["outputs"] = "norm"
    out = builder.build(write_spec(spec))(torch.randn(1, 2, 8), torch.randn(1, 4, 8))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 2, 8)


def test_a_required_port_fed_by_an_optional_input_is_an_error(write_spec):
    spec = yaml.safe_load(IO)
    spec["inputs"]["memory"]["optional"] = True  # feeds `key`, an optional port: fine
    assert builder.build(write_spec(spec))(torch.randn(1, 2, 8))["normed"].shape == (1, 2, 8)
    spec["inputs"]["x"]["optional"] = True
    problem = one_problem(write_spec(spec))
    assert "required input 'query' of 'multi_head_attention' is fed by 'x', an optional input" in problem.message


def test_a_sub_graph_input_left_unconnected_is_none_for_optional_ports_only(write_spec):
    spec = yaml.safe_load(TINY.read_text())
    spec["nodes"]["encoder"]["in"] = {"x": "position"}  # no pad: attention gets key_padding_mask=None
    model = builder.build(write_spec(spec), overrides={"dropout": 0.0}).eval()
    tokens = torch.randint(0, 1000, (2, 5))
    assert model(tokens).shape == (2, 5, 1000)
    spec["nodes"]["encoder"]["in"] = {"pad": "pad"}  # no x: the required query port gets nothing
    found = problems_of(write_spec(spec, "no_x.yaml"))
    assert any("required input 'query' of 'multi_head_attention' is not connected" in p.message for p in found)
    passthrough = chain(1)
    passthrough["blocks"] = {"same": {"inputs": ["h"], "nodes": {}, "outputs": "h"}}
    passthrough["nodes"]["p"] = {"type": "same"}
    passthrough["outputs"] = "p"
    assert "has no value: it comes from an input that is not connected" in one_problem(passthrough).message


def test_an_optional_input_cannot_be_an_output():
    spec = chain(1)
    spec["inputs"]["mask"] = {"shape": ["batch", 4], "optional": True}
    spec["outputs"] = {"y": "l0", "mask": "mask"}
    problem = one_problem(spec)
    assert "output 'mask' is 'mask', an optional input" in problem.message


@pytest.mark.parametrize("name", ["training", "forward", "state_dict", "code", "items"])
def test_node_names_taken_by_torch_modules_are_errors(name):
    spec = chain(1)
    spec["nodes"] = {name: spec["nodes"]["l0"]}
    spec["outputs"] = name
    problem = one_problem(spec)
    assert f"node name {name!r} is taken" in problem.message and problem.location.path == ("nodes", name)
    nested = chain(1)
    nested["blocks"] = {"wrap": {"inputs": ["h"], "nodes": {name: {**nested["nodes"]["l0"], "in": "h"}}}}
    nested["blocks"]["wrap"]["outputs"] = name
    nested["nodes"]["l0"] = {"type": "wrap", "in": "x"}
    assert f"node name {name!r} is taken" in one_problem(nested).message


@pytest.mark.parametrize("name", ["class", "self", "None", "_m", "_private"])
def test_input_names_must_be_usable_as_forward_arguments(name):
    spec = chain(1)
    spec["inputs"] = {name: spec["inputs"]["x"]}
    spec["nodes"]["l0"]["in"] = name
    problem = one_problem(spec)
    assert f"input name {name!r} cannot be a parameter of forward()" in problem.message
    assert problem.location.path == ("inputs", name)


# --- symbolic shapes ----------------------------------------------------------------------------------------------

SHAPES = """
name: shapes
inputs:
  src: {shape: [batch, src_len, 8]}
  tgt: {shape: [batch, tgt_len, 8]}
nodes:
  enc: {type: linear, params: {in_features: 8, out_features: 8}, in: src}
  dec: {type: linear, params: {in_features: 8, out_features: 8}, in: tgt}
  both: {type: add, in: [enc, dec]}
outputs: both
"""


def test_symbolic_dimensions_flow_through(write_spec):
    spec = yaml.safe_load(SHAPES)
    spec["nodes"]["both"]["in"] = ["enc", "enc"]
    spec["nodes"]["cross"] = {
        "type": "multi_head_attention",
        "params": {"d_model": 8, "heads": 2},
        "in": {"query": "dec", "key": "enc"},
    }
    spec["outputs"] = {"both": "both", "cross": "cross"}
    typed = builder.typed_graph(spec)
    graph = typed.graph
    assert [str(d) for d in typed.types[graph.outputs["both"]].shape] == ["batch", "src_len", "8"]
    assert [str(d) for d in typed.types[graph.outputs["cross"]].shape] == ["batch", "tgt_len", "8"]


def test_a_shape_contradiction_names_both_shapes_and_both_nodes(write_spec):
    path = write_spec(SHAPES)
    problem = one_problem(path)
    for fragment in ("[batch, src_len, 8]", "[batch, tgt_len, 8]", "'enc'", "'dec'"):
        assert fragment in problem.message
    assert problem.node == "both" and problem.location.line == line_of(path, "both:")


# --- many errors at once, warnings --------------------------------------------------------------------------------

THREE_MISTAKES = """
name: three
inputs:
  x: {shape: [batch, 4]}
nodes:
  a: {type: linear, params: {in_features: 4, out_features: -1}, in: x}
  b: {type: linear, params: {in_features: 4, out_features: 4, bias: maybe}, in: a}
  c: {type: linear, params: {in_features: 4, out_feature: 4}, in: b}
outputs: c
"""


def test_independent_errors_are_reported_together_each_at_its_line(write_spec, run_cli):
    path = write_spec(THREE_MISTAKES)
    found = problems_of(path)
    lines = {p.location.line for p in found}
    assert {line_of(path, "a:"), line_of(path, "b:"), line_of(path, "c:")} <= lines
    assert {p.node for p in found} == {"a", "b", "c"}
    result = run_cli("validate", path)
    assert result.code == 1 and result.stderr.count("spec.yaml:") >= 3


def test_warnings_pass_validate_but_fail_strict(write_spec, run_cli):
    spec = chain(2)
    spec["outputs"] = "l0"
    spec["inputs"]["unused_input"] = {"shape": ["batch", 4]}
    spec["vars"] = {"unused_var": 3}
    path = write_spec(spec)
    relaxed = run_cli("validate", path)
    assert relaxed.code == 0, relaxed.stderr
    for fragment in ("'l1' does not contribute", "'unused_input' is not used", "'unused_var' is never used"):
        assert fragment in relaxed.stderr
    strict = run_cli("validate", path, "--strict")
    assert strict.code == 1 and strict.exception is None and "'unused_var' is never used" in strict.stderr


# --- the resolved view --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_validate_resolved_prints_a_substituted_standalone_spec(run_cli, fmt):
    result = run_cli("validate", TINY, "--resolved", fmt)
    assert result.code == 0, result.stderr
    data = json.loads(result.stdout) if fmt == "json" else yaml.safe_load(result.stdout)
    assert data["nodes"]["encoder"] == {"type": "encoder_block", "in": {"x": "position", "pad": "pad"}, "repeat": 2}
    attn = data["blocks"]["encoder_block"]["nodes"]["attn"]
    assert attn["type"] == "multi_head_attention"
    assert attn["params"]["d_model"] == 64 and attn["params"]["heads"] == 4 and attn["params"]["dropout"] == 0.1
    assert attn["in"] == {"query": "x", "key_padding_mask": "pad"}
    assert "${" not in result.stdout and "vars" not in data


# --- JSON Schema --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def schema() -> dict:
    return spec_schema()


@pytest.fixture(scope="module")
def validator(schema) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(schema)


def test_schema_command_prints_a_valid_draft_2020_12_schema(run_cli, schema):
    result = run_cli("schema")
    assert result.code == 0
    printed = json.loads(result.stdout)
    jsonschema.Draft202012Validator.check_schema(printed)
    assert printed["$schema"].endswith("2020-12/schema")


def test_every_shipped_spec_validates_against_the_schema(validator):
    specs = sorted(SPECS.glob("*.yaml")) + sorted(SPECS.glob("*.json"))
    assert specs
    for path in specs:
        data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
        if "extends" in data:  # a child spec is partial: check it merged with its base
            data = builder.load_spec(path).standalone
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(data)]
        assert errors == [], path.name


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s["nodes"]["generator"]["params"].update(vocab="eight"),
        lambda s: s["blocks"]["encoder_block"]["nodes"]["attn"]["params"].update(heads="eight"),
        lambda s: s["nodes"]["embed"]["params"].update(vocabulary=3),
        lambda s: s["nodes"]["embed"].update(parms={}),
        lambda s: s["inputs"]["tokens"].update(shape=["batch", -1]),
    ],
)
def test_schema_rejects_bad_specs(validator, mutate):
    data = yaml.safe_load(TINY.read_text())
    assert validator.is_valid(data)
    mutate(data)
    assert not validator.is_valid(data)


# --- safe loading -------------------------------------------------------------------------------------------------

GOOD_TAIL = (
    "inputs: {x: {shape: [batch, 4]}}\n"
    "nodes: {a: {type: linear, params: {in_features: 4, out_features: 4}, in: x}}\n"
    "outputs: a\n"
)


@pytest.mark.parametrize(
    "tag",
    [
        "!!python/object/apply:os.system ['true']",
        "!!python/name:os.system",
        "!!python/object:builtins.dict {}",
        "!!binary aGk=",
    ],
)
def test_python_and_binary_tags_are_refused(write_spec, tag):
    path = write_spec(f"name: tags\nvars:\n  v: {tag}\n{GOOD_TAIL}")
    problem = one_problem(path)
    assert "is not allowed" in problem.message and problem.location.line == 3


def test_duplicate_keys_name_both_lines(write_spec):
    path = write_spec(f"name: dup\nvars:\n  w: 4\n  d: 2\n  w: 8\n{GOOD_TAIL}")
    problem = one_problem(path)
    assert "duplicate key 'w' (first defined on line 3)" in problem.message and problem.location.line == 5


def test_a_billion_laughs_is_refused_instead_of_expanded(write_spec, run_cli):
    lines = ["name: lol", "vars:", "  l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 9)]
    path = write_spec("\n".join(lines) + "\n" + GOOD_TAIL)
    result = run_cli("validate", path)  # finishing at all (quickly, without eating memory) is the point
    assert result.code == 1 and result.exception is None
    assert "expands to more than" in result.stderr


def test_too_deep_and_too_large_files_are_refused(write_spec):
    deep = write_spec("name: deep\nvars: {v: " + "[" * (MAX_DEPTH + 5) + "]" * (MAX_DEPTH + 5) + "}\n" + GOOD_TAIL)
    assert "nested deeper than" in one_problem(deep).message
    very_deep = write_spec("name: deep\nvars: {v: " + "[" * 50_000 + "]" * 50_000 + "}\n", "very_deep.yaml")
    assert "nested deeper than" in one_problem(very_deep).message
    large = write_spec("name: big\n# " + "x" * MAX_BYTES + "\n", "large.yaml")
    assert "the limit is" in one_problem(large).message


def test_non_utf8_bytes_are_reported_with_their_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"name: x\ndescription: caf\xe9\n" + GOOD_TAIL.encode())
    problem = one_problem(path)
    assert "not UTF-8" in problem.message and problem.location.line == 2


def test_control_characters_are_reported_with_their_line(tmp_path):
    path = tmp_path / "ctrl.yaml"
    path.write_text("name: x\n\ndescription: 'a\x07b'\n" + GOOD_TAIL)
    problem = one_problem(path)
    assert "U+0007" in problem.message and problem.location.line == 3


def test_json_specs_work_and_json_syntax_errors_have_line_and_column(tmp_path):
    data = yaml.safe_load(TINY.read_text())
    good = tmp_path / "tiny.json"
    good.write_text(json.dumps(data, indent=2))
    model = builder.build(good, overrides={"layers": 1})
    assert "encoder.0.attn.w_q.weight" in model.state_dict()
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "name": "x",\n  "vars": {"a": 1,}\n}\n')
    problem = one_problem(bad)
    assert "JSON syntax error" in problem.message
    assert (problem.location.line, problem.location.column) == (3, 18)  # the trailing comma
    assert "comma after the last item" in problem.hint
    typo = copy.deepcopy(data)
    typo["nodes"]["embed"]["params"]["vocabb"] = 3
    located = tmp_path / "typo.json"
    located.write_text(json.dumps(typo, indent=2))
    problem = one_problem(located)
    assert "unknown key 'vocabb'" in problem.message and problem.location.line == line_of(located, "vocabb")


def test_yaml_errors_point_at_the_line(write_spec):
    tabs = write_spec("name: tabs\ninputs:\n\tx: {shape: [batch, 4]}\n")
    problem = one_problem(tabs)
    assert problem.location.line == 3 and "tabs" in problem.hint
    two = write_spec(f"name: two\n{GOOD_TAIL}---\nname: three\n", "two.yaml")
    problem = one_problem(two)
    assert "one YAML document" in problem.message and problem.location.line == 5


def test_load_text_reports_every_bad_input_as_a_spec_error():
    for text in ["a: 1\x00", "a: \ud800", "a: " + "1" * 5000, "? [a]\n: 1\n", "a: !!set {x}\n", "[" * 100_000]:
        with pytest.raises(SpecError):
            load_text(text, "t.yaml")
    with pytest.raises(SpecError, match="nested deeper"):
        load_text("[" * 100_000 + "]" * 100_000, "t.json", json_syntax=True)
    assert load_text("d: 2024-01-01\n").data == {"d": "2024-01-01"}  # no date objects in specs
