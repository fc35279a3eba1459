"""Normalisation (layer, batch, RMS, Add & Norm post/pre) and feed-forward (ReLU, GELU, SwiGLU) blocks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from blockgraph import builder
from blockgraph.blocks.feedforward import FeedForward, SwiGLU
from blockgraph.blocks.norm import AddNorm, BatchNorm, LayerNorm, RMSNorm
from blockgraph.blocks.types import ShapeError, TensorType

B, T, D, F_ = 3, 5, 6, 10


def randomise(module: nn.Module) -> nn.Module:
    """Non-trivial values for every parameter (γ ≠ 1, β ≠ 0), so a missing scale or shift shows."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))
    return module


# --- layer_norm ----------------------------------------------------------------------------------------------------


def test_layer_norm_matches_torch_and_formula():
    block = randomise(LayerNorm(LayerNorm.Params(dim=D, eps=1e-5)))
    x = torch.randn(B, T, D) * 3 + 1
    ref = nn.LayerNorm(D, eps=1e-5)
    ref.load_state_dict({"weight": block.norm.weight, "bias": block.norm.bias})
    torch.testing.assert_close(block(x), ref(x), rtol=0, atol=1e-6)
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    manual = (x - mean) / torch.sqrt(var + 1e-5) * block.norm.weight + block.norm.bias
    torch.testing.assert_close(block(x), manual, rtol=1e-5, atol=1e-5)
    with pytest.raises(ShapeError, match="dim is 6"):
        LayerNorm.infer(LayerNorm.Params(dim=D), TensorType((B, T, D + 1)))


# --- batch_norm ----------------------------------------------------------------------------------------------------


def test_batch_norm_is_batchnorm1d_on_transposed_input_train_and_eval():
    block = randomise(BatchNorm(BatchNorm.Params(dim=D, momentum=0.3)))
    ref = nn.BatchNorm1d(D, momentum=0.3)
    ref.load_state_dict(block.norm.state_dict())
    for _ in range(3):  # training: batch statistics, running stats updated the same way
        x = torch.randn(B, T, D) * 2 + 0.5
        torch.testing.assert_close(block(x), ref(x.transpose(1, 2)).transpose(1, 2), rtol=0, atol=1e-6)
    torch.testing.assert_close(block.norm.running_mean, ref.running_mean)
    torch.testing.assert_close(block.norm.running_var, ref.running_var)
    block.eval()
    ref.eval()
    x = torch.randn(B, T, D)
    torch.testing.assert_close(block(x), ref(x.transpose(1, 2)).transpose(1, 2), rtol=0, atol=1e-6)


def test_batch_norm_normalises_each_feature_over_batch_and_positions():
    block = BatchNorm(BatchNorm.Params(dim=D, affine=False))
    x = torch.randn(B, T, D) * torch.arange(1.0, D + 1) + 5
    y = block(x).double()
    flat = y.reshape(-1, D)
    assert flat.mean(0).abs().max().item() < 1e-5
    assert (flat.var(0, unbiased=False) - 1).abs().max().item() < 1e-3
    x2 = torch.randn(4, D)  # (batch, feature) works too
    assert block(x2).shape == (4, D)


# --- rms_norm ------------------------------------------------------------------------------------------------------


def test_rms_norm_formula_and_torch_rmsnorm():
    block = randomise(RMSNorm(RMSNorm.Params(dim=D, eps=1e-6)))
    x = torch.randn(B, T, D) * 4
    g = block.weight.detach().tolist()
    y = block(x)
    for b in range(B):  # an independent scalar loop
        for t in range(T):
            row = x[b, t].tolist()
            rms = math.sqrt(sum(v * v for v in row) / D + 1e-6)
            for j in range(D):
                assert y[b, t, j].item() == pytest.approx(row[j] / rms * g[j], rel=1e-5, abs=1e-6)
    if hasattr(nn, "RMSNorm"):
        ref = nn.RMSNorm(D, eps=1e-6)
        ref.load_state_dict({"weight": block.weight})
        torch.testing.assert_close(y, ref(x), rtol=1e-6, atol=1e-6)
    assert y.mean().abs().item() > 0  # no mean subtraction: an all-positive row stays positive
    assert (RMSNorm(RMSNorm.Params(dim=3))(torch.tensor([[1.0, 2.0, 3.0]])) > 0).all()


def test_rms_norm_keeps_low_precision_dtype():
    block = RMSNorm(RMSNorm.Params(dim=D))
    x = torch.randn(2, D).bfloat16()
    y = block.to(torch.bfloat16)(x)
    assert y.dtype == torch.bfloat16
    want = x.float() / torch.sqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(y.float(), want, rtol=1e-2, atol=1e-2)


