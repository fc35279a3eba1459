"""The recurrent blocks (rnn, lstm, gru) against torch's own modules, with padding, gradients and specs."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from blockgraph import builder
from blockgraph.blocks import REGISTRY
from blockgraph.builder import SpecError

B, T, IN, H = 3, 5, 4, 6
TOL = {"atol": 1e-5, "rtol": 1e-5}
TORCH = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
# (block name, extra params): every variant that must agree with torch
VARIANTS = [
    ("rnn", {}),
    ("rnn", {"nonlinearity": "relu"}),
    ("lstm", {"implementation": "gates"}),
    ("lstm", {"implementation": "fused"}),
    ("gru", {}),
]
SHAPES = [(1, False), (2, True)]  # (layers, bidirectional)


def make(name: str, layers: int = 1, bidirectional: bool = False, input_size: int = IN, **extra):
    """The block and torch's module with the very same weights (copied through the state_dict)."""
    cls = REGISTRY.get(name).cls
    p = cls.Params(input_size=input_size, hidden_size=H, layers=layers, bidirectional=bidirectional, **extra)
    block = cls(p)
    kwargs = {"nonlinearity": extra["nonlinearity"]} if "nonlinearity" in extra else {}
    ref = TORCH[name](input_size, H, layers, batch_first=True, bidirectional=bidirectional, **kwargs)
    block.load_state_dict(ref.state_dict())
    return block, ref


def initial(name: str, layers: int, bidirectional: bool, batch: int = B) -> tuple[torch.Tensor, ...]:
    shape = (layers * (2 if bidirectional else 1), batch, H)
    return tuple(torch.randn(shape) for _ in range(2 if name == "lstm" else 1))


def run_torch(ref: nn.Module, x, state, lengths=None) -> tuple[torch.Tensor, ...]:
    """torch's module as (y, h[, c]); padded input goes through pack_padded_sequence."""
    hx = None if state is None else (state if len(state) == 2 else state[0])
    if lengths is not None:
        x = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    y, hn = ref(x, hx)
    if lengths is not None:
        y, _ = pad_packed_sequence(y, batch_first=True, total_length=T)
    return (y, *hn) if isinstance(hn, tuple) else (y, hn)


def run_block(block, x, state=(), lengths=None, mask=None) -> tuple[torch.Tensor, ...]:
    """Call a block with keyword ports (h0, c0 from `state`, in that order)."""
    return block(x, **dict(zip(("h0", "c0"), state, strict=False)), lengths=lengths, mask=mask)


def assert_all_close(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, **TOL)


# --- equal to torch's modules -----------------------------------------------------------------------------------


@pytest.mark.parametrize("given_state", [False, True], ids=["zero-state", "given-state"])
@pytest.mark.parametrize(("layers", "bidirectional"), SHAPES, ids=["1-layer", "2-layer-bidir"])
@pytest.mark.parametrize(("name", "extra"), VARIANTS, ids=lambda v: v if isinstance(v, str) else "-".join(v.values()))
def test_matches_torch_module(name, extra, layers, bidirectional, given_state):
    block, ref = make(name, layers, bidirectional, **extra)
    x = torch.randn(B, T, IN)
    state = initial(name, layers, bidirectional) if given_state else ()
    got = run_block(block, x, state)
    want = run_torch(ref, x, state or None)
    assert got[0].shape == (B, T, H * (2 if bidirectional else 1))
    assert_all_close(got, want)


def test_state_dict_has_torchs_names_and_shapes_both_ways():
    block, ref = make("lstm", 2, True)
    assert [(k, v.shape) for k, v in block.state_dict().items()] == [(k, v.shape) for k, v in ref.state_dict().items()]
    with torch.no_grad():
        for p in block.parameters():
            p.mul_(0.5)
    ref.load_state_dict(block.state_dict())  # and back: torch's module now computes the block's function
    x = torch.randn(B, T, IN)
    assert_all_close(run_block(block, x), run_torch(ref, x, None))
    no_bias = REGISTRY.get("gru").cls(REGISTRY.get("gru").cls.Params(input_size=IN, hidden_size=H, bias=False))
    assert list(no_bias.state_dict()) == list(nn.GRU(IN, H, bias=False).state_dict())


