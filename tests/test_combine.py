"""The combining blocks (concat, multiply, mean_pool, activation): agreement with torch, shape rules, use in specs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from blockgraph import builder
from blockgraph.blocks import REGISTRY, ShapeError, TensorType
from blockgraph.blocks.combine import Activation, Concat, MeanPool, Multiply
from blockgraph.blocks.types import symbol
from blockgraph.builder import SpecError

B, T = symbol("batch"), symbol("seq")


def test_concat_matches_torch_cat_on_the_last_dimension():
    a, b, c = torch.randn(2, 3, 4), torch.randn(2, 3, 5), torch.randn(2, 3, 1)
    block = Concat()
    torch.testing.assert_close(block(a, b), torch.cat([a, b], -1))
    torch.testing.assert_close(block(a, b, c), torch.cat([a, b, c], -1))
    torch.testing.assert_close(block(a, b, None, c), torch.cat([a, b, c], -1))


def test_concat_shape_rule_adds_feature_sizes_and_rejects_other_mismatches():
    p = Concat.Params()
    out = Concat.infer(p, TensorType((B, T, 4)), TensorType((B, T, 6)), TensorType((B, T, 2)))
    assert out.shape == (B, T, 12)
    with pytest.raises(ShapeError, match="leading dimensions") as info:
        Concat.infer(p, TensorType((B, T, 4)), TensorType((B, symbol("src_len"), 4)))
    assert info.value.at == ("in", "b")
    with pytest.raises(ShapeError, match="leading dimensions"):
        Concat.infer(p, TensorType((B, T, 4)), TensorType((B, 4)))
    with pytest.raises(ShapeError, match="float64"):
        Concat.infer(p, TensorType((B, 4)), TensorType((B, 4), torch.float64))


def test_multiply_is_torchs_broadcast_product_of_two_to_four_tensors():
    a, b, c, d = torch.randn(2, 3, 4), torch.randn(2, 3, 1), torch.randn(4), torch.randn(2, 1, 4)
    block = Multiply()
    torch.testing.assert_close(block(a, b), a * b)
    torch.testing.assert_close(block(a, b, c), a * b * c)
    torch.testing.assert_close(block(a, b, c, d), a * b * c * d)
    torch.testing.assert_close(block(b, d), b * d)  # each side broadcasts: [2, 3, 4]


def test_multiply_shape_rule_broadcasts_and_names_what_does_not():
    p = Multiply.Params()
    assert Multiply.infer(p, TensorType((B, T, 4)), TensorType((B, T, 1))).shape == (B, T, 4)
    assert Multiply.infer(p, TensorType((B, 1, 1)), TensorType((T, 4)), TensorType((4,))).shape == (B, T, 4)
    with pytest.raises(ShapeError, match="does not broadcast") as info:
        Multiply.infer(p, TensorType((B, T, 4)), TensorType((B, T, 4)), TensorType((B, T, 3)))
    assert info.value.at == ("in", "c")
    with pytest.raises(ShapeError, match="does not broadcast"):
        Multiply.infer(p, TensorType((B, T, 4)), TensorType((B, symbol("src_len"), 4)))
    with pytest.raises(ShapeError, match="float64"):
        Multiply.infer(p, TensorType((B, 4)), TensorType((B, 4), torch.float64))


def test_a_gate_in_a_spec_steps_by_position_and_counts_no_flops():
    """silu(W₁x) ⊙ W₃x written out with `multiply` is the built-in swiglu's hidden layer."""
    spec = {
        "name": "gate",
        "inputs": {"x": {"shape": ["batch", "seq", 6]}},
        "nodes": {
            "w_1": {"type": "linear", "params": {"in_features": 6, "out_features": 10, "bias": False}, "in": "x"},
            "act": {"type": "activation", "params": {"function": "silu"}, "in": "w_1"},
            "w_3": {"type": "linear", "params": {"in_features": 6, "out_features": 10, "bias": False}, "in": "x"},
            "gate": {"type": "multiply", "in": ["act", "w_3"]},
        },
        "outputs": "gate",
    }
    model = builder.build(spec)
    x = torch.randn(2, 3, 6)
    torch.testing.assert_close(model(x), F.silu(model.w_1.proj(x)) * model.w_3.proj(x))
    assert Multiply.stepping(Multiply.Params(), {"a": True, "b": True}) == "positions"
    assert Multiply.flops(Multiply.Params(), {}, ()) == 0


def test_mean_pool_averages_only_real_positions():
    x = torch.randn(3, 5, 4)
    mask = torch.tensor([[False] * 5, [False, False, True, True, True], [True] * 5])
    y = MeanPool()(x, mask)
    torch.testing.assert_close(y[0], x[0].mean(0))
    torch.testing.assert_close(y[1], x[1, :2].mean(0))
    assert torch.equal(y[2], torch.zeros(4))  # all padding: zeros, not NaN
    torch.testing.assert_close(MeanPool()(x), x.mean(1))
    changed = x.masked_fill(mask[..., None], 100.0)
    torch.testing.assert_close(MeanPool()(changed, mask), y)


def test_mean_pool_shape_rule_and_mask_check():
    assert MeanPool.infer(MeanPool.Params(), TensorType((B, T, 8))).shape == (B, 8)
    with pytest.raises(ShapeError, match="mask"):
        MeanPool.infer(MeanPool.Params(), TensorType((B, T, 8)), TensorType((B, symbol("other")), torch.bool))


@pytest.mark.parametrize(
    ("function", "reference"),
    [("tanh", torch.tanh), ("relu", F.relu), ("gelu", F.gelu), ("sigmoid", torch.sigmoid), ("silu", F.silu)],
)
def test_activation_applies_the_named_function(function, reference):
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(Activation(Activation.Params(function=function))(x), reference(x))


def test_blocks_are_registered_with_docs_and_examples():
    for name in ("concat", "multiply", "mean_pool", "activation"):
        entry = REGISTRY.get(name)
        assert entry.family == "combine" and entry.summary and entry.cls.example is not None
        assert entry.cls.infer.__doc__


def luong_head(width: int = 6) -> dict:
    return {
        "name": "luong-head",
        "inputs": {
            "h": {"shape": ["batch", "tgt", width]},
            "c": {"shape": ["batch", "tgt", width]},
        },
        "nodes": {
            "cat": {"type": "concat", "in": ["c", "h"]},
            "w_c": {"type": "linear", "params": {"in_features": 2 * width, "out_features": width}, "in": "cat"},
            "act": {"type": "activation", "params": {"function": "tanh"}, "in": "w_c"},
        },
        "outputs": "act",
    }


def test_concat_linear_tanh_in_a_spec():
    model = builder.build(luong_head())
    h, c = torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    torch.testing.assert_close(model(h, c), torch.tanh(model.w_c.proj(torch.cat([c, h], -1))))


def test_concat_width_mismatch_is_reported_at_the_next_node():
    spec = luong_head()
    spec["nodes"]["w_c"]["params"]["in_features"] = 6
    with pytest.raises(SpecError) as info:
        builder.typed_graph(spec)
    problem = info.value.problems[0]
    assert problem.node == "w_c" and "feature size 12" in problem.message