def test_rms_norm_offset_is_gemmas_one_plus_w_norm_in_float32_and_bfloat16():
    """offset 1: the published weight w, a gain of 1 + w applied in float32 before the cast back, as GemmaRMSNorm."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    block = RMSNorm(RMSNorm.Params(dim=D, eps=1e-6, offset=1.0))
    x = torch.randn(B, T, D) * 3
    torch.testing.assert_close(block(x), RMSNorm(RMSNorm.Params(dim=D))(x), rtol=0, atol=0)  # a gain of 1 to start
    reference = GemmaRMSNorm(D, eps=1e-6)
    with torch.no_grad():
        reference.weight.normal_(0, 0.5)
        block.weight.copy_(reference.weight)
    torch.testing.assert_close(block(x), reference(x), rtol=0, atol=1e-6)
    block, reference, x = block.bfloat16(), reference.bfloat16(), x.bfloat16()
    assert torch.equal(block(x), reference(x))  # Gemma's order of operations, bit for bit
    llama_order = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
    assert not torch.equal(block(x), llama_order * (1 + block.weight))


# --- add_norm: post- and pre-norm -----------------------------------------------------------------------------------


def test_add_norm_post_norm_formula():
    block = randomise(AddNorm(AddNorm.Params(dim=D)))
    x, s = torch.randn(B, T, D), torch.randn(B, T, D)
    ref = nn.LayerNorm(D)
    ref.load_state_dict(block.norm.state_dict())
    torch.testing.assert_close(block(x, s), ref(x + s), rtol=0, atol=1e-6)


def test_add_norm_dropout_applies_to_the_sublayer_only():
    block = AddNorm(AddNorm.Params(dim=D, dropout=0.5, norm="pre")).train()
    x, s = torch.randn(B, T, D), torch.randn(B, T, D)
    torch.manual_seed(1)
    y = block(x, s)
    torch.manual_seed(1)
    kept = nn.functional.dropout(s, 0.5, training=True)
    torch.testing.assert_close(y, x + kept)
    assert ((y - x) == 0).any()  # some sublayer entries were dropped, x itself never is


def test_add_norm_pre_has_no_norm_weights():
    post = AddNorm(AddNorm.Params(dim=D))
    pre = AddNorm(AddNorm.Params(dim=D, norm="pre"))
    assert set(post.state_dict()) == {"norm.weight", "norm.bias"}
    assert set(pre.state_dict()) == set()
    x, s = torch.randn(B, T, D), torch.randn(B, T, D)
    torch.testing.assert_close(pre(x, s), x + s, rtol=0, atol=0)
    with pytest.raises(ShapeError, match="same shape"):
        AddNorm.infer(AddNorm.Params(dim=D), TensorType((B, T, D)), TensorType((B, T + 1, D)))


def test_pre_norm_residual_in_a_spec():
    """x → layer_norm → feed_forward → add_norm(norm: pre) with x is y = x + FFN(LN(x))."""
    spec = {
        "name": "pre-norm-ffn",
        "inputs": {"x": {"shape": ["batch", "seq", D]}},
        "nodes": {
            "ln": {"type": "layer_norm", "params": {"dim": D}, "in": "x"},
            "ffn": {"type": "feed_forward", "params": {"d_model": D, "d_ff": F_}, "in": "ln"},
            "res": {"type": "add_norm", "params": {"dim": D, "norm": "pre"}, "in": ["x", "ffn"]},
        },
        "outputs": "res",
    }
    model = randomise(builder.build(spec)).eval()
    x = torch.randn(B, T, D)
    ln = nn.LayerNorm(D)
    ln.load_state_dict(model.ln.norm.state_dict())
    w1, b1, w2, b2 = model.ffn.w_1.weight, model.ffn.w_1.bias, model.ffn.w_2.weight, model.ffn.w_2.bias
    want = x + (torch.relu(ln(x) @ w1.T + b1) @ w2.T + b2)
    torch.testing.assert_close(model(x=x), want, rtol=1e-5, atol=1e-5)


# --- feed-forward --------------------------------------------------------------------------------------------------


def test_feed_forward_relu_is_linear_relu_linear():
    block = FeedForward(FeedForward.Params(d_model=D, d_ff=F_)).eval()
    l1, l2 = nn.Linear(D, F_), nn.Linear(F_, D)
    l1.load_state_dict(block.w_1.state_dict())
    l2.load_state_dict(block.w_2.state_dict())
    x = torch.randn(B, T, D)
    torch.testing.assert_close(block(x), l2(torch.relu(l1(x))), rtol=1e-6, atol=1e-6)
    assert set(block.state_dict()) == {"w_1.weight", "w_1.bias", "w_2.weight", "w_2.bias"}


def test_feed_forward_gelu_is_the_erf_form():
    block = FeedForward(FeedForward.Params(d_model=D, d_ff=F_, activation="gelu")).eval()
    x = torch.randn(B, T, D)
    h = block.w_1(x)
    gelu = 0.5 * h * (1 + torch.erf(h / math.sqrt(2.0)))
    torch.testing.assert_close(block(x), block.w_2(gelu), rtol=1e-6, atol=1e-6)
    relu = FeedForward(FeedForward.Params(d_model=D, d_ff=F_))
    relu.load_state_dict(block.state_dict())
    assert not torch.allclose(relu(x), block(x))


def test_swiglu_formula():
    block = SwiGLU(SwiGLU.Params(d_model=D, d_ff=F_)).eval()
    assert set(block.state_dict()) == {"w_1.weight", "w_2.weight", "w_3.weight"}
    x = torch.randn(B, T, D)
    a = x @ block.w_1.weight.T
    gate = a / (1 + torch.exp(-a))  # SiLU(a) = a · σ(a)
    want = (gate * (x @ block.w_3.weight.T)) @ block.w_2.weight.T
    torch.testing.assert_close(block(x), want, rtol=1e-5, atol=1e-6)
    biased = SwiGLU(SwiGLU.Params(d_model=D, d_ff=F_, bias=True))
    assert "w_3.bias" in biased.state_dict()
    with pytest.raises(ShapeError, match="d_model is 6"):
        SwiGLU.infer(SwiGLU.Params(d_model=D, d_ff=F_), TensorType((B, T, 4)))
