"""Stacks whose copies differ: `${copy}` (the copy's index) in a repeated node's params and type, outputs named
like inputs carried from copy to copy, and `validate --resolved` writing such a stack back as a spec that
builds the same model."""

from __future__ import annotations

import copy as copying

import pytest
import torch
import yaml

from blockgraph import builder
from blockgraph.builder.resolved import per_copy
from blockgraph.common.errors import SpecError

torch.set_num_threads(1)

INPUTS = {"x": {"dtype": "float32", "shape": ["batch", "seq", 8]}}
ATTENTION = {"type": "multi_head_attention", "params": {"d_model": 8, "heads": 2, "causal": True}}


def _spec(nodes: dict, outputs: object, blocks: dict | None = None, inputs: dict | None = None) -> dict:
    spec = {"name": "stack", "vars": {"window": 2}, "dims": {"batch": 2, "seq": 6}, "inputs": inputs or INPUTS}
    return {**spec, "blocks": blocks or {}, "nodes": nodes, "outputs": outputs}


def _build(spec: dict, tmp_path, name: str = "spec.yaml") -> builder.GraphModel:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    torch.manual_seed(0)
    return builder.build(path).eval()


def _same_weights(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Copy `source`'s parameters into `target` in order (the two name them differently)."""
    with torch.no_grad():
        for mine, theirs in zip(target.parameters(), source.parameters(), strict=True):
            mine.copy_(theirs)


def test_a_stack_whose_copies_alternate_a_window_is_the_two_layers_written_out(tmp_path):
    """Copy 0 and 2 attend within the window, copy 1 and 3 everything: as the four layers written one by one."""
    window = {**ATTENTION["params"], "window": "${window if copy % 2 == 0 else None}"}
    stacked = _build(_spec({"layers": {**ATTENTION, "params": window, "repeat": 4, "in": "x"}}, "layers"), tmp_path)
    nodes, previous = {}, "x"
    for index in range(4):
        params = {**ATTENTION["params"], "window": 2 if index % 2 == 0 else None}
        nodes[f"layer{index}"] = {**ATTENTION, "params": params, "in": previous}
        previous = f"layer{index}"
    written = _build(_spec(nodes, previous), tmp_path, "written.yaml")
    _same_weights(stacked, written)
    x = torch.randn(2, 6, 8)
    torch.testing.assert_close(stacked(x=x), written(x=x), rtol=0, atol=0)
    windowed = stacked(x=x)
    with torch.no_grad():  # and the window matters: without it the outputs differ
        unwindowed = _build(_spec({"layers": {**ATTENTION, "repeat": 4, "in": "x"}}, "layers"), tmp_path, "no.yaml")
        _same_weights(stacked, unwindowed)
        assert not torch.allclose(unwindowed(x=x), windowed)


def test_copy_chooses_each_copy_s_sub_graph_and_the_resolved_spec_builds_the_same_model(tmp_path, run_cli):
    """The first copy a plain feed-forward, the later ones gated: state_dict names follow the copies, and
    `validate --resolved` writes the stack so that it builds the very same model."""
    blocks = {
        "plain": {"inputs": ["x"], "nodes": {"ffn": {"type": "linear", "params": {"in_features": 8, "out_features": 8},
                                                     "in": "x"}}, "outputs": "ffn"},
        "gated": {"inputs": ["x"], "nodes": {
            "a": {"type": "linear", "params": {"in_features": 8, "out_features": 8}, "in": "x"},
            "b": {"type": "linear", "params": {"in_features": 8, "out_features": 8}, "in": "x"},
            "both": {"type": "multiply", "in": ["a", "b"]},
        }, "outputs": "both"},
    }  # fmt: skip
    kind = "${'plain' if copy < first else 'gated'}"
    spec = _spec({"layers": {"type": kind, "repeat": 3, "in": "x"}}, "layers", blocks)
    spec["vars"]["first"] = 1
    model = _build(spec, tmp_path)
    names = set(model.state_dict())
    assert {"layers.0.ffn.proj.weight", "layers.1.a.proj.weight", "layers.2.b.proj.bias"} <= names
    assert not any(name.startswith("layers.0.a") for name in names)
    x = torch.randn(2, 6, 8)
    layers = model.layers
    expected = layers[0].ffn(x)
    for index in (1, 2):
        expected = layers[index].a(expected) * layers[index].b(expected)
    torch.testing.assert_close(model(x=x), expected, rtol=0, atol=0)

    result = run_cli("validate", tmp_path / "spec.yaml", "--resolved", "yaml")
    assert result.code == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["nodes"]["layers"]["type"] == "${'plain' if copy < 1 else 'gated'}"
    again = _build(resolved, tmp_path, "resolved.yaml")
    again.load_state_dict(model.state_dict())
    torch.testing.assert_close(again(x=x), model(x=x), rtol=0, atol=0)


def test_an_output_named_like_an_input_is_carried_to_the_next_copy(tmp_path):
    """A running total: each copy adds its output to `total`, which the next copy reads."""
    blocks = {
        "step": {
            "inputs": ["x", "total"],
            "nodes": {
                "lin": {"type": "linear", "params": {"in_features": 8, "out_features": 8}, "in": "x"},
                "sum": {"type": "add", "in": ["total", "lin"]},
            },
            "outputs": {"y": "lin", "total": "sum"},
        }
    }
    inputs = {**INPUTS, "start": {"dtype": "float32", "shape": ["batch", "seq", 8]}}
    nodes = {"layers": {"type": "step", "repeat": 3, "in": {"x": "x", "total": "start"}}}
    model = _build(_spec(nodes, {"y": "layers.y", "total": "layers.total"}, blocks, inputs), tmp_path)
    x, start = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    out = model(x=x, start=start)
    ys, h = [], x
    for layer in model.layers:
        h = layer.lin(h)
        ys.append(h)
    torch.testing.assert_close(out["y"], ys[-1], rtol=0, atol=0)
    torch.testing.assert_close(out["total"], start + ys[0] + ys[1] + ys[2], rtol=1e-6, atol=1e-6)


def test_copies_that_name_their_inputs_otherwise_read_in_by_their_own_ports(tmp_path, run_cli):
    """A list `in:` binds each copy's own ports in order: the second copy's mask is its `n`, not the first's `m`;
    `validate --resolved` writes such an `in:` as the list."""
    blocks = {
        name: {"inputs": ["x", port], "nodes": {"sum": {"type": "add", "in": ["x", port]}}, "outputs": "sum"}
        for name, port in (("first", "m"), ("second", "n"))
    }
    inputs = {**INPUTS, "other": {"dtype": "float32", "shape": ["batch", "seq", 8]}}
    nodes = {"layers": {"type": "${'first' if copy == 0 else 'second'}", "repeat": 3, "in": ["x", "other"]}}
    model = _build(_spec(nodes, "layers", blocks, inputs), tmp_path)
    x, other = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    torch.testing.assert_close(model(x=x, other=other), x + 3 * other, rtol=1e-6, atol=1e-6)

    result = run_cli("validate", tmp_path / "spec.yaml", "--resolved", "yaml")
    assert result.code == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["nodes"]["layers"]["in"] == ["x", "other"]
    again = _build(resolved, tmp_path, "resolved.yaml")
    torch.testing.assert_close(again(x=x, other=other), x + 3 * other, rtol=1e-6, atol=1e-6)


def test_a_stack_of_two_block_types_is_written_back_with_the_params_they_share(tmp_path, run_cli):
    """An RMS norm then a layer norm: each has a parameter the other lacks (offset, bias), which stays its own
    default; the resolved spec validates and builds the same model."""
    nodes = {"norms": {"type": "${'rms_norm' if copy == 0 else 'layer_norm'}", "params": {"dim": 8, "eps": 1e-3},
                       "repeat": 2, "in": "x"}}  # fmt: skip
    model = _build(_spec(nodes, "norms"), tmp_path)
    result = run_cli("validate", tmp_path / "spec.yaml", "--resolved", "yaml")
    assert result.code == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["nodes"]["norms"]["params"] == {"dim": 8, "eps": 1e-3}
    again = _build(resolved, tmp_path, "resolved.yaml")
    graph, rebuilt = model.typed_graph.graph, again.typed_graph.graph
    assert {n: i.params for n, i in rebuilt.nodes.items()} == {n: i.params for n, i in graph.nodes.items()}


def test_stacks_whose_copies_differ_nested_out_of_reach_are_stopped_while_resolving(tmp_path, monkeypatch):
    """Each outer copy gives its sub-graph other params, so each resolves its inner stack anew: 40 × 40 copies
    (10,000 × 10,000 would take hours before the graph's own limit is reached) stop at the limit, once."""
    monkeypatch.setattr(builder.resolve, "MAX_COPIES", 500)  # the real limit (100,000) takes seconds to reach
    inner = {"type": "dropout", "params": {"p": "${(outer * 40 + copy) / 10000}"}, "repeat": 40, "in": "h"}
    blocks = {"g": {"inputs": ["h"], "params": {"outer": 0}, "nodes": {"inner": inner}, "outputs": "inner"}}
    nodes = {"stack": {"type": "g", "params": {"outer": "${copy}"}, "repeat": 40, "in": "x"}}
    path = tmp_path / "nested.yaml"
    path.write_text(yaml.safe_dump(_spec(nodes, "stack", blocks)), encoding="utf-8")
    with pytest.raises(SpecError) as caught:
        builder.load_spec(path)
    [problem] = caught.value.problems
    assert "more than 500 copies" in problem.message
    assert problem.location.path == ("blocks", "g", "nodes", "inner", "repeat")


def test_copy_outside_a_repeat_is_a_located_error(tmp_path):
    params = {**ATTENTION["params"], "window": "${copy + 1}"}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_spec({"attn": {**ATTENTION, "params": params, "in": "x"}}, "attn")))
    with pytest.raises(SpecError) as caught:
        builder.build(path)
    assert len(caught.value.problems) == 1
    problem = caught.value.problems[0]
    assert "copy" in problem.message and problem.location.line is not None


def test_a_wrong_copy_is_reported_once_at_its_line(tmp_path):
    """Copy 2 asks for an unknown sub-graph: one problem, naming that copy, not one per copy."""
    spec = _spec({"layers": {**ATTENTION, "type": "${'multi_head_attention' if copy < 2 else 'nope'}",
                             "repeat": 4, "in": "x"}}, "layers")  # fmt: skip
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(SpecError) as caught:
        builder.build(path)
    assert [p.node for p in caught.value.problems] == ["layers.2"]
    assert "nope" in caught.value.problems[0].message


@pytest.mark.parametrize(
    ("values", "written"),
    [
        ([1, 1, 1], 1),
        ([4096, None, 4096, None], "${[4096, None][copy % 2]}"),
        (["d", "d", "d", "m", "m", "m", "m"], "${'d' if copy < 3 else 'm'}"),
    ],
)
def test_per_copy_values_are_written_as_the_shorter_expression(values, written):
    assert per_copy(copying.copy(values)) == written
