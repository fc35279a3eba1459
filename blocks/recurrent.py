"""Recurrent blocks: Elman RNN, LSTM and GRU, stacked, bidirectional and padding-aware.

All three keep their weights under the names and shapes `torch.nn.RNN` / `nn.LSTM` / `nn.GRU` use
(`weight_ih_l0`, `weight_hh_l0`, `bias_ih_l0`, `bias_hh_l0`, `…_reverse`), so a `state_dict` moves
between them unchanged. Inputs are batch-first.

Padding: give `lengths` (int [batch], the number of real steps of each sequence) or `mask`
(bool [batch, seq], True = padding, as `key_padding_mask` in attention). Padding must come after the
real steps (right padding, as `pad_sequence` makes it). Outputs at padded steps are zero and padded
inputs are never read; the final state is the state after each sequence's last real step (for the
reverse direction: after its first step), as with `nn.utils.rnn.pack_padded_sequence`. A sequence of
length 0 gives zero outputs and returns its initial state. When both are given, a step is padding if
either says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import _VF, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from blockgraph.blocks.attention import GlobalAttention
from blockgraph.blocks.flops import linear
from blockgraph.blocks.registry import Block, BlockParams, Port, register
from blockgraph.blocks.stepping import StepCache, Stepping
from blockgraph.blocks.types import ShapeError, TensorType, dims_equal, expect_last, format_dim, format_shape

State = tuple[torch.Tensor, ...]


class RecurrentParams(BlockParams):
    """What every recurrent block takes: sizes, depth, directions."""

    input_size: int = Field(gt=0, description="features per step of the input x")
    hidden_size: int = Field(gt=0, description="width of the hidden state h (per direction)")
    layers: int = Field(1, gt=0, description="stacked layers; each one reads the previous one's outputs")
    bidirectional: bool = Field(False, description="also run each layer right-to-left and concatenate the outputs")
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="dropout on each layer's outputs except the last (training only)"
    )
    bias: bool = Field(True, description="learn the biases b_ih and b_hh")


def stacked_flops(steps: Any, input_size: int, hidden_size: int, layers: int, gates: int, directions: int = 1) -> Any:
    """A stack of recurrent layers over `steps` steps: per layer and direction, W_ih and W_hh (gates · hidden rows)."""
    rows = gates * hidden_size
    total = 0
    for layer in range(layers):
        width = input_size if layer == 0 else hidden_size * directions
        total += directions * (linear(steps, width, rows) + linear(steps, hidden_size, rows))
    return total


X_PORT = Port("x", rank=3, doc="[batch, seq, input_size]")
LENGTHS_PORT = Port("lengths", rank=1, dtype="int", optional=True, doc="[batch]: real steps per sequence")
MASK_PORT = Port("mask", rank=2, dtype="bool", optional=True, doc="[batch, seq], True = padding (after the real steps)")


def state_port(name: str, what: str) -> Port:
    return Port(
        name, rank=3, optional=True, doc=f"[layers·directions, batch, hidden_size]: initial {what}; zeros if absent"
    )


Y_PORT = Port("y", doc="[batch, seq, hidden_size·directions]: the last layer's h_t; zero at padded steps")
H_PORT = Port("h", doc="[layers·directions, batch, hidden_size]: final hidden state (at the last real step)")


class Recurrent(Block):
    """Shared machinery of the recurrent blocks (not registered): weights, layers, directions, padding.

    A subclass sets `gates` (how many blocks of rows W_ih has), `states` (1 for h, 2 for h and c) and
    writes `cell`, one time step from the pre-computed input projection.
    """

    Params = RecurrentParams
    gates: ClassVar[int] = 1
    states: ClassVar[tuple[str, ...]] = ("h",)
    initial_ports: ClassVar[tuple[str, ...]] = ("h0",)
    fold_hidden_bias: ClassVar[bool] = True  # b_hh may join b_ih outside the loop (not in a GRU: r ⊙ (W_hn h + b_hn))

    @classmethod
    def flops(cls, p: RecurrentParams, inputs: dict, outputs: tuple) -> Any:
        """Per layer and direction: W_ih over all steps at once, then W_hh once per step."""
        x = inputs["x"].shape
        directions = 2 if p.bidirectional else 1
        return stacked_flops(x[0] * x[1], p.input_size, p.hidden_size, p.layers, cls.gates, directions)

    def __init__(self, p: RecurrentParams):
        super().__init__()
        self.input_size, self.hidden_size, self.layers = p.input_size, p.hidden_size, p.layers
        self.directions = 2 if p.bidirectional else 1
        self.dropout, self.bias = p.dropout, p.bias
        self._flat_weight_names: list[str] = []
        rows = self.gates * p.hidden_size
        for layer in range(p.layers):
            width = p.input_size if layer == 0 else p.hidden_size * self.directions
            for suffix in ("", "_reverse")[: self.directions]:
                shapes: dict[str, tuple[int, ...]] = {"weight_ih": (rows, width), "weight_hh": (rows, p.hidden_size)}
                if p.bias:
                    shapes |= {"bias_ih": (rows,), "bias_hh": (rows,)}
                for kind, shape in shapes.items():
                    name = f"{kind}_l{layer}{suffix}"
                    self.register_parameter(name, nn.Parameter(torch.empty(shape)))
                    self._flat_weight_names.append(name)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """U(−1/√hidden, 1/√hidden) for every weight and bias, as torch's recurrent modules."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def extra_repr(self) -> str:
        return (
            f"{self.input_size}, {self.hidden_size}, layers={self.layers}, "
            f"bidirectional={self.directions == 2}, dropout={self.dropout}, bias={self.bias}"
        )

    @property
    def flat_weights(self) -> list[torch.Tensor]:
        """Weights in the order torch's fused kernels take them: per layer, per direction: W_ih, W_hh, b_ih, b_hh."""
        return [getattr(self, name) for name in self._flat_weight_names]

    def weights(
        self, layer: int, direction: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(W_ih, W_hh, b_ih, b_hh) of one layer and direction; biases are None without `bias`."""
        suffix = f"_l{layer}" + ("_reverse" if direction else "")
        w_ih, w_hh = getattr(self, "weight_ih" + suffix), getattr(self, "weight_hh" + suffix)
        if not self.bias:
            return w_ih, w_hh, None, None
        return w_ih, w_hh, getattr(self, "bias_ih" + suffix), getattr(self, "bias_hh" + suffix)

    # --- shape rule -------------------------------------------------------------------------------------------

    @classmethod
    def infer_recurrent(
        cls,
        p: RecurrentParams,
        x: TensorType,
        initial: dict[str, TensorType | None],
        lengths: TensorType | None,
        mask: TensorType | None,
    ) -> tuple[TensorType, ...]:
        expect_last(x, p.input_size, "input_size")
        batch, seq = x.shape[0], x.shape[1]
        directions = 2 if p.bidirectional else 1
        state_shape = (p.layers * directions, batch, p.hidden_size)
        for name, given in initial.items():
            if given is not None and not all(dims_equal(a, b) for a, b in zip(given.shape, state_shape, strict=True)):
                raise ShapeError(
                    f"initial state {name!r} {given.described()} must be [layers·directions, batch, hidden_size] = "
                    f"{format_shape(state_shape)} for input x {x.described()}",
                    hint=f"layers={p.layers}, bidirectional={p.bidirectional}, hidden_size={p.hidden_size}",
                )
        if lengths is not None and not dims_equal(lengths.shape[0], batch):
            raise ShapeError(
                f"lengths {lengths.described()} must be [batch] = [{format_dim(batch)}] for input x {x.described()}"
            )
        if mask is not None and not (dims_equal(mask.shape[0], batch) and dims_equal(mask.shape[1], seq)):
            raise ShapeError(
                f"mask {mask.described()} must be [batch, seq] = [{format_dim(batch)}, {format_dim(seq)}] "
                f"for input x {x.described()}"
            )
        y = x.with_shape(batch, seq, p.hidden_size * directions)
        return (y, *(TensorType(state_shape, x.dtype) for _ in cls.states))

    # --- decoding step by step ---------------------------------------------------------------------------------

    @classmethod
    def stepping(cls, p: RecurrentParams, ports: Mapping[str, bool]) -> Stepping | None:
        """A one-way recurrence carries its state from one step to the next."""
        fixed_start = not any(ports.get(name) for name in cls.initial_ports)
        return "state" if ports.get("x") and not p.bidirectional and "lengths" not in ports and fixed_start else None

    def resumed(
        self,
        cache: StepCache,
        x: torch.Tensor,
        given: tuple[torch.Tensor | None, ...],
        lengths: torch.Tensor | None,
        mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, ...]:
        """`forward` over the new positions from the state the last step left (at the first, the `given` initial
        one), whose final state is kept for the next step, batch first as a cache holds everything."""
        if cache.advance(x.size(1)):  # a later step
            given = tuple(cache.tensors[name].transpose(0, 1).contiguous() for name in self.states)  # cuDNN wants it
        out = self.forward(x, *given, lengths, mask)
        for name, state in zip(self.states, out[1:], strict=True):
            cache.tensors[name] = state.transpose(0, 1)
        return out

    # --- forward ----------------------------------------------------------------------------------------------

    def cell(
        self, xw_t: torch.Tensor, state: State, w_hh: torch.Tensor, b_hh: torch.Tensor | None
    ) -> State:  # pragma: no cover - every subclass writes its own
        raise NotImplementedError

    def initial_state(self, x: torch.Tensor, given: tuple[torch.Tensor | None, ...]) -> State:
        shape = (self.layers * self.directions, x.size(0), self.hidden_size)
        return tuple(x.new_zeros(shape) if s is None else s for s in given)

    def run(
        self,
        x: torch.Tensor,
        given: tuple[torch.Tensor | None, ...],
        lengths: torch.Tensor | None,
        mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, ...]:
        """The explicit recurrence over layers and directions; returns (y, *final states)."""
        state0 = self.initial_state(x, given)
        lengths = real_lengths(lengths, mask, x.size(1))
        steps = torch.arange(x.size(1), device=x.device)
        valid = None if lengths is None else (steps[:, None] < lengths.to(x.device)).unsqueeze(-1)  # [seq, batch, 1]
        finals: list[list[torch.Tensor]] = [[] for _ in self.states]
        inp = x.transpose(0, 1)  # time-major: inp[t] is step t of every sequence
        for layer in range(self.layers):
            if layer:
                inp = F.dropout(inp, self.dropout, self.training)
            outputs = []
            for direction in range(self.directions):
                k = layer * self.directions + direction
                w_ih, w_hh, b_ih, b_hh = self.weights(layer, direction)
                if self.fold_hidden_bias and b_ih is not None and b_hh is not None:  # with `bias`, both are set
                    xw, b_hh = F.linear(inp, w_ih, b_ih + b_hh), None  # W_ih x_t + b_ih + b_hh, all steps at once
                else:
                    xw = F.linear(inp, w_ih, b_ih)  # W_ih x_t + b_ih, all steps at once
                out, final = self.scan(xw, tuple(s[k] for s in state0), w_hh, b_hh, valid, reverse=direction == 1)
                outputs.append(out)
                for kept, s in zip(finals, final, strict=True):
                    kept.append(s)
            inp = torch.cat(outputs, dim=-1) if len(outputs) > 1 else outputs[0]
        return (inp.transpose(0, 1), *(torch.stack(kept) for kept in finals))

    def scan(
        self,
        xw: torch.Tensor,
        state: State,
        w_hh: torch.Tensor,
        b_hh: torch.Tensor | None,
        valid: torch.Tensor | None,
        reverse: bool,
    ) -> tuple[torch.Tensor, State]:
        """Run `cell` over the steps of one direction; at padded steps the state is kept and the output is 0."""
        steps = xw.unbind(0)  # views whose backward is one stack, not a zero-filled full-size tensor per step
        outputs: list[torch.Tensor] = []  # in the order of the scan, step order once reversed back
        for t in reversed(range(len(steps))) if reverse else range(len(steps)):
            new = self.cell(steps[t], state, w_hh, b_hh)
            if valid is None:
                state = new
                outputs.append(new[0])
            else:
                state = tuple(torch.where(valid[t], n, s) for n, s in zip(new, state, strict=True))
                outputs.append(torch.where(valid[t], new[0], 0.0))
        if reverse:
            outputs.reverse()
        return torch.stack(outputs), state


def real_lengths(lengths: torch.Tensor | None, mask: torch.Tensor | None, seq: int) -> torch.Tensor | None:
    """Real steps per sequence, in [0, seq], from `lengths` and/or a right-padding `mask` (True = padding)."""
    if mask is not None:
        from_mask = (~mask).sum(dim=1)
        right_padded = mask == (torch.arange(seq, device=mask.device) >= from_mask[:, None])
        if not mask.is_meta and not bool(right_padded.all()):  # a meta tensor (inspect) has no values to check
            raise ValueError(
                "mask marks padding before a real step; padding must follow each sequence's real steps "
                "(right padding, True = padding), or pass lengths instead"
            )
        lengths = from_mask if lengths is None else torch.minimum(lengths.to(from_mask.device), from_mask)
    return None if lengths is None else lengths.long().clamp(0, seq)


class HiddenStateRecurrent(Recurrent):
    """Base of the recurrences whose only state is h (RNN, GRU): their ports, shape rule and forward."""

    in_ports = (X_PORT, state_port("h0", "hidden state"), LENGTHS_PORT, MASK_PORT)
    out_ports = (Y_PORT, H_PORT)
    example = {"input_size": 64, "hidden_size": 128, "layers": 2, "bidirectional": True}

    @classmethod
    def infer(
        cls,
        p: RecurrentParams,
        x: TensorType,
        h0: TensorType | None = None,
        lengths: TensorType | None = None,
        mask: TensorType | None = None,
    ) -> tuple[TensorType, TensorType]:
        """[batch, seq, input_size] → y [batch, seq, D·hidden_size], h [layers·D, batch, hidden_size] (D directions)."""
        y, h = cls.infer_recurrent(p, x, {"h0": h0}, lengths, mask)
        return y, h

    def forward(
        self,
        x: torch.Tensor,
        h0: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        y, h = self.run(x, (h0,), lengths, mask)
        return y, h

    def step(
        self,
        cache: StepCache,
        x: torch.Tensor,
        h0: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """The recurrence over the new positions, from the state the last step left."""
        return self.resumed(cache, x, (h0,), lengths, mask)


@register("rnn", family="recurrent")
class RNN(HiddenStateRecurrent):
    """Elman RNN: h_t = tanh(W_ih x_t + b_ih + W_hh h_{t−1} + b_hh), stacked, optionally bidirectional.

    Same weights and results as `torch.nn.RNN(batch_first=True)`. Zero initial state unless `h0` is given.
    Padding-aware through `lengths` or `mask` (see the module notes: zero outputs at padding, final state
    at each sequence's last real step).
    """

    class Params(RecurrentParams):
        nonlinearity: Literal["tanh", "relu"] = Field("tanh", description="the squashing function (tanh or relu)")

    def __init__(self, p: Params):
        super().__init__(p)
        self.nonlinearity = p.nonlinearity
        self.act = torch.tanh if p.nonlinearity == "tanh" else torch.relu

    def cell(self, xw_t: torch.Tensor, state: State, w_hh: torch.Tensor, b_hh: torch.Tensor | None) -> State:
        (h,) = state
        h = self.act(xw_t + F.linear(h, w_hh, b_hh))  # xw_t = W_ih x_t + b_ih + b_hh
        return (h,)


@register("lstm", family="recurrent")
class LSTM(Recurrent):
    """Long short-term memory: forget, input and output gates over a cell c; h_t = o_t ⊙ tanh(c_t).

        f_t = σ(W_if x_t + b_if + W_hf h_{t−1} + b_hf)    forget gate: how much of c_{t−1} to keep
        i_t = σ(W_ii x_t + b_ii + W_hi h_{t−1} + b_hi)    input gate: how much of the candidate to write
        g_t = tanh(W_ig x_t + b_ig + W_hg h_{t−1} + b_hg) candidate memory
        o_t = σ(W_io x_t + b_io + W_ho h_{t−1} + b_ho)    output gate: how much of the cell to show
        c_t = f_t ⊙ c_{t−1} + i_t ⊙ g_t
        h_t = o_t ⊙ tanh(c_t)

    Weights as `torch.nn.LSTM` (rows of W_ih, W_hh in gate order i, f, g, o), so a state_dict copies
    either way. `implementation: gates` runs the equations above step by step; `fused` runs the very same
    parameters through nn.LSTM's kernel (faster, same results; with dropout > 0 in training the two draw
    different dropout masks). Zero initial (h, c) unless `h0`/`c0` are given. Padding-aware through
    `lengths` or `mask` (zero outputs at padding, final state at each sequence's last real step).
    """

    class Params(RecurrentParams):
        implementation: Literal["gates", "fused"] = Field(
            "fused",
            description="fused (default): torch's LSTM kernel; gates: the same weights through the explicit "
            "equations in Python (slower, for reading and modifying)",
        )

    gates = 4
    states = ("h", "c")
    initial_ports = ("h0", "c0")
    in_ports = (
        X_PORT,
        state_port("h0", "hidden state"),
        state_port("c0", "cell state"),
        LENGTHS_PORT,
        MASK_PORT,
    )
    out_ports = (
        Y_PORT,
        H_PORT,
        Port("c", doc="[layers·directions, batch, hidden_size]: final cell state (at the last real step)"),
    )
    example = {"input_size": 64, "hidden_size": 128, "layers": 2, "bidirectional": True, "implementation": "fused"}

    def __init__(self, p: Params):
        super().__init__(p)
        self.implementation = p.implementation

    def extra_repr(self) -> str:
        return super().extra_repr() + f", implementation={self.implementation!r}"

    @classmethod
    def infer(
        cls,
        p: Params,
        x: TensorType,
        h0: TensorType | None = None,
        c0: TensorType | None = None,
        lengths: TensorType | None = None,
        mask: TensorType | None = None,
    ) -> tuple[TensorType, TensorType, TensorType]:
        """[batch, seq, input_size] → y [batch, seq, D·hidden], h and c [layers·D, batch, hidden] (D directions)."""
        y, h, c = cls.infer_recurrent(p, x, {"h0": h0, "c0": c0}, lengths, mask)
        return y, h, c

    def cell(self, xw_t: torch.Tensor, state: State, w_hh: torch.Tensor, b_hh: torch.Tensor | None) -> State:
        h, c = state
        # all four gates in one matmul: xw_t = W_ih x_t + b_ih + b_hh was computed for every step up front
        i, f, g, o = (xw_t + F.linear(h, w_hh, b_hh)).chunk(4, dim=-1)  # rows in nn.LSTM's order i, f, g, o
        f = torch.sigmoid(f)  # forget gate
        i = torch.sigmoid(i)  # input gate
        g = torch.tanh(g)  # candidate memory
        o = torch.sigmoid(o)  # output gate
        c = f * c + i * g
        h = o * torch.tanh(c)
        return h, c

    def forward(
        self,
        x: torch.Tensor,
        h0: torch.Tensor | None = None,
        c0: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.implementation == "gates":
            y, h, c = self.run(x, (h0, c0), lengths, mask)
            return y, h, c
        return self.fused(x, self.initial_state(x, (h0, c0)), real_lengths(lengths, mask, x.size(1)))

    def step(
        self,
        cache: StepCache,
        x: torch.Tensor,
        h0: torch.Tensor | None = None,
        c0: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """The LSTM over the new positions, from the (h, c) the last step left."""
        return self.resumed(cache, x, (h0, c0), lengths, mask)

    def fused(
        self, x: torch.Tensor, hx: State, lengths: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The same LSTM through torch's kernel (`torch._VF.lstm`, what nn.LSTM calls), packed when padded."""
        config = (self.bias, self.layers, self.dropout, self.training, self.directions == 2)
        if lengths is None:
            y, h, c = _VF.lstm(x, hx, self.flat_weights, *config, True)
            return y, h, c
        # nn.LSTM's padded path: pack (longest first), run, unpack; length-0 rows run one step, then are reset
        packed = pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        order, restore = packed.sorted_indices, packed.unsorted_indices
        assert order is not None and restore is not None  # enforce_sorted=False always sorts and records the order
        hx_sorted = [s.index_select(1, order) for s in hx]
        data, h, c = _VF.lstm(packed.data, packed.batch_sizes, hx_sorted, self.flat_weights, *config)
        out = PackedSequence(data, packed.batch_sizes, order, restore)
        y, _ = pad_packed_sequence(out, batch_first=True, total_length=x.size(1))
        h, c = h.index_select(1, restore), c.index_select(1, restore)
        empty = lengths.to(x.device) == 0
        if bool(empty.any()):
            y = torch.where(empty[:, None, None], 0.0, y)
            h = torch.where(empty[None, :, None], hx[0], h)
            c = torch.where(empty[None, :, None], hx[1], c)
        return y, h, c


@register("gru", family="recurrent")
class GRU(HiddenStateRecurrent):
    """Gated recurrent unit: h_t = (1 − z_t) ⊙ n_t + z_t ⊙ h_{t−1}, with reset r and update z gates.

        r_t = σ(W_ir x_t + b_ir + W_hr h_{t−1} + b_hr)          reset gate
        z_t = σ(W_iz x_t + b_iz + W_hz h_{t−1} + b_hz)          update gate
        n_t = tanh(W_in x_t + b_in + r_t ⊙ (W_hn h_{t−1} + b_hn)) candidate
        h_t = (1 − z_t) ⊙ n_t + z_t ⊙ h_{t−1}

    Same weights (rows in gate order r, z, n) and results as `torch.nn.GRU(batch_first=True)`. Zero initial
    state unless `h0` is given. Padding-aware through `lengths` or `mask` (zero outputs at padding, final
    state at each sequence's last real step).
    """

    Params = RecurrentParams
    gates = 3
    fold_hidden_bias = False

    def cell(self, xw_t: torch.Tensor, state: State, w_hh: torch.Tensor, b_hh: torch.Tensor | None) -> State:
        (h,) = state
        x_r, x_z, x_n = xw_t.chunk(3, dim=-1)  # W_i· x_t + b_i·, computed for every step up front
        h_r, h_z, h_n = F.linear(h, w_hh, b_hh).chunk(3, dim=-1)  # W_h· h_{t−1} + b_h·, one matmul
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        h = (1 - z) * n + z * h
        return (h,)


@register("input_feeding_decoder", family="recurrent")
class InputFeedingDecoder(Block):
    """LSTM decoder with Luong's input feeding: the attentional state h̃_{t−1} joins the input of step t.

        (h_t, c_t) = LSTM([y_t; h̃_{t−1}], (h_{t−1}, c_{t−1}))        h̃_0 = 0
        a_t = softmax_s score(h_t, h̄_s),  c_t = Σ_s a_t(s) h̄_s          global attention (dot, general, concat)
        h̃_t = tanh(W_c [c_t; h_t])

    (Luong, Pham & Manning 2015, section 3.3): the decoder knows its past alignment decisions. The loop runs
    one step at a time; y is the sequence h̃_1 … h̃_T (dropout applied), weights the a_t. The decoder starts
    from h0/c0 (e.g. the encoder's final state) or zeros. Weights: lstm (as `nn.LSTM` over input_size +
    hidden_size inputs), attn (as global_attention), w_c.
    """

    class Params(BlockParams):
        input_size: int = Field(gt=0, description="width of the target embeddings y_t")
        hidden_size: int = Field(gt=0, description="width of the LSTM states h_t and of h̃_t")
        memory_size: int = Field(gt=0, description="width of the encoder states h̄_s")
        layers: int = Field(1, gt=0, description="stacked LSTM layers")
        dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout between LSTM layers and on h̃_t")
        score: Literal["dot", "general", "concat"] = Field("general", description="Luong's score function")

        def attention(self) -> GlobalAttention.Params:
            return GlobalAttention.Params(d_query=self.hidden_size, d_memory=self.memory_size, score=self.score)

    in_ports = (
        Port("x", rank=3, doc="target embeddings [batch, tgt_len, input_size] (shifted right)"),
        Port("memory", rank=3, doc="encoder states h̄_s [batch, src_len, memory_size]"),
        Port("memory_padding_mask", rank=2, dtype="bool", optional=True, doc="[batch, src_len], True = padding"),
        Port("h0", rank=3, optional=True, doc="initial h [layers, batch, hidden_size] (default zeros)"),
        Port("c0", rank=3, optional=True, doc="initial c [layers, batch, hidden_size] (default zeros)"),
    )
    out_ports = (
        Port("y", doc="attentional states h̃_t [batch, tgt_len, hidden_size]"),
        Port("weights", doc="a_t(s) [batch, tgt_len, src_len]"),
    )
    example = {"input_size": 512, "hidden_size": 512, "memory_size": 512, "layers": 2}

    def __init__(self, p: Params):
        super().__init__()
        between = p.dropout if p.layers > 1 else 0.0  # one layer has nothing between; nn.LSTM would warn
        self.lstm = nn.LSTM(p.input_size + p.hidden_size, p.hidden_size, p.layers, batch_first=True, dropout=between)
        self.attn = GlobalAttention(p.attention())
        self.w_c = nn.Linear(p.memory_size + p.hidden_size, p.hidden_size, bias=False)
        self.dropout = nn.Dropout(p.dropout)

    @classmethod
    def infer(
        cls,
        p: Params,
        x: TensorType,
        memory: TensorType,
        memory_padding_mask: TensorType | None = None,
        h0: TensorType | None = None,
        c0: TensorType | None = None,
    ) -> tuple[TensorType, TensorType]:
        """x [b, t, input_size], memory [b, s, memory_size] → y [b, t, hidden_size], weights [b, t, s]."""
        expect_last(x, p.input_size, "input_size")
        query = x.with_last(p.hidden_size)
        _, weights = GlobalAttention.infer(p.attention(), query, memory, memory_padding_mask)
        for name, state in (("h0", h0), ("c0", c0)):
            if state is not None and not (
                dims_equal(state.shape[0], p.layers)
                and dims_equal(state.shape[1], x.shape[0])
                and dims_equal(state.shape[2], p.hidden_size)
            ):
                raise ShapeError(
                    f"{name} {state.described()} must be [layers, batch, hidden_size] = "
                    f"[{p.layers}, {format_dim(x.shape[0])}, {p.hidden_size}]",
                    at=("in", name),
                )
        return query, weights

    @classmethod
    def flops(cls, p: Params, inputs: dict, outputs: tuple) -> Any:
        """Per step: the LSTM over [y_t; h̃_{t−1}], the attention, W_c."""
        x = inputs["x"].shape
        steps = x[0] * x[1]
        lstm = stacked_flops(steps, p.input_size + p.hidden_size, p.hidden_size, p.layers, LSTM.gates)
        query = TensorType((x[0], x[1], p.hidden_size))
        attention = GlobalAttention.flops(p.attention(), {"query": query, "memory": inputs["memory"]}, ())
        return lstm + attention + linear(steps, p.memory_size + p.hidden_size, p.hidden_size)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        memory_padding_mask: torch.Tensor | None = None,
        h0: torch.Tensor | None = None,
        c0: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        y, weights, _ = self.decode(x, memory, memory_padding_mask, self.start(x, h0, c0), self.attn.keys(memory))
        return y, weights

    @classmethod
    def stepping(cls, p: Params, ports: Mapping[str, bool]) -> Stepping | None:
        """The loop simply goes on: (h, c) and h̃ are carried, the memory's side of the score kept."""
        fixed = not any(ports.get(name) for name in ("memory", "memory_padding_mask", "h0", "c0"))
        return "state" if ports.get("x") and fixed else None

    def step(
        self,
        cache: StepCache,
        x: torch.Tensor,
        memory: torch.Tensor,
        memory_padding_mask: torch.Tensor | None = None,
        h0: torch.Tensor | None = None,
        c0: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder over the new positions, from where the last step left it."""
        if cache.advance(x.size(1)):  # a later step
            h, c = (cache.tensors[name].transpose(0, 1).contiguous() for name in ("h", "c"))  # cuDNN wants it
            state = h, c, cache.tensors["attentional"]
        else:
            state = self.start(x, h0, c0)
        keys = cache.once("keys", lambda: self.attn.keys(memory))
        y, weights, (h, c, attentional) = self.decode(x, memory, memory_padding_mask, state, keys)
        cache.tensors.update(h=h.transpose(0, 1), c=c.transpose(0, 1), attentional=attentional)
        return y, weights

    def start(
        self, x: torch.Tensor, h0: torch.Tensor | None, c0: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(h_0, c_0), zeros unless given, and h̃_0 = 0."""
        shape = (self.lstm.num_layers, x.size(0), self.lstm.hidden_size)
        h = h0 if h0 is not None else x.new_zeros(shape)
        c = c0 if c0 is not None else x.new_zeros(shape)
        return h, c, x.new_zeros(x.size(0), 1, self.lstm.hidden_size)

    def decode(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        memory_padding_mask: torch.Tensor | None,
        state: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        keys: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The loop over the positions of x from `state` (h, c, h̃); `keys` is the memory's side of the score."""
        h, c, attentional = state
        outputs, weights = [], []
        for y_t in x.split(1, dim=1):
            h_t, (h, c) = self.lstm(torch.cat((y_t, attentional), dim=-1), (h, c))
            c_t, a_t = self.attn.attend(0, h_t, memory, keys, memory_padding_mask)
            attentional = torch.tanh(self.w_c(torch.cat((c_t, h_t), dim=-1)))
            outputs.append(self.dropout(attentional))
            weights.append(a_t)
        return torch.cat(outputs, dim=1), torch.cat(weights, dim=1), (h, c, attentional)
