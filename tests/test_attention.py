"""The attention family: exact agreement with torch references and hand-written formulas, masks, and use in specs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import redraw
from pydantic import ValidationError
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers.models.gemma2.modeling_gemma2 import Gemma2Attention, Gemma2RotaryEmbedding
from transformers.models.gemma3.modeling_gemma3 import Gemma3Attention, Gemma3RotaryEmbedding
from transformers.models.olmo2.modeling_olmo2 import Olmo2Attention, Olmo2RotaryEmbedding
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3RotaryEmbedding

from blockgraph import builder
from blockgraph.blocks import REGISTRY, TensorType
from blockgraph.blocks.attention import (
    GlobalAttention,
    HardAttention,
    LocalAttention,
    MultiHeadAttention,
    ScaledDotProductAttention,
)
from blockgraph.blocks.stepping import StepCache
from blockgraph.blocks.types import symbol

ATOL = 1e-5
D, H = 8, 2  # model width and heads used throughout: tiny on purpose
SCORES = ("dot", "general", "concat", "additive")
ATTENTION_BLOCKS = (
    "scaled_dot_product_attention",
    "multi_head_attention",
    "global_attention",
    "hard_attention",
    "local_attention",
)


def make(cls, **params):
    return cls(cls.Params(**params)).eval()


def padding(batch: int, length: int, pads: dict[int, int]) -> torch.Tensor:
    """[batch, length] bool, True on the last `pads[i]` positions of example i."""
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for i, n in pads.items():
        mask[i, length - n :] = True
    return mask


def causal_mask(q_len: int, k_len: int) -> torch.Tensor:
    """nn.MultiheadAttention convention: True above the diagonal = masked out."""
    return torch.ones(q_len, k_len, dtype=torch.bool).triu(1)


# ---------------------------------------------------------------- multi_head_attention vs nn.MultiheadAttention


def mha_pair(bias: bool = True, **params) -> tuple[MultiHeadAttention, nn.MultiheadAttention]:
    """Our block and nn.MultiheadAttention with the same (random, biases included) weights."""
    ref = nn.MultiheadAttention(D, H, bias=bias, batch_first=True).eval()
    ours = make(MultiHeadAttention, d_model=D, heads=H, bias=bias, **params)
    with torch.no_grad():
        if bias:
            nn.init.normal_(ref.in_proj_bias)
            nn.init.normal_(ref.out_proj.bias)
        for linear, weight in zip((ours.w_q, ours.w_k, ours.w_v), ref.in_proj_weight.chunk(3), strict=True):
            linear.weight.copy_(weight)
        ours.w_o.weight.copy_(ref.out_proj.weight)
        if bias:
            for linear, b in zip((ours.w_q, ours.w_k, ours.w_v), ref.in_proj_bias.chunk(3), strict=True):
                linear.bias.copy_(b)
            ours.w_o.bias.copy_(ref.out_proj.bias)
    return ours, ref


def nn_padding(pad: torch.Tensor | None, attn_mask: torch.Tensor | None) -> torch.Tensor | None:
    """nn.MultiheadAttention wants both masks of one kind: an additive key_padding_mask next to a float attn_mask."""
    if pad is None or attn_mask is None or attn_mask.dtype == torch.bool:
        return pad
    return torch.zeros(pad.shape).masked_fill(pad, -math.inf)


def mha_case(case: str):
    """(query, key or None, key_padding_mask, attn_mask for ours, attn_mask for nn, causal) for a named case."""
    q_len, k_len = 5, 7
    query = torch.randn(2, q_len, D)
    memory = torch.randn(2, k_len, D)
    if case == "self":
        return query, None, None, None, None, False
    if case == "cross":
        return query, memory, None, None, None, False
    if case == "key_padding":
        return query, memory, padding(2, k_len, {1: 3}), None, None, False
    if case == "causal":
        return query, None, None, None, causal_mask(q_len, q_len), True
    if case == "causal_padding":
        return query, None, padding(2, q_len, {0: 2}), None, causal_mask(q_len, q_len), True
    if case == "attn_mask_float":
        additive = torch.randn(q_len, k_len)
        return query, memory, padding(2, k_len, {0: 1}), additive, additive, False
    if case == "attn_mask_bool_3d":
        mask = torch.rand(2 * H, q_len, k_len) < 0.3
        mask[..., 0] = False  # every query keeps at least one key
        return query, memory, None, mask, mask, False
    raise AssertionError(case)


MHA_CASES = ("self", "cross", "key_padding", "causal", "causal_padding", "attn_mask_float", "attn_mask_bool_3d")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", MHA_CASES)
def test_mha_matches_nn_multihead_attention(case, bias):
    ours, ref = mha_pair(bias=bias, causal=mha_case(case)[-1])
    query, key, pad, ours_mask, ref_mask, _ = mha_case(case)
    kv = query if key is None else key
    expected, _ = ref(query, kv, kv, key_padding_mask=nn_padding(pad, ref_mask), attn_mask=ref_mask, need_weights=False)
    got = ours(query, key, None, pad, ours_mask)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", MHA_CASES)
def test_mha_need_weights_matches_nn_per_head_weights(case):
    query, key, pad, ours_mask, ref_mask, causal = mha_case(case)
    ours, ref = mha_pair(causal=causal, need_weights=True)
    kv = query if key is None else key
    expected, expected_weights = ref(
        query,
        kv,
        kv,
        key_padding_mask=nn_padding(pad, ref_mask),
        attn_mask=ref_mask,
        need_weights=True,
        average_attn_weights=False,
    )
    got, weights = ours(query, key, None, pad, ours_mask)
    assert weights.shape == (2, H, query.size(1), kv.size(1))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(weights, expected_weights, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", MHA_CASES)
def test_mha_fused_and_explicit_paths_agree(case):
    query, key, pad, mask, _, causal = mha_case(case)
    fused = make(MultiHeadAttention, d_model=D, heads=H, causal=causal)
    explicit = make(MultiHeadAttention, d_model=D, heads=H, causal=causal, need_weights=True)
    explicit.load_state_dict(fused.state_dict())
    torch.testing.assert_close(
        explicit(query, key, None, pad, mask)[0], fused(query, key, None, pad, mask), atol=ATOL, rtol=0
    )


def test_mha_row_with_every_key_masked_is_zero_not_nan():
    # left padding + causal: query 0 of example 1 may see no key at all
    query = torch.randn(2, 4, D)
    pad = torch.zeros(2, 4, dtype=torch.bool)
    pad[1, 0] = True
    for need_weights in (False, True):
        block = make(MultiHeadAttention, d_model=D, heads=H, causal=True, need_weights=need_weights)
        out = block(query, None, None, pad)
        y = out[0] if need_weights else out
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y[1, 0], block.w_o.bias, atol=ATOL, rtol=0)  # zero context → only W_O's bias
        if need_weights:
            assert (out[1][1, :, 0] == 0).all()


def test_mha_ports_depend_on_need_weights_and_state_dict_keys_are_stable():
    plain = MultiHeadAttention.Params(d_model=D, heads=H)
    asked = MultiHeadAttention.Params(d_model=D, heads=H, need_weights=True)
    assert [p.name for p in MultiHeadAttention.outputs_for(plain)] == ["y"]
    assert [p.name for p in MultiHeadAttention.outputs_for(asked)] == ["y", "weights"]
    keys = set(MultiHeadAttention(asked).state_dict())
    assert keys == {f"{w}.{p}" for w in ("w_q", "w_k", "w_v", "w_o") for p in ("weight", "bias")}


def test_mha_params_reject_heads_not_dividing_d_model():
    with pytest.raises(ValidationError, match=r"d_model \(8\) must be divisible by heads \(3\)"):
        MultiHeadAttention.Params(d_model=8, heads=3)


# ---------------------------------------------------------------- q/k norms (Qwen3: per head; OLMo 2: all heads)


def qk_norm_pair(kind: str) -> tuple[MultiHeadAttention, nn.Module, nn.Module]:
    """Our attention with `qk_norm: kind` and transformers' one that has it (grouped-query, redrawn weights and
    gains), with the reference's rotary embedding."""
    sizes = {"hidden_size": 16, "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 500.0}
    if kind == "head":  # Qwen3: one gain of head_dim shared by the heads, a head_dim of its own
        config = transformers.Qwen3Config(**sizes, head_dim=6, rms_norm_eps=1e-5)
        reference, rotary, width = Qwen3Attention(config, layer_idx=0), Qwen3RotaryEmbedding(config), 6
    else:  # OLMo 2: one gain over every query head's features, one over every key head's
        config = transformers.Olmo2Config(**sizes, rms_norm_eps=1e-5)
        reference, rotary, width = Olmo2Attention(config, layer_idx=0), Olmo2RotaryEmbedding(config), 4
    config._attn_implementation = "eager"
    redraw(reference, seed=1)
    ours = make(MultiHeadAttention, d_model=16, heads=4, kv_heads=2, head_dim=width, bias=False, causal=True,
                rotary_dim=width, rotary_base=500.0, qk_norm=kind, qk_norm_eps=1e-5)  # fmt: skip
    renamed = {
        "q_proj": "w_q",
        "k_proj": "w_k",
        "v_proj": "w_v",
        "o_proj": "w_o",
        "q_norm": "q_norm",
        "k_norm": "k_norm",
    }
    state = {renamed[name.split(".")[0]] + name[name.index(".") :]: t for name, t in reference.state_dict().items()}
    ours.load_state_dict(state)
    return ours, reference.eval(), rotary


@pytest.mark.parametrize("kind", ["head", "full"])
def test_qk_norms_match_transformers_qwen3_and_olmo2_attention(kind):
    ours, reference, rotary = qk_norm_pair(kind)
    assert ours.q_norm is not None and ours.k_norm is not None
    assert ours.q_norm.weight.shape == ((6,) if kind == "head" else (16,))
    assert ours.k_norm.weight.shape == ((6,) if kind == "head" else (8,))
    x = torch.randn(2, 7, 16)
    causal = torch.zeros(7, 7).masked_fill(causal_mask(7, 7), -math.inf)[None, None]
    with torch.no_grad():
        expected = reference(x, rotary(x, torch.arange(7)[None]), causal)[0]
        torch.testing.assert_close(ours(x), expected, atol=ATOL, rtol=0)
        ours.q_norm.weight.fill_(1.0)
        assert (ours(x) - expected).abs().max() > 1e-3  # the gains matter


@pytest.mark.parametrize("kind", ["head", "full"])
def test_qk_norms_step_as_forward_in_self_and_cross_attention(kind):
    """A decoding step normalises its new queries (and keys) as the full run does; a cross-attention's memory keys
    once, at the first step."""
    self_attention = make(MultiHeadAttention, d_model=D, heads=H, causal=True, rotary_dim=2, qk_norm=kind)
    cross_attention = make(MultiHeadAttention, d_model=D, heads=H, qk_norm=kind, qk_norm_eps=1e-3)
    x, memory = torch.randn(2, 6, D), torch.randn(2, 5, D)
    for block, key, ports in (
        (self_attention, None, {"query": True}),
        (cross_attention, memory, {"query": True, "key": False}),
    ):
        redraw(block, seed=2)
        cache = StepCache(capacity=6, ports=ports)
        with torch.no_grad():
            steps = [block.step(cache, x[:, a:b], key) for a, b in ((0, 3), (3, 4), (4, 5), (5, 6))]
            torch.testing.assert_close(torch.cat(steps, dim=1), block(x, key), atol=ATOL, rtol=0)


def test_qk_norms_add_no_flops_to_torchs_count_on_meta():
    p = MultiHeadAttention.Params(d_model=16, heads=4, kv_heads=2, causal=True, rotary_dim=4, qk_norm="full")
    with torch.device("meta"):
        block, x = MultiHeadAttention(p), torch.randn(2, 5, 16)
    with FlopCounterMode(display=False) as counter:
        block(x)
    batch, seq = symbol("batch"), symbol("seq")
    formula = MultiHeadAttention.flops(p, {"query": TensorType((batch, seq, 16))}, ())
    assert formula.subs({batch: 2, seq: 5}) == counter.get_total_flops()


def test_qk_norm_settings_without_qk_norm_are_refused():
    with pytest.raises(ValidationError, match="qk_norm_eps set the q/k norms: set qk_norm"):
        MultiHeadAttention.Params(d_model=D, heads=H, qk_norm_eps=1e-5)
    assert MultiHeadAttention(MultiHeadAttention.Params(d_model=D, heads=H)).q_norm is None


# ---------------------------------------------------------------- Gemma: softcaps, 1 + w q/k norms, linear rope


def gemma_pair(version: int, **changed) -> tuple[MultiHeadAttention, nn.Module, tuple, torch.Tensor]:
    """Our attention (with `changed` params) and transformers' Gemma 2 sliding-window layer (scores softcapped at
    0.5) or Gemma 3 global layer (q/k norms of gain 1 + w, rotary positions divided by 4), weights redrawn, with
    the reference's rotary angles and additive mask for 7 positions."""
    sizes = {"hidden_size": 16, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 6}
    sizes.update(query_pre_attn_scalar=5, sliding_window=3, rope_theta=500.0)
    i, j = torch.arange(7)[:, None], torch.arange(7)[None]
    positions = torch.arange(7)[None]
    params = {"d_model": 16, "heads": 4, "kv_heads": 2, "head_dim": 6, "bias": False, "causal": True}
    params.update(scale=5**-0.5, rotary_dim=6, rotary_base=500.0)
    if version == 2:
        config = transformers.Gemma2Config(**sizes, attn_logit_softcapping=0.5)
        reference = Gemma2Attention(config, layer_idx=0)  # layer 0 slides
        angles = Gemma2RotaryEmbedding(config)(torch.zeros(1), positions)
        allowed = (j <= i) & (j > i - 3)
        params.update(softcap=0.5, window=3)
    else:
        rope = {"full_attention": {"rope_type": "linear", "factor": 4.0}, "sliding_attention": {"rope_type": "default"}}
        config = transformers.Gemma3TextConfig(**sizes, rope_parameters=rope, sliding_window_pattern=1)  # all global
        reference = Gemma3Attention(config, layer_idx=0)
        angles = Gemma3RotaryEmbedding(config)(torch.zeros(1), positions, "full_attention")
        allowed = j <= i
        params.update(qk_norm="head", qk_norm_offset=1.0, rotary_scaling=4.0)
    config._attn_implementation = "eager"
    redraw(reference, seed=1)
    ours = make(MultiHeadAttention, **{**params, **changed})
    renamed = {f"{p}_proj": f"w_{p}" for p in "qkvo"} | {"q_norm": "q_norm", "k_norm": "k_norm"}
    state = {renamed[name.split(".")[0]] + name[name.index(".") :]: t for name, t in reference.state_dict().items()}
    ours.load_state_dict(state)
    mask = torch.zeros(7, 7).masked_fill(~allowed, -math.inf)[None, None]
    return ours, reference.eval(), angles, mask


@pytest.mark.parametrize("version", [2, 3])
def test_gemma_attention_matches_transformers_and_each_setting_matters(version):
    ours, reference, angles, mask = gemma_pair(version)
    x = torch.randn(2, 7, 16) * 10  # scores well beyond the cap
    with torch.no_grad():
        expected, expected_weights = reference(x, angles, mask)
        torch.testing.assert_close(ours(x), expected, atol=ATOL, rtol=0)
        with_weights = gemma_pair(version, need_weights=True)[0]
        y, weights = with_weights(x)
        torch.testing.assert_close(y, expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(weights, expected_weights, atol=ATOL, rtol=0)
        unchanged = {"softcap": None} if version == 2 else {"rotary_scaling": 1.0}
        assert (gemma_pair(version, **unchanged)[0](x) - expected).abs().max() > 1e-3  # the cap or the factor bites
        if version == 3:
            assert (gemma_pair(3, qk_norm_offset=0.0)[0](x) - expected).abs().max() > 1e-3  # and the 1 + w gains


def test_softcapped_windowed_grouped_attention_steps_as_forward():
    """The explicit path a softcap takes is the decoding step's too: new queries against the window so far."""
    block = make(MultiHeadAttention, d_model=D, heads=4, kv_heads=2, causal=True, window=3, softcap=0.3, rotary_dim=2)
    x, pad = torch.randn(2, 7, D) * 3, padding(2, 7, {1: 2})
    cache = StepCache(capacity=7, ports={"query": True, "key_padding_mask": True})
    with torch.no_grad():
        steps = [block.step(cache, x[:, a:b], key_padding_mask=pad[:, a:b]) for a, b in ((0, 3), (3, 4), (4, 7))]
        full = block(x, key_padding_mask=pad)
    torch.testing.assert_close(torch.cat(steps, dim=1)[~pad], full[~pad], atol=ATOL, rtol=0)
    uncapped = make(MultiHeadAttention, d_model=D, heads=4, kv_heads=2, causal=True, window=3, rotary_dim=2)
    uncapped.load_state_dict(block.state_dict())
    assert (uncapped(x, key_padding_mask=pad) - full)[~pad].abs().max() > 1e-3


def test_rotary_scaling_needs_a_rotary_embedding():
    with pytest.raises(ValidationError, match="rotary_scaling scales rotary positions: set rotary_dim"):
        MultiHeadAttention.Params(d_model=D, heads=H, rotary_scaling=8.0)


# ---------------------------------------------------------------- scaled_dot_product_attention


def reference_attention(q, k, v, masked_out=None, additive=None, causal=False):
    """Float64, written out: s = qkᵀ/√d (+ masks); w = exp(s - max) / Σ exp(s - max); y = w v."""
    q, k, v = q.double(), k.double(), v.double()
    s = torch.einsum("...qd,...kd->...qk", q, k) / math.sqrt(q.size(-1))
    if causal:
        s = s.masked_fill(causal_mask(q.size(-2), k.size(-2)), -math.inf)
    if masked_out is not None:
        s = s.masked_fill(masked_out, -math.inf)
    if additive is not None:
        s = s + additive.double()
    e = torch.exp(s - s.amax(-1, keepdim=True))
    w = e / e.sum(-1, keepdim=True)
    return torch.einsum("...qk,...kd->...qd", w, v), w


def sdpa_inputs(rank: int, q_len: int = 4, k_len: int = 6, d_v: int = 5):
    lead = (2, H) if rank == 4 else (2,)
    return torch.randn(*lead, q_len, D), torch.randn(*lead, k_len, D), torch.randn(*lead, k_len, d_v)


@pytest.mark.parametrize("rank", [3, 4])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "causal"])
def test_sdpa_matches_float64_formula(rank, mask_kind):
    q, k, v = sdpa_inputs(rank)
    block = make(ScaledDotProductAttention, causal=mask_kind == "causal")
    masked_out = torch.rand(q.size(-2), k.size(-2)) < 0.4 if mask_kind == "bool" else None
    if masked_out is not None:
        masked_out[:, 1] = False
    additive = torch.randn(q.size(-2), k.size(-2)) if mask_kind == "float" else None
    mask = masked_out if masked_out is not None else additive
    y, w = block(q, k, v, mask)
    y_ref, w_ref = reference_attention(q, k, v, masked_out, additive, causal=mask_kind == "causal")
    assert y.shape == (*q.shape[:-1], v.size(-1)) and w.shape == (*q.shape[:-1], k.size(-2))
    torch.testing.assert_close(y.double(), y_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(w.double(), w_ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_matches_torch_functional(causal):
    q, k, v = sdpa_inputs(4, q_len=5, k_len=5)
    masked_out = None if causal else padding(5, 5, {0: 2, 3: 1})  # [q_len, k_len]: query 0 drops 2 keys
    block = make(ScaledDotProductAttention, causal=causal)
    y, _ = block(q, k, v, masked_out)
    expected = F.scaled_dot_product_attention(
        q, k, v, attn_mask=None if masked_out is None else ~masked_out, is_causal=causal
    )
    torch.testing.assert_close(y, expected, atol=ATOL, rtol=0)


def test_sdpa_weights_are_the_ones_applied_to_values_under_dropout():
    q, k, v = sdpa_inputs(3)
    block = make(ScaledDotProductAttention, dropout=0.5).train()
    y, w = block(q, k, v)
    assert (w == 0).any(), "dropout should zero some weights"
    torch.testing.assert_close(y, w @ v, atol=ATOL, rtol=0)


def test_sdpa_causal_future_changes_do_not_reach_the_past():
    q, k, v = sdpa_inputs(3, q_len=6, k_len=6)
    block = make(ScaledDotProductAttention, causal=True)
    y, _ = block(q, k, v)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[:, 3:] = torch.randn_like(t[:, 3:])
    y2, _ = block(q2, k2, v2)
    torch.testing.assert_close(y2[:, :3], y[:, :3], atol=1e-6, rtol=0)
    assert not torch.allclose(y2[:, 3:], y[:, 3:])


# ---------------------------------------------------------------- masks: causality and padding invariance


def test_mha_causal_future_changes_do_not_reach_the_past():
    block = make(MultiHeadAttention, d_model=D, heads=H, causal=True)
    x = torch.randn(2, 6, D)
    x2 = x.clone()
    x2[:, 4:] = torch.randn(2, 2, D)
    torch.testing.assert_close(block(x2)[:, :4], block(x)[:, :4], atol=1e-6, rtol=0)
    assert not torch.allclose(block(x2)[:, 4:], block(x)[:, 4:])


@pytest.mark.parametrize("need_weights", [False, True])
def test_mha_padded_keys_do_not_matter(need_weights):
    block = make(MultiHeadAttention, d_model=D, heads=H, need_weights=need_weights)
    query, memory = torch.randn(2, 3, D), torch.randn(2, 6, D)
    pad = padding(2, 6, {0: 2, 1: 4})
    memory2 = memory.masked_fill(pad[..., None], 0.0) + 100 * pad[..., None] * torch.randn(2, 6, D)
    out, out2 = block(query, memory, None, pad), block(query, memory2, None, pad)
    y, y2 = (out[0], out2[0]) if need_weights else (out, out2)
    torch.testing.assert_close(y2, y, atol=1e-6, rtol=0)
    if need_weights:
        assert (out[1].masked_select(pad[:, None, None, :].expand_as(out[1])) == 0).all()


# ---------------------------------------------------------------- global (soft) attention, Luong / Bahdanau


def reference_scores(block, h_t, h_s):
    """The score formulas of the papers, written per pair in float64 from the block's weights."""
    h_t, h_s = h_t.double(), h_s.double()
    kind = block.kind
    if kind == "dot":
        return torch.einsum("btd,bsd->bts", h_t, h_s)
    w_a = block.w_a.weight.double()
    if kind == "general":  # h_tᵀ W_a h̄_s
        return torch.einsum("btd,de,bse->bts", h_t, w_a, h_s)
    v_a = block.v_a.weight.double()[0]
    tgt, src = h_t.size(1), h_s.size(1)
    if kind == "concat":  # v_aᵀ tanh(W_a [h_t; h̄_s])
        pairs = torch.cat([h_t[:, :, None].expand(-1, -1, src, -1), h_s[:, None].expand(-1, tgt, -1, -1)], -1)
        return torch.tanh(pairs @ w_a.T) @ v_a
    u_a = block.u_a.weight.double()  # v_aᵀ tanh(W_a s + U_a h)
    return torch.tanh((h_t @ w_a.T)[:, :, None] + (h_s @ u_a.T)[:, None]) @ v_a


def rnn_inputs(tgt: int = 4, src: int = 6, d_query: int = 6, d_memory: int = 6):
    return torch.randn(2, tgt, d_query), torch.randn(2, src, d_memory)


@pytest.mark.parametrize("score", SCORES)
def test_global_attention_matches_score_formula(score):
    d_memory = 6 if score == "dot" else 5
    block = make(GlobalAttention, d_query=6, d_memory=d_memory, score=score)
    query, memory = rnn_inputs(d_memory=d_memory)
    pad = padding(2, 6, {1: 2})
    context, weights = block(query, memory, pad)
    expected = reference_scores(block, query, memory).masked_fill(pad[:, None, :], -math.inf).softmax(-1)
    assert context.shape == (2, 4, d_memory) and weights.shape == (2, 4, 6)
    torch.testing.assert_close(weights.double(), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4), atol=ATOL, rtol=0)
    torch.testing.assert_close(context, weights @ memory, atol=ATOL, rtol=0)
    assert (weights[1, :, -2:] == 0).all()


def test_global_attention_params_explain_what_to_change():
    with pytest.raises(ValidationError, match=r"score 'dot' needs d_query \(6\) == d_memory \(4\)"):
        GlobalAttention.Params(d_query=6, d_memory=4, score="dot")
    with pytest.raises(ValidationError, match="d_attn is only used by score concat or additive"):
        GlobalAttention.Params(d_query=6, d_memory=4, score="general", d_attn=3)
    with pytest.raises(ValidationError):
        GlobalAttention.Params(d_query=6, d_memory=4, score="cosine")
    assert make(GlobalAttention, d_query=6, d_memory=4, score="concat", d_attn=3).w_a.weight.shape == (3, 10)


# ---------------------------------------------------------------- hard attention


@pytest.mark.parametrize("score", SCORES)
def test_hard_attention_eval_is_exact_argmax_one_hot(score):
    block = make(HardAttention, d_query=6, d_memory=6, score=score)
    query, memory = rnn_inputs()
    pad = padding(2, 6, {0: 3})
    context, weights = block(query, memory, pad)
    choice = reference_scores(block, query, memory).masked_fill(pad[:, None, :], -math.inf).argmax(-1)
    assert torch.equal(weights, F.one_hot(choice, 6).float())
    assert torch.equal(context, torch.stack([memory[b, choice[b]] for b in range(2)]))
    assert not weights[0, :, 3:].any()


def test_hard_attention_training_is_one_hot_forward_with_gradient_to_scores():
    block = make(HardAttention, d_query=6, d_memory=5, score="additive", temperature=0.5).train()
    query, memory = rnn_inputs(d_memory=5)
    query.requires_grad_(True)
    context, weights = block(query, memory)
    assert ((weights == 0) | (weights == 1)).all() and torch.equal(weights.sum(-1), torch.ones(2, 4))
    assert torch.equal(context, torch.einsum("bts,bsd->btd", weights.detach(), memory))
    (context * torch.randn_like(context)).sum().backward()
    for param in (block.w_a.weight, block.u_a.weight, block.v_a.weight, query):
        assert param.grad is not None and param.grad.abs().sum() > 0


def test_hard_attention_training_samples_follow_softmax_of_the_scores():
    # Gumbel-max: P(choose s) = softmax(scores)_s, whatever the temperature
    block = make(HardAttention, d_query=6, d_memory=6, score="dot", temperature=3.0).train()
    query, memory = rnn_inputs(tgt=1, src=4)
    query = 0.3 * query.expand(-1, 4000, -1)  # 4000 draws for the same decoder state, scores of order 1
    frequencies = block(query, memory)[1].mean(1)
    expected = reference_scores(block, query[:, :1], memory)[:, 0].softmax(-1)
    assert (expected > 0.05).sum() >= 2, "the test needs more than one likely position"
    torch.testing.assert_close(frequencies.double(), expected, atol=0.05, rtol=0)


def test_hard_attention_rejects_non_positive_temperature():
    with pytest.raises(ValidationError, match="temperature"):
        HardAttention.Params(d_query=6, d_memory=6, temperature=0)


# ---------------------------------------------------------------- local attention, Luong local-p / local-m


def window_reference(block, query, memory, p_t, pad=None, gaussian=True, renormalize=True):
    """Float64: softmax of the scores over {s : |s − p_t| ≤ D, s not padded}, times the Gaussian, renormalised."""
    src, window = memory.size(1), block.window
    s = torch.arange(src, dtype=torch.float64)
    distance = s - p_t.double()[..., None]
    outside = distance.abs() > window
    if pad is not None:
        outside = outside | pad[:, None, :]
    align = reference_scores(block, query, memory).masked_fill(outside, -math.inf).softmax(-1)
    if not gaussian:
        return align, outside
    sigma = window / 2
    weights = align * torch.exp(-(distance**2) / (2 * sigma**2))
    return (weights / weights.sum(-1, keepdim=True) if renormalize else weights), outside


def predicted_positions(block, query, source_len):
    """p_t = S · sigmoid(v_pᵀ tanh(W_p h_t)), from the block's weights."""
    h = torch.tanh(query.double() @ block.w_p.weight.double().T)
    return source_len[:, None] * torch.sigmoid(h @ block.v_p.weight.double()[0])


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("score", ["general", "concat"])
def test_local_p_window_and_gaussian(score, renormalize):
    block = make(
        LocalAttention, d_query=6, d_memory=6, score=score, window=2, mode="predictive", renormalize=renormalize
    )
    with torch.no_grad():
        block.v_p.weight.mul_(20)  # push some p_t towards 0 or S so that windows get clipped at the edges
    query, memory = rnn_inputs(tgt=8, src=9)
    context, weights = block(query, memory)
    p_t = predicted_positions(block, query, torch.full((2,), 9.0, dtype=torch.float64))
    expected, outside = window_reference(block, query, memory, p_t, renormalize=renormalize)
    clipped = (p_t - 2 < 0) | (p_t + 2 > 8)
    assert clipped.any() and (~clipped).any(), "the test needs windows both clipped and not"
    assert (weights[outside] == 0).all() and (weights[~outside] > 0).all()
    torch.testing.assert_close(weights.double(), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(context, weights @ memory, atol=ATOL, rtol=0)
    if renormalize:
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 8), atol=ATOL, rtol=0)
    else:  # eq. 10 as written: align (sums to 1 in the window) times a Gaussian factor ≤ 1
        assert (weights.sum(-1) <= 1 + ATOL).all()


