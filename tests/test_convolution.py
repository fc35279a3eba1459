"""conv1d and conv2d against torch.nn.Conv1d / Conv2d (values, initialisation, output sizes as expressions of the
named sizes, FLOPs as torch counts them), `transpose`, and Whisper's sinusoid table against transformers'."""

from __future__ import annotations

import pytest
import sympy
import torch
from transformers.models.whisper.modeling_whisper import sinusoids

from blockgraph.blocks import REGISTRY, ShapeError, TensorType
from blockgraph.blocks.positional import sinusoid_table
from blockgraph.blocks.types import symbol
from blockgraph.builder import pipeline
from blockgraph.builder.analysis import analyse
from blockgraph.common.errors import SpecError

torch.set_num_threads(1)
CONV1D, CONV2D = REGISTRY.get("conv1d").cls, REGISTRY.get("conv2d").cls

ONE_D = [
    {"in_channels": 4, "out_channels": 6, "kernel": 3, "padding": 1},  # Whisper's first
    {"in_channels": 6, "out_channels": 6, "kernel": 3, "stride": 2, "padding": 1},  # and second
    {"in_channels": 6, "out_channels": 9, "kernel": 4, "stride": 3, "dilation": 2, "groups": 3, "bias": False},
    {"in_channels": 4, "out_channels": 4, "kernel": 5, "groups": 4, "padding": 4},  # depthwise
]
TWO_D = [
    {"in_channels": 3, "out_channels": 8, "kernel": 4, "stride": 4},  # patches
    {"in_channels": 4, "out_channels": 6, "kernel": [3, 2], "stride": [2, 1], "padding": [1, 0], "dilation": [1, 2],
     "groups": 2},
]  # fmt: skip


def _pair(cls: type, reference: type, params: dict) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Our block and torch's layer built from the same seed: they must start with the same weights."""
    torch.manual_seed(3)
    ours = cls(cls.Params(**params))
    torch.manual_seed(3)
    geometry = {key: params[key] for key in ("stride", "padding", "dilation", "groups", "bias") if key in params}
    theirs = reference(params["in_channels"], params["out_channels"], params["kernel"], **geometry)
    return ours, theirs


@pytest.mark.parametrize("params", ONE_D + TWO_D)
def test_a_convolution_is_torchs_from_its_initialisation_on(params):
    two = params in TWO_D
    ours, theirs = _pair(CONV2D if two else CONV1D, torch.nn.Conv2d if two else torch.nn.Conv1d, params)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert all(torch.equal(ours.state_dict()[k], theirs.state_dict()[k]) for k in theirs.state_dict())
    x = torch.randn(2, params["in_channels"], *((13, 11) if two else (17,)))
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


@pytest.mark.parametrize("params", ONE_D + TWO_D)
def test_output_sizes_are_expressions_that_hold_for_every_size(params):
    two = params in TWO_D
    cls = CONV2D if two else CONV1D
    names = ("height", "width") if two else ("frames",)
    p = cls.Params(**params)
    symbolic = cls.infer(p, TensorType((symbol("batch"), params["in_channels"], *map(symbol, names))))
    block = cls(p)
    for size in range(9, 21):
        x = torch.zeros(1, params["in_channels"], *(size for _ in names))
        expected = cls.infer(p, TensorType(tuple(x.shape))).shape
        assert tuple(block(x).shape) == expected
        values = {symbol(n): size for n in names} | {symbol("batch"): 1}
        assert tuple(int(sympy.sympify(d).subs(values)) for d in symbolic.shape) == expected


def test_whispers_stride_two_halves_the_frames_and_stride_one_keeps_them():
    first, second = (CONV1D.Params(**params) for params in ONE_D[:2])
    x = TensorType((symbol("batch"), 4, symbol("frames")))
    kept = CONV1D.infer(first, x)
    assert kept.shape[2] == symbol("frames")
    halved = CONV1D.infer(second, kept).shape[2]
    assert halved.subs(symbol("frames"), 3000) == 1500 and halved.subs(symbol("frames"), 3001) == 1501


def test_what_does_not_fit_is_refused_with_a_fix():
    p = CONV1D.Params(**ONE_D[0])
    with pytest.raises(ShapeError, match=r"input 'x' has 5 channels .* but in_channels is 4") as caught:
        CONV1D.infer(p, TensorType((2, 5, 9)))
    assert caught.value.at == ("params", "in_channels") and "channels first" in (caught.value.hint or "")
    with pytest.raises(ShapeError, match=r"the length \(2, padded by 0 on each side\) is shorter than the kernel's"):
        CONV1D.infer(CONV1D.Params(in_channels=4, out_channels=4, kernel=3), TensorType((2, 4, 2)))
    with pytest.raises(ValueError, match=r"out_channels \(6\) must be divisible by groups \(4\)"):
        CONV1D.Params(in_channels=4, out_channels=6, kernel=3, groups=4)
    with pytest.raises(ValueError):
        CONV2D.Params(in_channels=3, out_channels=3, kernel=[3, 0])


