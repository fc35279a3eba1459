"""The `mamba` block (Mamba's selective state-space layer): its parallel scan is the sequential recurrence, the
block is transformers' MambaMixer (padded or not, scanned in one chunk or several), its decoding steps are the
full run with a state whose size does not grow, and it decodes in bfloat16 and int8; its FLOPs are torch's."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import redraw
from test_decode_precision import FROM_FLOAT32, SAME_PRECISION, _in
from test_incremental import _beam_reorders, _decoder, _full, _stepped
from torch.utils.flop_counter import FlopCounterMode
from transformers.models.mamba.modeling_mamba import MambaMixer

from blockgraph.blocks.state_space import Mamba, linear_scan
from blockgraph.blocks.stepping import StepCache
from blockgraph.blocks.types import TensorType
from blockgraph.trainer.vocab import BOS_ID, PAD_ID

torch.set_num_threads(1)

SIZES = {"d_model": 16, "d_state": 8, "d_conv": 4, "expand": 2, "dt_rank": 3}


def _sequential(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """h_t = a_t h_{t−1} + b_t, one position after the other."""
    h, states = torch.zeros_like(b[:, 0]), []
    for t in range(b.size(1)):
        h = a[:, t] * h + b[:, t]
        states.append(h)
    return torch.stack(states, dim=1)


def _recurrence(length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decays in (0, 1], some near 1 (a long memory), inputs scaled as Mamba's Δ·B·x are: states stay O(1)."""
    generator = torch.Generator().manual_seed(seed)
    rate = torch.rand(2, length, 6, 5, generator=generator) * 3
    rate[..., :2] *= 1e-3
    b = -torch.expm1(-rate) * 3 * torch.randn(2, length, 6, 5, generator=generator)
    return torch.exp(-rate), b


@pytest.mark.parametrize("length", [1, 7, 256])
def test_the_parallel_scan_is_the_sequential_recurrence(length):
    a, b = _recurrence(length, seed=length)
    a.requires_grad_(True)
    b.requires_grad_(True)
    parallel, sequential = linear_scan(a, b), _sequential(a, b)
    assert (parallel - sequential).abs().max().item() <= 1e-5 and sequential.abs().max() > 1
    weights = torch.randn_like(b)
    options = {"allow_unused": True, "materialize_grads": True}  # one position reads no decay
    grads = torch.autograd.grad((parallel * weights).sum(), (a, b), **options)
    for got, want in zip(grads, torch.autograd.grad((sequential * weights).sum(), (a, b), **options), strict=True):
        assert (got - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())


def _pair(draw: str, chunk: int | None) -> tuple[Mamba, MambaMixer]:
    """Our block and transformers' mixer with the same weights: the mixer's own (Mamba's) initialisation, a long
    memory (Δ from 0.001 to 0.1, A = −1 … −N), or every tensor drawn again, larger (a short memory)."""
    config = transformers.MambaConfig(
        hidden_size=16, state_size=8, expand=2, conv_kernel=4, time_step_rank=3, num_hidden_layers=1
    )
    torch.manual_seed(0)
    reference = MambaMixer(config, layer_idx=0).eval()
    if draw == "redrawn":
        redraw(reference, seed=1)
        with torch.no_grad():
            for parameter in reference.parameters():
                parameter.mul_(5)
    ours = Mamba(Mamba.Params(**SIZES, chunk=chunk)).eval()
    ours.load_state_dict(reference.state_dict())
    return ours, reference


@pytest.mark.parametrize("draw", ["initialised", "redrawn"])
@pytest.mark.parametrize(("length", "chunk"), [(1, None), (7, None), (7, 3), (256, None), (256, 64)])
def test_the_block_is_transformers_mamba_mixer(draw, length, chunk):
    ours, reference = _pair(draw, chunk)
    x = torch.randn(3, length, 16, generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        want = reference(x)
        assert (ours(x) - want).abs().max().item() <= 1e-5 and want.abs().max() > 0.05


def test_gradients_are_transformers_mamba_mixers():
    """Training goes through the chunked scan (the state entering each chunk, the decays) as through the loop."""
    ours, reference = _pair("redrawn", chunk=3)
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(5))
    weights = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(6))
    (ours(x) * weights).sum().backward()
    (reference(x) * weights).sum().backward()
    theirs = dict(reference.named_parameters())
    for name, parameter in ours.named_parameters():
        assert parameter.grad is not None and theirs[name].grad is not None
        assert (parameter.grad - theirs[name].grad).abs().max().item() <= 1e-5, name


def test_padding_is_masked_as_transformers_masks_it_and_left_padding_changes_nothing():
    ours, reference = _pair("redrawn", chunk=4)
    x = torch.randn(3, 9, 16, generator=torch.Generator().manual_seed(2))
    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[1, :3] = True  # left
    pad[2, 6:] = True  # right
    with torch.no_grad():
        got = ours(x, pad)
        assert (got - reference(x, attention_mask=(~pad).long())).abs().max().item() <= 1e-5
        alone = ours(x[1:2, 3:])
        assert (got[1:2, 3:] - alone).abs().max().item() <= 1e-5
        assert (ours(x)[1, 3:] - alone[0]).abs().max().item() > 1e-3  # what the padded inputs would have changed