def test_local_p_gaussian_factor_is_the_closed_form():
    block = make(LocalAttention, d_query=6, d_memory=6, window=3, renormalize=False)
    query, memory = rnn_inputs(tgt=3, src=10)
    _, weights = block(query, memory)
    p_t = predicted_positions(block, query, torch.full((2,), 10.0, dtype=torch.float64))
    align, outside = window_reference(block, query, memory, p_t, gaussian=False)
    factor = weights.double()[~outside] / align[~outside]
    distance = (torch.arange(10, dtype=torch.float64) - p_t[..., None])[~outside]
    torch.testing.assert_close(factor, torch.exp(-(distance**2) / (2 * 1.5**2)), atol=ATOL, rtol=0)


def test_local_p_uses_unpadded_source_length_and_trains_the_position_predictor():
    block = make(LocalAttention, d_query=6, d_memory=6, window=2).train()
    query, memory = rnn_inputs(tgt=3, src=8)
    pad = padding(2, 8, {1: 3})
    context, weights = block(query, memory, pad)
    p_t = predicted_positions(block, query, torch.tensor([8.0, 5.0], dtype=torch.float64))
    expected, outside = window_reference(block, query, memory, p_t, pad)
    torch.testing.assert_close(weights.double(), expected, atol=ATOL, rtol=0)
    assert (weights[1, :, 5:] == 0).all() and (weights[outside] == 0).all()
    (context * torch.randn_like(context)).sum().backward()
    assert block.w_p.weight.grad.abs().sum() > 0 and block.v_p.weight.grad.abs().sum() > 0


