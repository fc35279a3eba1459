"""The walking skeleton end to end: spec file → validated DAG → compiled module, through the API and the CLI."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import SPECS

from blockgraph import builder
from blockgraph.builder import SpecError

TINY = SPECS / "tiny_encoder.yaml"


def linear_chain(n: int, width: int = 4) -> dict:
    nodes = {}
    prev = "x"
    for i in range(n):
        nodes[f"l{i}"] = {"type": "linear", "params": {"in_features": width, "out_features": width}, "in": prev}
        prev = f"l{i}"
    return {"name": "chain", "inputs": {"x": {"shape": ["batch", width]}}, "nodes": nodes, "outputs": prev}


def test_build_returns_an_ordinary_module_named_after_the_spec():
    model = builder.build(TINY, device="cpu")
    assert isinstance(model, torch.nn.Module)
    keys = set(model.state_dict())
    assert "embed.lut.weight" in keys
    assert "encoder.0.attn.w_q.weight" in keys and "encoder.1.norm2.norm.bias" in keys
    assert "generator.proj.weight" in keys
    assert "def forward(self, tokens" in model.code


def test_forward_backward_gives_every_parameter_a_gradient():
    model = builder.build(TINY)
    graph = model.typed_graph.graph
    tokens = torch.randint(0, 1000, (2, 16))
    out = model(tokens)
    assert out.shape == (2, 16, 1000)
    torch.nn.functional.nll_loss(out.reshape(-1, 1000), tokens.reshape(-1)).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    assert len(graph.nodes) == 11


def test_log_probabilities_normalise():
    model = builder.build(TINY).eval()
    out = model(torch.randint(0, 1000, (2, 5)))
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(2, 5))


def test_optimizer_step_reduces_loss_and_module_moves_with_to():
    model = builder.build(TINY, overrides={"dropout": 0.0})
    tokens = torch.randint(0, 1000, (4, 8))
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        optim.zero_grad()
        loss = torch.nn.functional.nll_loss(model(tokens).reshape(-1, 1000), tokens.reshape(-1))
        loss.backward()
        optim.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.to(torch.float64)
    assert model(tokens).dtype == torch.float64


def test_padding_mask_is_optional_and_respected():
    model = builder.build(TINY, overrides={"dropout": 0.0}).eval()
    tokens = torch.randint(1, 1000, (1, 6))
    pad = torch.tensor([[False, False, False, False, True, True]])
    with_pad = model(tokens, pad)
    changed = tokens.clone()
    changed[0, 4:] = 7
    torch.testing.assert_close(model(changed, pad)[0, :4], with_pad[0, :4])
    assert not torch.allclose(model(changed)[0, :4], with_pad[0, :4])


def test_generated_forward_matches_a_hand_wired_module():
    model = builder.build(TINY, overrides={"dropout": 0.0}).eval()
    m = dict(model.named_modules())
    tokens = torch.randint(0, 1000, (2, 7))
    x = m["position"](m["embed"](tokens))
    for i in range(2):
        a = m[f"encoder.{i}.attn"](x)
        x = m[f"encoder.{i}.norm1"](x, a)
        x = m[f"encoder.{i}.norm2"](x, m[f"encoder.{i}.ffn"](x))
    torch.testing.assert_close(model(tokens), m["generator"](x))


def test_deepcopy_and_meta_device():
    model = builder.build(TINY)
    clone = copy.deepcopy(model)
    tokens = torch.randint(0, 1000, (1, 3))
    torch.testing.assert_close(clone.eval()(tokens), model.eval()(tokens))
    meta = builder.build(TINY, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    assert sum(p.numel() for p in meta.parameters()) == sum(p.numel() for p in model.parameters())


def test_spec_as_mapping_and_several_outputs():
    spec = linear_chain(3)
    spec["outputs"] = {"first": "l0", "last": "l2"}
    model = builder.build(spec)
    out = model(torch.randn(5, 4))
    assert set(out) == {"first", "last"} and out["last"].shape == (5, 4)


def test_repeat_chains_copies_and_keeps_independent_weights():
    spec = linear_chain(1)
    spec["nodes"]["l0"]["repeat"] = 3
    model = builder.build(spec)
    assert [k for k in model.state_dict() if k.endswith("weight")] == [f"l0.{i}.proj.weight" for i in range(3)]
    x = torch.randn(2, 4)
    expected = x
    for layer in model.l0:
        expected = layer(expected)
    torch.testing.assert_close(model(x), expected)
    assert not torch.equal(model.l0[0].proj.weight, model.l0[1].proj.weight)


def test_variables_keep_types_and_do_arithmetic():
    spec = linear_chain(1, width=8)
    spec["vars"] = {"w": 8, "hidden": "${w * 4}", "half": "${hidden // 2}"}
    spec["nodes"]["l0"]["params"] = {"in_features": "${w}", "out_features": "${half}"}
    model = builder.build(spec)
    assert model.l0.proj.out_features == 16


def test_overrides_apply_and_unknown_override_is_an_error():
    model = builder.build(TINY, overrides={"d_model": 32, "heads": 2, "layers": 1})
    assert model.embed.lut.embedding_dim == 32 and len(model.encoder) == 1
    with pytest.raises(SpecError, match="no variable 'd_modle'") as info:
        builder.build(TINY, overrides={"d_modle": 32})
    assert "did you mean 'd_model'" in info.value.problems[0].hint


def test_shape_mismatch_is_found_before_weights_exist():
    spec = linear_chain(2)
    spec["nodes"]["l1"]["params"]["in_features"] = 5
    with pytest.raises(SpecError) as info:
        builder.typed_graph(spec)
    problem = info.value.problems[0]
    assert problem.node == "l1"
    assert "feature size 4" in problem.message and "'l0'" in problem.message and "in_features is 5" in problem.message


def test_unused_nodes_and_variables_warn():
    spec = linear_chain(2)
    spec["outputs"] = "l0"
    spec["vars"] = {"spare": 3}
    warnings = builder.typed_graph(spec).graph.warnings
    messages = " ".join(w.message for w in warnings)
    assert "'l1' does not contribute" in messages and "'spare' is never used" in messages


def test_cli_build_prints_summary(run_cli):
    result = run_cli("build", TINY, "--dim", "batch=3", "--dim", "seq=5")
    assert result.code == 0, result.stderr
    assert "[3, 5, 1000]" in result.stdout
    assert "parameters" in result.stdout and "cpu" in result.stdout and "float32" in result.stdout


def test_cli_inspect_tree_and_formats(run_cli):
    tree = run_cli("inspect", TINY)
    assert tree.code == 0, tree.stderr
    model = builder.build(TINY)
    total = sum(p.numel() for p in model.parameters())
    assert f"{total:,} parameters" in tree.stdout
    assert "multi_head_attention" in tree.stdout and "[batch, seq, 64]" in tree.stdout
    collapsed = run_cli("inspect", TINY, "--depth", "1")
    assert "encoder_block ×2" in collapsed.stdout and "norm1" not in collapsed.stdout
    code = run_cli("inspect", TINY, "--code")
    assert "def forward" in code.stdout
    table = run_cli("inspect", TINY, "--format", "table")
    assert "encoder.1.ffn" in table.stdout


def test_cli_validate_and_blocks(run_cli):
    assert run_cli("validate", TINY).code == 0
    listing = run_cli("blocks")
    assert listing.code == 0 and "multi_head_attention" in listing.stdout and "built-in" in listing.stdout
    shown = run_cli("blocks", "show", "feed_forward")
    assert shown.code == 0 and "d_ff" in shown.stdout
    unknown = run_cli("blocks", "show", "feed_forwrd")
    assert unknown.code == 1 and "did you mean 'feed_forward'" in unknown.stderr


def test_cli_dims_come_from_flags_or_spec(run_cli, write_spec):
    spec = linear_chain(1)
    path = write_spec(spec)
    missing = run_cli("build", path)
    assert (
        missing.code == 1 and "no size for dimension(s) batch" in missing.stderr and "--dim batch=N" in missing.stderr
    )
    assert run_cli("build", path, "--dim", "batch=2").code == 0
    bad = run_cli("build", path, "--dim", "batch=two")
    assert bad.code == 1 and "--dim batch=two: sizes are integers from 1" in bad.stderr


def test_cli_set_override(run_cli):
    result = run_cli("build", TINY, "--set", "vocab=50")
    assert result.code == 0, result.stderr
    assert "[2, 16, 50]" in result.stdout


def test_missing_file_and_debug_traceback(run_cli):
    missing = run_cli("validate", "no/such/spec.yaml")
    assert missing.code == 1 and "spec file not found: no/such/spec.yaml" in missing.stderr
    assert "Traceback" not in missing.stderr
    debug = run_cli("--debug", "validate", "no/such/spec.yaml")
    assert debug.code == 1 and isinstance(debug.exception, SpecError)


def test_a_block_failing_on_the_trial_inputs_is_named(run_cli, write_spec):
    spec = {
        "name": "oob",
        "dims": {"batch": 2, "seq": 3},
        "inputs": {"ids": {"dtype": "int64", "shape": ["batch", "seq"], "high": 100}},
        "nodes": {"emb": {"type": "token_embedding", "params": {"vocab": 10, "dim": 4}, "in": "ids"}},
        "outputs": "emb",
    }
    result = run_cli("build", write_spec(spec))
    message = " ".join(result.stderr.split())
    assert result.code == 1 and result.exception is None
    assert "block 'token_embedding': failed on the trial inputs (batch=2, seq=3): IndexError" in message
    assert "node emb" in message and "spec.yaml:" in message