@pytest.mark.parametrize("name", ["rnn", "lstm", "gru"])
def test_explicit_zero_state_equals_no_state(name):
    block, _ = make(name, 2, True)
    x = torch.randn(B, T, IN)
    zeros = tuple(torch.zeros_like(s) for s in initial(name, 2, True))
    given, absent = run_block(block, x, zeros), run_block(block, x)
    for g, a in zip(given, absent, strict=True):
        assert torch.equal(g, a)
    assert not torch.equal(run_block(block, x, initial(name, 2, True))[0], absent[0])  # a state does matter


def test_dropout_between_layers_draws_like_torch_in_training_only():
    block, ref = make("lstm", 2, True)
    block = type(block)(type(block).Params(input_size=IN, hidden_size=H, layers=2, bidirectional=True, dropout=0.5))
    ref = nn.LSTM(IN, H, 2, batch_first=True, bidirectional=True, dropout=0.5)
    block.load_state_dict(ref.state_dict())
    x = torch.randn(B, T, IN)
    torch.manual_seed(1)
    trained = run_block(block.train(), x)
    torch.manual_seed(1)
    assert_all_close(trained, run_torch(ref.train(), x, None))  # same masks: dropout on the same layer outputs
    evaluated = run_block(block.eval(), x)
    assert_all_close(evaluated, run_torch(ref.eval(), x, None))
    assert not torch.allclose(trained[0], evaluated[0])


# --- gates and fused LSTM ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_lstm_gates_and_fused_agree_forward_and_backward(padded):
    gates, _ = make("lstm", 2, True, implementation="gates")
    fused, _ = make("lstm", 2, True, implementation="fused")
    fused.load_state_dict(gates.state_dict())
    lengths = torch.tensor([T, 2, 0]) if padded else None
    x0, state0 = torch.randn(B, T, IN), initial("lstm", 2, True)
    results = []
    for block in (gates, fused):
        x = x0.clone().requires_grad_()
        state = tuple(s.clone().requires_grad_() for s in state0)
        y, h, c = run_block(block, x, state, lengths)
        (y.square().sum() + h.sin().sum() + (c * 0.3).sum()).backward()
        results.append([y, h, c, x.grad, *(s.grad for s in state), *(p.grad for p in block.parameters())])
    assert_all_close(results[0], results[1])
    assert all(g is not None and g.abs().sum() > 0 for g in results[0][3:])


def test_gradcheck_explicit_gates_lstm():
    cls = REGISTRY.get("lstm").cls
    block = cls(cls.Params(input_size=2, hidden_size=2, bidirectional=True, implementation="gates")).double()
    names = [n for n, _ in block.named_parameters()]
    x = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)
    h0, c0 = (torch.randn(2, 2, 2, dtype=torch.float64, requires_grad=True) for _ in range(2))
    lengths = torch.tensor([3, 2])

    def lstm(x, h0, c0, *params):
        weights = dict(zip(names, params, strict=True))
        return torch.func.functional_call(block, weights, (x, h0, c0, lengths))

    params = [p.detach().clone().requires_grad_() for p in block.parameters()]
    assert torch.autograd.gradcheck(lstm, (x, h0, c0, *params))


# --- padding ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("given_state", [False, True], ids=["zero-state", "given-state"])
@pytest.mark.parametrize(("name", "extra"), VARIANTS, ids=lambda v: v if isinstance(v, str) else "-".join(v.values()))
def test_padding_matches_packed_torch_module(name, extra, given_state):
    block, ref = make(name, 2, True, **extra)
    x = torch.randn(B, T, IN)
    lengths = torch.tensor([2, T, 1])
    state = initial(name, 2, True) if given_state else ()
    got = run_block(block, x, state, lengths)
    want = run_torch(ref, x, state or None, lengths)
    real = torch.arange(T)[None, :] < lengths[:, None]
    assert_all_close([got[0][real], *got[1:]], [want[0][real], *want[1:]])
    assert torch.equal(got[0][~real], torch.zeros_like(got[0][~real]))
    assert not torch.allclose(got[1], run_block(block, x, state)[1])  # padding changed the final state