def test_local_m_centres_the_window_at_t():
    block = make(LocalAttention, d_query=6, d_memory=6, score="dot", window=1, mode="monotonic")
    query, memory = rnn_inputs(tgt=7, src=5)
    _, weights = block(query, memory)
    for t in range(7):
        centre = min(t, 4)  # past the source end, p_t is clipped to S − 1
        inside = [s for s in range(5) if abs(s - centre) <= 1]
        assert torch.nonzero(weights[0, t]).flatten().tolist() == inside
    expected, _ = window_reference(block, query, memory, torch.arange(7.0).clamp(max=4).expand(2, 7), gaussian=False)
    torch.testing.assert_close(weights.double(), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 7), atol=ATOL, rtol=0)


def test_local_params_explain_what_to_change():
    with pytest.raises(ValidationError, match=r"d_p .* only used by mode: predictive"):
        LocalAttention.Params(d_query=6, d_memory=6, window=2, mode="monotonic", d_p=4)
    with pytest.raises(ValidationError, match="window"):
        LocalAttention.Params(d_query=6, d_memory=6, window=0)


# ---------------------------------------------------------------- through specs


def spec(nodes: dict, outputs, **inputs) -> dict:
    return {
        "name": "attention-test",
        "inputs": {name: {"dtype": dtype, "shape": shape} for name, (dtype, shape) in inputs.items()},
        "nodes": nodes,
        "outputs": outputs,
    }


