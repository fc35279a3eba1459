"""Multi-head latent attention: transformers' DeepseekV3Attention to 1e-5 (padded batches, both rotary layouts,
YaRN, with and without the query latent, both ways of attending), each decoding step equal to a full re-run,
a cache of latents only, FLOPs as torch counts them, and reduced precisions and the meta device."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import transformers
from conftest import redraw
from pydantic import ValidationError
from torch.utils.flop_counter import FlopCounterMode
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

from blockgraph.blocks.latent_attention import MultiHeadLatentAttention
from blockgraph.blocks.stepping import StepCache
from blockgraph.blocks.types import TensorType, symbol
from blockgraph.builder import precision

torch.set_num_threads(1)

SMALL = {"d_model": 32, "heads": 4, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 6}
YARN = {"factor": 4.0, "original_max_position_embeddings": 256, "beta_fast": 32, "beta_slow": 1}  # ramps over dims 0-3
CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {  # (our params, their rope_parameters or None)
    "q latent, interleaved": ({"q_lora_rank": 12}, None),
    "direct q, halves, bias": ({"rotary_interleaved": False, "bias": True}, None),
    "yarn, mscales": ({"q_lora_rank": 12}, {**YARN, "mscale": 0.9, "mscale_all_dim": 0.7}),
    "yarn, factor alone, halves": ({"rotary_interleaved": False}, YARN),
    "yarn, attention factor, no truncation": ({}, {**YARN, "attention_factor": 1.3, "truncate": False}),
    "latent narrower than n + v: absorbed": ({"kv_lora_rank": 6, "q_lora_rank": 12}, None),
}


def block(**params: Any) -> MultiHeadLatentAttention:
    return MultiHeadLatentAttention(MultiHeadLatentAttention.Params(**{**SMALL, "causal": True, **params})).eval()


def ours_from(params: dict[str, Any], rope: dict[str, Any] | None) -> MultiHeadLatentAttention:
    yarn = {}
    if rope is not None:
        names = {"original_max_position_embeddings": "original_positions"}
        yarn = {f"yarn_{names.get(k, k)}": v for k, v in rope.items()}
    return block(**params, **yarn, rotary_base=500.0)


def reference(params: dict[str, Any], rope: dict[str, Any] | None) -> tuple[hf.DeepseekV3Attention, Any]:
    """transformers' attention and rotary table for the same settings, weights redrawn."""
    merged = {**SMALL, **params}
    config = transformers.DeepseekV3Config(
        hidden_size=merged["d_model"],
        num_attention_heads=merged["heads"],
        num_key_value_heads=merged["heads"],
        q_lora_rank=merged.get("q_lora_rank"),
        kv_lora_rank=merged["kv_lora_rank"],
        qk_nope_head_dim=merged["qk_nope_head_dim"],
        qk_rope_head_dim=merged["qk_rope_head_dim"],
        v_head_dim=merged["v_head_dim"],
        rope_interleave=merged.get("rotary_interleaved", True),
        attention_bias=merged.get("bias", False),
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "yarn", **rope, "rope_theta": 500.0}
        if rope
        else {"rope_type": "default", "rope_theta": 500.0},
        attn_implementation="eager",
    )
    attention = hf.DeepseekV3Attention(config, layer_idx=0).eval()
    redraw(attention, seed=1)
    return attention, hf.DeepseekV3RotaryEmbedding(config)


def copied(theirs: hf.DeepseekV3Attention, params: dict[str, Any], rope: dict[str, Any] | None):
    ours = ours_from(params, rope)
    ours.load_state_dict(theirs.state_dict())  # the same names, one to one
    return ours


def padded(batch: int = 3, seq: int = 7, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, SMALL["d_model"], generator=generator)
    pad = torch.zeros(batch, seq, dtype=torch.bool)
    for row in range(1, batch):
        pad[row, seq - 2 * row :] = True
    return x, pad