@pytest.mark.parametrize(("name", "extra"), VARIANTS, ids=lambda v: v if isinstance(v, str) else "-".join(v.values()))
def test_padded_inputs_change_nothing_and_mask_equals_lengths(name, extra):
    block, _ = make(name, 2, True, **extra)
    x = torch.randn(B, T, IN)
    lengths = torch.tensor([3, T, 0])
    padding = torch.arange(T)[None, :] >= lengths[:, None]
    state = initial(name, 2, True)
    base = run_block(block, x, state, lengths)
    noisy = x.masked_fill(padding[..., None], float("nan"))
    for other in (run_block(block, noisy, state, lengths), run_block(block, x, state, mask=padding)):
        for a, b in zip(base, other, strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    for final, s in zip(base[1:], state, strict=True):  # a sequence of length 0 keeps its initial state
        assert torch.equal(final[:, 2], s[:, 2])
    assert torch.equal(base[0][2], torch.zeros(T, base[0].size(-1)))


def test_mask_must_be_right_padding():
    block, _ = make("gru")
    hole = torch.tensor([[False, True, False, False, False]] * B)
    with pytest.raises(ValueError, match="right padding"):
        block(torch.randn(B, T, IN), mask=hole)


# --- through a spec ---------------------------------------------------------------------------------------------


def spec(name: str, params: dict, outputs, feature: int = IN, h0_shape=None) -> dict:
    inputs = {
        "x": {"shape": ["batch", "seq", feature]},
        "lengths": {"dtype": "int64", "shape": ["batch"], "optional": True},
    }
    wiring = {"x": "x", "lengths": "lengths"}
    if h0_shape is not None:
        inputs["h0"] = {"shape": h0_shape}
        wiring["h0"] = "h0"
    return {
        "name": f"tiny-{name}",
        "dims": {"batch": B, "seq": T},
        "inputs": inputs,
        "nodes": {name: {"type": name, "params": {"input_size": IN, "hidden_size": H, **params}, "in": wiring}},
        "outputs": outputs,
    }


@pytest.mark.parametrize(
    ("name", "params"),
    [("rnn", {}), ("lstm", {"layers": 2, "bidirectional": True, "implementation": "fused"}), ("gru", {"layers": 2})],
)
def test_block_through_a_spec(name, params):
    model = builder.build(spec(name, params, {"y": f"{name}.y", "h": f"{name}.h"})).eval()
    graph = model.typed_graph.graph
    dims = builder.resolve_dims(graph)
    builder.trial_run(model, builder.dummy_inputs(graph, dims), dims)  # every port's shape matches infer
    block = model.get_submodule(name)
    x, lengths = torch.randn(B, T, IN), torch.tensor([T, 1, 3])
    out = model(x, lengths)
    direct = block(x, None, lengths) if name != "lstm" else block(x, None, None, lengths)
    assert torch.equal(out["y"], direct[0]) and torch.equal(out["h"], direct[1])
    only_h = builder.build(spec(name, params, f"{name}.h"))
    only_h.load_state_dict(model.state_dict())
    assert torch.equal(only_h.eval()(x, lengths), direct[1])
    assert set(model.state_dict()) == {f"{name}.{k}" for k in block.state_dict()}


def test_lstm_cell_state_output_through_a_spec():
    model = builder.build(spec("lstm", {}, "lstm.c"))
    assert model(torch.randn(B, T, IN)).shape == (1, B, H)


@pytest.mark.parametrize("name", ["rnn", "lstm", "gru"])
def test_feature_size_mismatch_is_a_spec_error(name):
    with pytest.raises(SpecError) as info:
        builder.build(spec(name, {}, f"{name}.y", feature=IN + 1))
    message = str(info.value)
    assert "input_size is 4" in message and "feature size 5" in message and "[batch, seq, 5]" in message
    assert f"node {name}" in message


def test_initial_state_shape_mismatch_is_a_spec_error():
    with pytest.raises(SpecError) as info:
        builder.build(spec("gru", {"layers": 2}, "gru.h", h0_shape=[1, "batch", H]))
    message = str(info.value)
    assert "'h0' [1, batch, 6]" in message and "[2, batch, 6]" in message and "[batch, seq, 4]" in message


def test_bad_params_are_spec_errors():
    with pytest.raises(SpecError, match="implementation"):
        builder.build(spec("lstm", {"implementation": "cudnn"}, "lstm.y"))
    with pytest.raises(SpecError, match="hidden_size"):
        builder.build(spec("rnn", {"hidden_size": 0}, "rnn.y"))