DIMS = {"batch": 2, "tgt": 3, "src": 5}


def run_spec(document: dict, **tensors):
    model = builder.build(document).eval()
    return builder.trial_run(model, tensors, DIMS)  # also checks every block's output against its infer()


SPEC_CASES = {
    "scaled_dot_product_attention": (
        {"type": "scaled_dot_product_attention", "params": {"causal": True}, "in": ["x", "m", "m"]},
        {"y": "node.y", "weights": "node.weights"},
        {"y": (2, 3, D), "weights": (2, 3, 5)},
    ),
    "multi_head_attention": (
        {"type": "multi_head_attention", "params": {"d_model": D, "heads": H, "need_weights": True},
         "in": {"query": "x", "key": "m", "key_padding_mask": "pad"}},
        {"y": "node.y", "weights": "node.weights"},
        {"y": (2, 3, D), "weights": (2, H, 3, 5)},
    ),
    "global_attention": (
        {"type": "global_attention", "params": {"d_query": D, "d_memory": D, "score": "concat", "d_attn": 4},
         "in": {"query": "x", "memory": "m", "memory_padding_mask": "pad"}},
        {"context": "node.context", "weights": "node.weights"},
        {"context": (2, 3, D), "weights": (2, 3, 5)},
    ),
    "hard_attention": (
        {"type": "hard_attention", "params": {"d_query": D, "d_memory": D}, "in": ["x", "m", "pad"]},
        {"context": "node.context", "weights": "node.weights"},
        {"context": (2, 3, D), "weights": (2, 3, 5)},
    ),
    "local_attention": (
        {"type": "local_attention", "params": {"d_query": D, "d_memory": D, "window": 1, "mode": "monotonic"},
         "in": ["x", "m", "pad"]},
        {"context": "node.context", "weights": "node.weights"},
        {"context": (2, 3, D), "weights": (2, 3, 5)},
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(SPEC_CASES))
def test_block_runs_in_a_spec(name):
    node, outputs, shapes = SPEC_CASES[name]
    document = spec(
        {"node": node},
        outputs,
        x=("float32", ["batch", "tgt", D]),
        m=("float32", ["batch", "src", D]),
        pad=("bool", ["batch", "src"]),
    )
    pad = padding(2, 5, {1: 2})
    out = run_spec(document, x=torch.randn(2, 3, D), m=torch.randn(2, 5, D), pad=pad)
    assert {k: tuple(v.shape) for k, v in out.items()} == shapes
    if "memory_padding_mask" in str(node) or name in ("hard_attention", "local_attention"):
        assert (out["weights"][1, :, -2:] == 0).all()


def test_mha_without_need_weights_has_no_weights_port_in_a_spec():
    document = spec(
        {"attn": {"type": "multi_head_attention", "params": {"d_model": D, "heads": H}, "in": "x"}},
        {"w": "attn.weights"},
        x=("float32", ["batch", "tgt", D]),
    )
    with pytest.raises(builder.SpecError, match="'attn' has no output port 'weights'"):
        builder.build(document)


@pytest.mark.parametrize(
    ("node", "message"),
    [
        (
            {"type": "multi_head_attention", "params": {"d_model": 6, "heads": H}, "in": {"query": "x", "key": "m"}},
            r"input 'query' has feature size 8 .*but d_model is 6",
        ),
        (
            {"type": "global_attention", "params": {"d_query": D, "d_memory": 4}, "in": ["x", "m"]},
            r"input 'memory' has feature size 8 .*but d_memory is 4",
        ),
        (
            {"type": "local_attention", "params": {"d_query": 4, "d_memory": D, "window": 2}, "in": ["x", "m"]},
            r"input 'query' has feature size 8 .*but d_query is 4",
        ),
        (
            {"type": "hard_attention", "params": {"d_query": D, "d_memory": D}, "in": ["x", "m", "tpad"]},
            r"memory_padding_mask \[batch, tgt\] .* must be \[batch, src_len\] = \[batch, src\]",
        ),
        (
            {"type": "scaled_dot_product_attention", "in": ["x", "m", "v"]},
            r"key \[batch, src, 8\].* and value \[batch, tgt, 8\].* must agree",
        ),
        (
            {"type": "multi_head_attention", "params": {"d_model": D, "heads": H},
             "in": {"query": "x", "attn_mask": "tpad"}},
            r"attn_mask \[batch, tgt\].* must be bool or float \[tgt, tgt\]",
        ),
        (
            {"type": "global_attention", "params": {"d_query": D, "d_memory": 4, "score": "dot"}, "in": ["x", "m"]},
            r"score 'dot' needs d_query \(8\) == d_memory \(4\)",
        ),
    ],
)  # fmt: skip
def test_spec_mismatch_is_a_spec_error_naming_the_problem(node, message):
    document = spec(
        {"node": node},
        "node.weights" if node["type"] != "multi_head_attention" else "node",
        x=("float32", ["batch", "tgt", D]),
        m=("float32", ["batch", "src", D]),
        v=("float32", ["batch", "tgt", D]),
        tpad=("bool", ["batch", "tgt"]),
    )
    with pytest.raises(builder.SpecError, match=message):
        builder.build(document)


def test_every_attention_block_is_documented():
    for name in ATTENTION_BLOCKS:
        entry = REGISTRY.get(name)
        assert entry.summary and entry.cls.example is not None
        assert entry.cls.Params(**entry.cls.example)
        assert all(port.doc for port in (*entry.cls.in_ports, *entry.cls.out_ports))
        assert all(field.description for field in entry.cls.Params.model_fields.values())
        assert (entry.cls.infer.__doc__ or "").strip()