def test_left_padding_changes_nothing_with_a_biased_input_projection():
    """The bias of W_in is not an input: the padded positions still feed zeros to the convolution."""
    torch.manual_seed(0)
    ours = Mamba(Mamba.Params(**SIZES, bias=True)).eval()
    with torch.no_grad():
        ours.in_proj.bias.normal_()
    x = torch.randn(1, 9, 16, generator=torch.Generator().manual_seed(7))
    pad = torch.zeros(1, 9, dtype=torch.bool)
    pad[0, :3] = True
    with torch.no_grad():
        assert (ours(x, pad)[:, 3:] - ours(x[:, 3:])).abs().max().item() <= 1e-5


def test_steps_equal_the_full_run_through_chunks_padding_and_reordered_rows():
    """A prompt (one row left-padded), single positions and a three-position step, rows reordered as beam search
    does, with chunks of 2 positions: every step's outputs are the full run's at its positions."""
    ours, _ = _pair("redrawn", chunk=2)
    x = torch.randn(3, 12, 16, generator=torch.Generator().manual_seed(3))
    pad = torch.zeros(3, 12, dtype=torch.bool)
    pad[2, :2] = True
    cache = StepCache(12, {"x": True, "pad": True})
    rows, start = torch.arange(3), 0
    reorders = (None, [2, 0, 1], [0, 0, 2], [1, 2, 2], [2, 1, 0])  # kept rows, repeats allowed
    with torch.no_grad():
        full = ours(x, pad)
        for size, index in zip((5, 1, 3, 1, 2), reorders, strict=True):
            if index is not None:
                cache.reorder(torch.tensor(index))
                rows = rows[index]
            part = slice(start, start + size)
            got = ours.step(cache, x[rows, part], pad[rows, part])
            assert (got - full[rows, part]).abs().max().item() <= 1e-5
            start += size


def test_decoding_memory_is_flat_in_the_sequence_length():
    """The shipped spec at small sizes, a prompt of 4 tokens, then one at a time: each layer's cache holds (in
    storage, not only in view) d_conv − 1 convolution inputs and the d_inner × d_state state per row, after the
    prompt as after 4 more tokens."""
    decoder = _decoder("mamba")
    rows, layers, d_inner, d_state, d_conv = 3, 2, 2 * 16, 16, 4
    tokens = torch.randint(4, 13, (rows, 8), generator=torch.Generator().manual_seed(4))
    state = decoder.start(None, None, capacity=tokens.size(1))
    held = []
    with torch.no_grad():
        for part in (slice(0, 4), *(slice(p, p + 1) for p in range(4, 8))):
            decoder.next_log_probs(state, tokens[:, part])
            held.append(sum(t.untyped_storage().nbytes() for cache in state.caches for t in cache.tensors.values()))
    assert held[0] == held[-1] == rows * layers * d_inner * ((d_conv - 1) + d_state) * 4


@pytest.mark.parametrize("which", ["bfloat16", "int8"])
def test_it_decodes_in_bfloat16_and_int8_as_its_full_rerun_and_near_float32(which):
    exact = _decoder("mamba")
    reduced = _in(exact, which)
    tgt = torch.cat((torch.full((3, 1), BOS_ID), torch.randint(4, 13, (3, 7))), dim=1)
    full, reference = _full(reduced, tgt, None, None), _full(exact, tgt, None, None)
    for log_probs in (full, reference):
        log_probs[..., [PAD_ID, BOS_ID]] = float("-inf")
    assert not torch.equal(full, reference)  # the reduced precision did run
    torch.testing.assert_close(full, reference, **FROM_FLOAT32[which])
    steps = _stepped(reduced, tgt, None, None, first=2, order=_beam_reorders())
    for position, (rows, log_probs) in enumerate(steps, start=1):
        torch.testing.assert_close(log_probs, full[rows, position], **SAME_PRECISION[which])


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_flops_are_torchs_count(device):
    params = Mamba.Params(**SIZES, chunk=3)
    with torch.device(device):
        block = Mamba(params)
        x = torch.randn(2, 7, 16)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        block(x)
    counted = Mamba.flops(params, {"x": TensorType((2, 7, 16))}, ())
    assert counter.get_total_flops() == counted > 0


def test_params_say_what_to_change():
    with pytest.raises(ValueError, match=r"dt_min \(0.5\) must be at most dt_max \(0.1\)"):
        Mamba.Params(d_model=16, dt_min=0.5)
    assert Mamba.Params(d_model=768).rank == 48 and Mamba.Params(d_model=16, dt_rank=3).rank == 3
