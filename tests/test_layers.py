"""encoder_layer / decoder_layer against torch.nn.TransformerEncoderLayer / TransformerDecoderLayer."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from blockgraph import builder
from blockgraph.blocks.layers import DecoderLayer, EncoderLayer
from blockgraph.blocks.types import ShapeError, TensorType, symbol

B, S, T, D, H, F_ = 2, 5, 4, 8, 2, 16


@pytest.fixture(autouse=True)
def _no_fastpath():
    """Compare against torch's plain Python path, not its fused inference kernels."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    yield
    torch.backends.mha.set_fastpath_enabled(before)


def randomise(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return module


def attention_state(ours: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Our separate W_Q, W_K, W_V, W_O as nn.MultiheadAttention's packed in_proj and out_proj."""
    return {
        "in_proj_weight": torch.cat([ours[f"{prefix}.w_{n}.weight"] for n in "qkv"]),
        "in_proj_bias": torch.cat([ours[f"{prefix}.w_{n}.bias"] for n in "qkv"]),
        "out_proj.weight": ours[f"{prefix}.w_o.weight"],
        "out_proj.bias": ours[f"{prefix}.w_o.bias"],
    }


def torch_state(ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = {f"self_attn.{k}": v for k, v in attention_state(ours, "self_attn").items()}
    if "cross_attn.w_q.weight" in ours:
        state |= {f"multihead_attn.{k}": v for k, v in attention_state(ours, "cross_attn").items()}
    state |= {
        "linear1.weight": ours["ffn.w_1.weight"],
        "linear1.bias": ours["ffn.w_1.bias"],
        "linear2.weight": ours["ffn.w_2.weight"],
        "linear2.bias": ours["ffn.w_2.bias"],
    }
    state |= {k: v for k, v in ours.items() if k.startswith("norm")}
    return state


def reference_encoder(layer: EncoderLayer, norm_first: bool, activation: str = "relu") -> nn.Module:
    ref = nn.TransformerEncoderLayer(
        D, H, F_, dropout=0.0, activation=activation, batch_first=True, norm_first=norm_first
    )
    ref.load_state_dict(torch_state(layer.state_dict()))
    return ref.eval()


def reference_decoder(layer: DecoderLayer, norm_first: bool) -> nn.Module:
    ref = nn.TransformerDecoderLayer(D, H, F_, dropout=0.0, batch_first=True, norm_first=norm_first)
    ref.load_state_dict(torch_state(layer.state_dict()))
    return ref.eval()


def padding(lengths: list[int], size: int) -> torch.Tensor:
    """True at padded positions (right padding)."""
    return torch.arange(size)[None, :] >= torch.tensor(lengths)[:, None]


def causal_mask(size: int) -> torch.Tensor:
    return torch.ones(size, size, dtype=torch.bool).triu(1)  # True = may not attend


def encoder(**params) -> EncoderLayer:
    return randomise(EncoderLayer(EncoderLayer.Params(d_model=D, heads=H, d_ff=F_, **params))).eval()


def decoder(**params) -> DecoderLayer:
    return randomise(DecoderLayer(DecoderLayer.Params(d_model=D, heads=H, d_ff=F_, **params))).eval()


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_layer_matches_torch(norm_first, activation):
    layer = encoder(norm_first=norm_first, activation=activation)
    ref = reference_encoder(layer, norm_first, activation)
    x = torch.randn(B, S, D)
    mask = padding([S, 3], S)
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-5)
    masked = layer(x, mask)
    torch.testing.assert_close(masked, ref(x, src_key_padding_mask=mask), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(masked[1], layer(x)[1], atol=1e-3)  # the mask changed the padded sequence


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_layer_matches_torch_with_causal_and_padding_masks(norm_first):
    layer = decoder(norm_first=norm_first)
    ref = reference_decoder(layer, norm_first)
    x, memory = torch.randn(B, T, D), torch.randn(B, S, D)
    tgt_pad, mem_pad = padding([T, 2], T), padding([3, S], S)
    want = ref(x, memory, tgt_mask=causal_mask(T))
    torch.testing.assert_close(layer(x, memory), want, rtol=1e-5, atol=1e-5)
    got = layer(x, memory, tgt_pad, mem_pad)
    want = ref(x, memory, tgt_mask=causal_mask(T), tgt_key_padding_mask=tgt_pad, memory_key_padding_mask=mem_pad)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_state_dict_reads_like_the_paper():
    keys = set(decoder().state_dict())
    for part in ("self_attn", "cross_attn"):
        assert {f"{part}.w_{n}.{t}" for n in "qkvo" for t in ("weight", "bias")} <= keys
    assert {"ffn.w_1.weight", "ffn.w_2.bias", "norm1.weight", "norm2.bias", "norm3.weight"} <= keys
    assert not any(k.startswith(("cross_attn", "norm3")) for k in encoder().state_dict())


def test_decoder_output_is_causal_and_ignores_padded_memory():
    layer = decoder(norm_first=True)
    x, memory = torch.randn(B, T, D), torch.randn(B, S, D)
    mem_pad = padding([3, S], S)
    y = layer(x, memory, None, mem_pad)
    k = 2
    changed = x.clone()
    changed[:, k:] = torch.randn(B, T - k, D)
    y2 = layer(changed, memory, None, mem_pad)
    torch.testing.assert_close(y2[:, :k], y[:, :k], rtol=0, atol=1e-6)
    assert not torch.allclose(y2[:, k:], y[:, k:], atol=1e-3)
    other_memory = memory.clone()
    other_memory[0, 3:] = torch.randn(S - 3, D)  # only positions that sequence 0 marks as padding
    torch.testing.assert_close(layer(x, other_memory, None, mem_pad), y, rtol=0, atol=1e-6)


def test_encoder_decoder_spec_built_by_the_builder():
    spec = {
        "name": "tiny-seq2seq",
        "vars": {"d": D},
        "dims": {"batch": B, "src": S, "tgt": T},
        "inputs": {
            "src": {"shape": ["batch", "src", D]},
            "tgt": {"shape": ["batch", "tgt", D]},
            "src_pad": {"dtype": "bool", "shape": ["batch", "src"], "optional": True},
            "tgt_pad": {"dtype": "bool", "shape": ["batch", "tgt"], "optional": True},
        },
        "nodes": {
            "enc": {
                "type": "encoder_layer",
                "repeat": 2,
                "params": {"d_model": "${d}", "heads": H, "d_ff": F_, "norm_first": True},
                "in": {"x": "src", "src_key_padding_mask": "src_pad"},
            },
            "enc_norm": {"type": "layer_norm", "params": {"dim": D}, "in": "enc"},
            "dec": {
                "type": "decoder_layer",
                "params": {"d_model": D, "heads": H, "d_ff": F_},
                "in": {
                    "x": "tgt",
                    "memory": "enc_norm",
                    "tgt_key_padding_mask": "tgt_pad",
                    "memory_key_padding_mask": "src_pad",
                },
            },
        },
        "outputs": "dec",
    }
    model = randomise(builder.build(spec)).eval()
    keys = set(model.state_dict())
    assert {"enc.0.self_attn.w_q.weight", "enc.1.ffn.w_2.bias", "dec.cross_attn.w_v.weight", "dec.norm3.bias"} <= keys

    refs = [reference_encoder(model.enc[i], norm_first=True) for i in range(2)]
    final = nn.LayerNorm(D)
    final.load_state_dict(model.enc_norm.norm.state_dict())
    ref_dec = reference_decoder(model.dec, norm_first=False)

    src, tgt = torch.randn(B, S, D), torch.randn(B, T, D)
    src_pad, tgt_pad = padding([S, 4], S), padding([3, T], T)
    h = src
    for ref in refs:
        h = ref(h, src_key_padding_mask=src_pad)
    want = ref_dec(
        tgt, final(h), tgt_mask=causal_mask(T), tgt_key_padding_mask=tgt_pad, memory_key_padding_mask=src_pad
    )
    got = model(src=src, tgt=tgt, src_pad=src_pad, tgt_pad=tgt_pad)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_params_and_shape_errors_say_what_to_change():
    with pytest.raises(ValidationError, match=r"d_model \(8\) must be divisible by heads \(3\)"):
        EncoderLayer.Params(d_model=8, heads=3, d_ff=F_)
    p = DecoderLayer.Params(d_model=D, heads=H, d_ff=F_)
    batch = symbol("batch")
    x = TensorType((batch, T, D), source="tgt_emb")
    with pytest.raises(ShapeError, match=r"x \[batch, 4, 8\] float32 from 'tgt_emb' and memory \[3, 5, 8\]"):
        DecoderLayer.infer(p, x, TensorType((3, S, D)))
    with pytest.raises(ShapeError, match=r"memory_key_padding_mask .* must be \[batch, len\] = \[batch, 5\]"):
        DecoderLayer.infer(p, x, TensorType((batch, S, D)), None, TensorType((batch, T), torch.bool))
    with pytest.raises(ShapeError, match="'memory' has feature size 6"):
        DecoderLayer.infer(p, x, TensorType((batch, S, 6)))
    assert DecoderLayer.infer(p, x, TensorType((batch, S, D))) == x
    with pytest.raises(ShapeError, match="src_key_padding_mask"):
        EncoderLayer.infer(p, x, TensorType((batch, T + 1), torch.bool))
