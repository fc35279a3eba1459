"""Decoding in a reduced precision: every step equals a full re-run in that precision, the outputs stay within the
precision's tolerance of float32's, int8 layers compute x Wᵀ + b to int8's resolution, and what a device cannot
run is refused before any weight is read."""

from __future__ import annotations

import copy

import pytest
import torch
from test_incremental import _beam_reorders, _decoder, _full, _sources, _stepped
from torch import nn

from blockgraph.builder import precision
from blockgraph.common.errors import UsageError
from blockgraph.trainer import decode
from blockgraph.trainer.vocab import BOS_ID, PAD_ID

torch.set_num_threads(1)

#: a decoder of each kind: attention encoder–decoders (with cross-attention, relative bias), language models
#: (learned and rotary positions, q/k norms per head and over all heads; a mixture of experts; latent attention;
#: softcapped scores and logits, 1 + w norms, alternating windows, linearly scaled rotary positions), recurrent
#: ones with attention
NAMES = [
    "transformer", "t5", "gpt2", "llama", "qwen3", "olmo2", "lstm_lm", "rnn_seq2seq_attention", "mixtral",
    "deepseek_v3", "gemma2", "gemma3_text",
]  # fmt: skip
#: how far a step may be from the full re-run in the same precision (log-probabilities: absolute, relative):
#: bfloat16 keeps 8 bits of mantissa (2⁻⁸ relative) and may sum in another order; int8 quantizes the new
#: positions' activations with their own scale (a 255th of their largest), the full re-run with the sequence's
SAME_PRECISION = {"bfloat16": {"atol": 0.03, "rtol": 0.01}, "int8": {"atol": 0.05, "rtol": 0.04}}
#: and from float32's
FROM_FLOAT32 = {"bfloat16": {"atol": 0.05, "rtol": 0.02}, "int8": {"atol": 0.05, "rtol": 0.04}}


def _in(decoder: decode.Decoder, which: str) -> decode.Decoder:
    return decode.Decoder(precision.apply(copy.deepcopy(decoder.model), which), decoder.roles)


@pytest.mark.parametrize("which", ["bfloat16", "int8"])
@pytest.mark.parametrize("name", NAMES)
def test_a_reduced_precision_steps_as_its_full_rerun_and_near_float32(name, which):
    exact = _decoder(name)
    reduced = _in(exact, which)
    src, src_pad = _sources(exact, [7, 4, 2])
    tgt = torch.cat((torch.full((3, 1), BOS_ID), torch.randint(4, 13, (3, 7))), dim=1)
    full, reference = _full(reduced, tgt, src, src_pad), _full(exact, tgt, src, src_pad)
    for log_probs in (full, reference):
        log_probs[..., [PAD_ID, BOS_ID]] = float("-inf")
    assert full.dtype == torch.float32  # read as float32 log-probabilities whatever the model computes in
    assert not torch.equal(full, reference)  # the reduced precision did run
    torch.testing.assert_close(full, reference, **FROM_FLOAT32[which])
    steps = _stepped(reduced, tgt, src, src_pad, first=2, order=_beam_reorders())
    torch.testing.assert_close(steps[0][1], full[:, 1], **SAME_PRECISION[which])
    for position, (rows, log_probs) in enumerate(steps[1:], start=2):
        torch.testing.assert_close(log_probs, full[rows, position], **SAME_PRECISION[which])


def test_bfloat16_keeps_the_step_caches_in_bfloat16():
    decoder = _in(_decoder("transformer"), "bfloat16")
    src, src_pad = _sources(decoder, [5, 3])
    state = decoder.start(src, src_pad, capacity=4)
    with torch.no_grad():
        decoder.next_log_probs(state, torch.full((2, 1), BOS_ID))
    held = {t.dtype for cache in state.caches for c in (cache, *cache.children.values()) for t in c.tensors.values()}
    assert held == {torch.bfloat16}


@pytest.mark.parametrize("bias", [True, False])
def test_an_int8_linear_computes_x_w_plus_b_to_int8_resolution(bias):
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=bias)
    x = torch.randn(3, 5, 64)
    quantized = precision.Int8Linear(linear)
    y, exact = quantized(x), linear(x)
    assert y.shape == exact.shape and y.dtype == torch.float32
    # a product of two 8-bit roundings: each term's error is at most half a step of its scale
    error = (y - exact).abs().max().item()
    assert 0 < error < 0.02 * exact.abs().max().item()
    assert quantized.weight is linear.weight  # blocks that read the weight (a tied generator) still can


def test_int8_replaces_every_linear_and_keeps_the_rest_float32():
    model = _decoder("transformer").model
    before = sum(1 for m in model.modules() if type(m) is nn.Linear)
    precision.apply(model, "int8")
    assert before and not any(type(m) is nn.Linear for m in model.modules())
    assert sum(1 for m in model.modules() if isinstance(m, precision.Int8Linear)) == before
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.parametrize(
    ("which", "device", "message"),
    [
        ("float16", "cpu", "float16 decoding is for GPUs"),
        ("int8", "cuda", "int8 weights run on the CPU"),
        ("fp8", "cpu", "is unknown"),
    ],
)
def test_what_a_device_cannot_run_is_refused(which, device, message):
    with pytest.raises(UsageError, match=message):
        precision.check(which, device)