def their_output(theirs, rotary, x: torch.Tensor, pad: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    seq = x.size(1)
    allowed = torch.ones(seq, seq, dtype=torch.bool).tril() & ~pad[:, None, None, :]
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        return theirs(x, position_embeddings=rotary(x, positions), attention_mask=mask)[0]


@pytest.mark.parametrize("case", list(CASES))
def test_equals_transformers_deepseek_v3_attention_on_a_padded_batch(case):
    params, rope = CASES[case]
    theirs, rotary = reference(params, rope)
    ours = copied(theirs, params, rope)
    x, pad = padded()
    positions = torch.arange(x.size(1))[None].expand(x.size(0), -1)
    expected = their_output(theirs, rotary, x, pad, positions)
    with torch.no_grad():
        got = ours(x, pad)
    assert (got - expected).abs().max().item() <= 1e-5
    spread = positions * torch.tensor([[1], [2], [3]]) + torch.tensor([[0], [5], [11]])  # given per row
    with torch.no_grad():
        shifted = ours(x, pad, spread)
    assert (shifted - their_output(theirs, rotary, x, pad, spread)).abs().max().item() <= 1e-5
    assert (shifted - got)[1:].abs().max().item() > 1e-4  # the positions did reach the rotary parts


def test_yarn_changes_the_scores_as_transformers_does():
    """The YaRN cases are not plain rotary in disguise: the same weights without YaRN give other outputs."""
    params, rope = CASES["yarn, mscales"]
    theirs, _ = reference(params, rope)
    x, pad = padded()
    with torch.no_grad():
        assert (copied(theirs, params, rope)(x, pad) - copied(theirs, params, None)(x, pad)).abs().max() > 1e-4


def test_both_ways_of_attending_agree_and_a_step_attends_in_the_latent_space():
    wide, narrow = block(q_lora_rank=12).p, block(kv_lora_rank=6).p
    assert not MultiHeadLatentAttention.absorbs(wide, 9, 9) and MultiHeadLatentAttention.absorbs(narrow, 9, 9)
    assert MultiHeadLatentAttention.absorbs(wide, 1, 9)  # one new query against 9 keys
    ours = block(q_lora_rank=12)
    redraw(ours, seed=3)
    x, pad = padded()
    with torch.no_grad():
        q_nope, q_rope, latent = ours.projected(0, x, None)
        expanded = ours.attend(0, q_nope, q_rope, latent, pad)
        ours.absorbs = lambda p, queries, keys: True  # type: ignore[method-assign]  # this instance: absorb always
        absorbed = ours.attend(0, q_nope, q_rope, latent, pad)
    assert (absorbed - expanded).abs().max().item() <= 1e-5


def _steps(
    ours: MultiHeadLatentAttention, x: torch.Tensor, pad: torch.Tensor, first: int, at: torch.Tensor | None = None
) -> tuple[list, StepCache]:
    """`first` positions at once, then one at a time, rows swapped and one dropped on the way (beam search); the
    rotary positions `at` [batch, seq] where given."""
    ports = {"x": True, "key_padding_mask": True, **({"positions": True} if at is not None else {})}
    cache = StepCache(capacity=x.size(1), ports=ports)
    rows = torch.arange(x.size(0))
    outputs = [(rows, ours.step(cache, x[:, :first], pad[:, :first], None if at is None else at[:, :first]))]
    for position in range(first, x.size(1)):
        index = torch.arange(len(rows)).flip(0) if position % 2 else torch.arange(max(1, len(rows) - 1))
        cache.reorder(index)
        rows = rows[index]
        new = slice(position, position + 1)
        y = ours.step(cache, x[rows, new], pad[rows, new], None if at is None else at[rows, new])
        outputs.append((rows, y))
    return outputs, cache


@pytest.mark.parametrize("given", [False, True], ids=["own positions", "positions given"])
@pytest.mark.parametrize("case", ["q latent, interleaved", "yarn, mscales", "latent narrower than n + v: absorbed"])
def test_every_step_equals_the_full_rerun(case, given):
    ours = ours_from(*CASES[case])
    redraw(ours, seed=3)
    x, pad = padded(seq=8)
    pad[1:, 5:] = False  # a row padded in the middle of the prompt too, as a left-padded prompt would be
    pad[1, 1] = True
    at = (torch.arange(8) * torch.tensor([[1], [2], [3]]) + 4) if given else None  # rotary positions per row
    with torch.no_grad():
        full = ours(x, pad, at)
        steps, _ = _steps(ours, x, pad, 3, at)
    torch.testing.assert_close(steps[0][1], full[:, :3], atol=1e-5, rtol=0)
    for position, (rows, y) in enumerate(steps[1:], start=3):
        torch.testing.assert_close(y[:, 0], full[rows, position], atol=1e-5, rtol=0)


def test_the_cache_holds_the_latent_and_the_rotary_key_only():
    params = {"q_lora_rank": 12}
    ours = block(**params)
    x, _ = padded(batch=2, seq=6)
    with torch.no_grad():
        cache = StepCache(capacity=6, ports={"x": True})
        for position in range(6):
            ours.step(cache, x[:, position : position + 1])
    rank, rope = SMALL["kv_lora_rank"], SMALL["qk_rope_head_dim"]
    assert {name: tuple(t.shape) for name, t in cache.tensors.items()} == {"latent": (2, 6, rank + rope)}
    assert cache.nbytes() == 2 * 6 * (rank + rope) * 4
    expanded = 2 * 6 * SMALL["heads"] * (SMALL["qk_nope_head_dim"] + rope + SMALL["v_head_dim"]) * 4
    assert cache.nbytes() * 3 < expanded  # what transformers' expanded keys and values would hold


@pytest.mark.parametrize(
    "case", ["q latent, interleaved", "direct q, halves, bias", "latent narrower than n + v: absorbed"]
)
def test_flops_are_torchs_count_on_meta(case):
    params, _ = CASES[case]
    p = block(**params).p
    with torch.device("meta"):
        ours = MultiHeadLatentAttention(p)
        x, pad = torch.randn(2, 5, SMALL["d_model"]), torch.zeros(2, 5, dtype=torch.bool)
    with FlopCounterMode(display=False) as counter:
        ours(x, pad)
    batch, seq = symbol("batch"), symbol("seq")
    formula = MultiHeadLatentAttention.flops(p, {"x": TensorType((batch, seq, SMALL["d_model"]))}, ())
    assert formula.subs({batch: 2, seq: 5}) == counter.get_total_flops()


def test_deepseek_v3_sizes_build_on_meta():
    with torch.device("meta"):
        ours = MultiHeadLatentAttention(MultiHeadLatentAttention.Params(**MultiHeadLatentAttention.example))
        y = ours(torch.randn(1, 3, 7168))
    assert y.shape == (1, 3, 7168) and y.is_meta
    assert sum(p.numel() for p in ours.parameters()) == 187_107_328  # DeepSeek-V3's attention, one layer


@pytest.mark.parametrize("which", ["bfloat16", "int8"])
def test_reduced_precisions_step_as_their_full_rerun_near_float32(which):
    exact = block(q_lora_rank=12)
    redraw(exact, seed=3)
    reduced = precision.apply(copy.deepcopy(exact), which)
    x, pad = padded(seq=6)
    with torch.no_grad():
        reference_y = exact(x, pad)
        full = reduced(x.to(torch.bfloat16) if which == "bfloat16" else x, pad).float()
        steps, cache = _steps(reduced, x.to(torch.bfloat16) if which == "bfloat16" else x, pad, first=2)
    tolerance = {"atol": 0.03, "rtol": 0.05}
    torch.testing.assert_close(full, reference_y, **tolerance)
    assert not torch.equal(full, reference_y)
    for position, (rows, y) in enumerate(steps[1:], start=2):
        torch.testing.assert_close(y[:, 0].float(), full[rows, position], **tolerance)
    assert cache.tensors["latent"].dtype == (torch.bfloat16 if which == "bfloat16" else torch.float32)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"qk_rope_head_dim": 5}, "must be even"),
        ({"yarn_factor": 40.0}, "needs yarn_original_positions"),
    ],
)
def test_params_say_what_to_change(params, message):
    with pytest.raises(ValidationError, match=message):
        MultiHeadLatentAttention.Params(**{**SMALL, **params})