def test_named_sizes_too_short_for_a_kernel_are_refused_at_the_node_before_anything_runs(write_spec, run_cli):
    """A 5-wide kernel over `frames` leaves frames − 4 positions: at frames=3 that is −1, said by inspect and build."""
    spec = write_spec(
        {
            "name": "short",
            "dims": {"batch": 2, "frames": 3},
            "inputs": {"features": {"shape": ["batch", 4, "frames"]}},
            "nodes": {
                "conv": {
                    "type": "conv1d",
                    "params": {"in_channels": 4, "out_channels": 8, "kernel": 5},
                    "in": "features",
                }
            },
            "outputs": "conv",
        }
    )
    for command in ("inspect", "build"):
        result = run_cli(command, spec)
        assert result.code == 1 and "Traceback" not in result.stderr, result.stderr
        assert "output's dimension frames - 4 would be -1 at batch=2, frames=3" in result.stderr, result.stderr
        assert "node conv" in result.stderr and "--dim" in result.stderr
    assert run_cli("inspect", spec, "--dim", "frames=5").code == 0  # one position left


FLOPS_SPEC = {
    "name": "convolutions",
    "inputs": {
        "audio": {"shape": ["batch", 4, "frames"]},
        "image": {"shape": ["batch", 4, "height", "width"]},
    },
    "nodes": {
        **{f"c{i}": {"type": "conv1d", "params": p, "in": "audio"} for i, p in enumerate([ONE_D[0], ONE_D[3]])},
        "c2": {"type": "conv1d", "params": ONE_D[1] | {"in_channels": 6}, "in": "c0"},
        "c3": {"type": "conv1d", "params": ONE_D[2], "in": "c2"},
        "i0": {"type": "conv2d", "params": TWO_D[1], "in": "image"},
        "t": {"type": "transpose", "params": {"dim0": 1, "dim1": 2}, "in": "c3"},
    },
    "outputs": {"t": "t", "c1": "c1", "i0": "i0"},
}


def test_flops_are_torchs_count_and_expressions_of_the_named_sizes():
    typed = pipeline.typed_graph(FLOPS_SPEC)
    model = pipeline.compile_graph(typed, device="meta")
    costs = analyse(typed, model, {"batch": 2, "frames": 23, "height": 9, "width": 12})
    for node in ("c0", "c1", "c2", "c3", "i0"):
        assert costs.nodes[node].flops == costs.nodes[node].flops_analytic > 0, node
    assert costs.nodes["t"].flops == 0
    symbolic = analyse(typed, model, {})
    assert {"batch", "frames", "height", "width"} <= {str(s) for s in symbolic.flops_analytic.free_symbols}


def test_transpose_swaps_two_dimensions_and_names_a_missing_one():
    block = REGISTRY.get("transpose").cls
    p = block.Params(dim0=1, dim1=-1)
    x = torch.randn(2, 3, 5)
    assert torch.equal(block(p)(x), x.transpose(1, 2))
    assert block.infer(p, TensorType((symbol("batch"), 3, symbol("frames")))).shape == (
        symbol("batch"),
        symbol("frames"),
        3,
    )
    with pytest.raises(ShapeError, match=r"dim1 3 does not exist"):
        block.infer(block.Params(dim0=1, dim1=3), TensorType((2, 3, 5)))
    spec = {
        **FLOPS_SPEC,
        "nodes": {**FLOPS_SPEC["nodes"], "t": {"type": "transpose", "params": {"dim1": 4}, "in": "c3"}},
    }
    with pytest.raises(SpecError, match=r"dim1 4 does not exist"):
        pipeline.typed_graph(spec)


def test_whispers_sinusoid_table_is_transformers_and_not_the_halves_layout():
    """Ours is computed in float64 and rounded once; transformers' in float32: equal to float32 rounding."""
    for length, channels in ((24, 16), (64, 8)):
        ours = sinusoid_table(length, channels, "whisper")
        torch.testing.assert_close(ours, sinusoids(length, channels), rtol=0, atol=2e-6)
        assert (ours - sinusoid_table(length, channels, "halves")).abs().max() > 0.05
    i, pos = 3, 5  # the closed form: sin(pos · 10000^(−i/(d/2 − 1))) for i < d/2, then the cosines
    assert sinusoid_table(8, 16, "whisper")[pos, i].item() == pytest.approx(
        torch.sin(torch.tensor(pos * 10000 ** (-i / 7), dtype=torch.float64)).item(), abs=1e-7
    )
    with pytest.raises(ValueError, match="an even dim of at least 4"):
        REGISTRY.get("sinusoidal_position").cls.Params(dim=7, layout="whisper")


def test_a_learned_table_may_start_as_whispers_and_stay_fixed():
    cls = REGISTRY.get("learned_position").cls
    block = cls(cls.Params(dim=16, max_len=24, init="whisper", freeze=True))
    assert not block.pe.weight.requires_grad and torch.equal(block.pe.weight, sinusoid_table(24, 16, "whisper"))
    fixed = REGISTRY.get("sinusoidal_position").cls
    table = fixed(fixed.Params(dim=16, max_len=24, layout="whisper"))
    x = torch.randn(2, 5, 16)
    assert torch.equal(block(x), table(x))


def test_convolutions_build_on_meta_and_run_in_bfloat16():
    """inspect builds on meta; decoding in bfloat16 casts the weights, which the convolution reads as they are."""
    for cls, params, x in ((CONV1D, ONE_D[1], torch.randn(2, 6, 15)), (CONV2D, TWO_D[1], torch.randn(2, 4, 9, 8))):
        with torch.device("meta"):
            on_meta = cls(cls.Params(**params))
        assert on_meta.weight.is_meta and on_meta(x.to("meta")).shape == cls(cls.Params(**params))(x).shape
        block = cls(cls.Params(**params))
        half = cls(cls.Params(**params)).to(torch.bfloat16)
        half.load_state_dict(block.state_dict())
        torch.testing.assert_close(half(x.to(torch.bfloat16)).float(), block(x), rtol=0.02, atol=0.02)
