"""The benchmark cases. Each builds its models, checks that blockgraph and the reference compute the same
function (weights copied across), times them interleaved and returns rows of the results table."""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import references as refs
from benchmarks.timing import Timing, compare, paired_ratios
from blockgraph import builder

SPECS = Path(__file__).parent / "specs"


@dataclass
class Config:
    """Sizes and repeat counts of one run (`--quick` lowers the repeats, never the sizes)."""

    quick: bool = False
    dtype: torch.dtype = torch.float32
    rounds: int | None = None  # --repeats: heavy-case rounds instead of the default
    d_model: int = 512
    heads: int = 8
    d_ff: int = 2048
    layers: int = 6
    batch: int = 8
    seq: int = 128
    vocab: int = 8000
    lstm_input: int = 256
    lstm_hidden: int = 512
    lstm_seq: int = 64
    lstm_batch: int = 32
    chain: int = 200
    chain_width: int = 16
    moe_d_model: int = 512  # Mixtral's shape scaled down: d_ff = 3.5 · d_model, 8 experts, 2 per token
    moe_d_ff: int = 1792
    moe_experts: int = 8
    moe_top_k: int = 2

    @property
    def warmup(self) -> int:
        return 1

    @property
    def repeats(self) -> int:
        """Rounds for the heavy cases (seconds per call)."""
        return self.rounds or (3 if self.quick else 5)

    @property
    def light_repeats(self) -> int:
        """Rounds for the light cases (milliseconds per call)."""
        return 7 if self.quick else 15

    def dims(self) -> dict[str, Any]:
        return {
            "transformer": f"d_model {self.d_model}, heads {self.heads}, d_ff {self.d_ff}, {self.layers} layers, "
            f"batch {self.batch}, seq {self.seq}, dropout 0, vocab {self.vocab} (translation)",
            "lstm": f"input {self.lstm_input}, hidden {self.lstm_hidden}, seq {self.lstm_seq}, batch {self.lstm_batch}",
            "chain": f"{self.chain} × linear {self.chain_width}→{self.chain_width}, batch 8",
            "moe": f"d_model {self.moe_d_model}, d_ff {self.moe_d_ff}, {self.moe_experts} experts, top "
            f"{self.moe_top_k}, batch {self.batch}, seq {self.seq}",
        }


@dataclass
class Row:
    """One comparison: reference time / blockgraph time, ≥ 1 when blockgraph is as fast or faster."""

    case: str
    reference: str
    ours: str
    ref_s: float | None = None
    ours_s: float | None = None
    target: float | None = None  # ratio to reach (≥); None: reported only
    spread: tuple[float, float] | None = None  # min and max of the round-by-round ratios
    note: str = ""
    absolute_limit_s: float | None = None  # a target on ours_s itself (build on meta)
    skipped: str = ""

    paired: float | None = None  # median of the round-by-round ratios

    @property
    def ratio(self) -> float | None:
        if self.paired is not None:
            return self.paired
        if self.ref_s is None or self.ours_s is None:
            return None
        return self.ref_s / self.ours_s

    @property
    def met(self) -> bool | None:
        if self.skipped:
            return None
        if self.absolute_limit_s is not None:
            return self.ours_s is not None and self.ours_s <= self.absolute_limit_s
        if self.target is None or self.ratio is None:
            return None
        return self.ratio >= self.target

    @property
    def target_text(self) -> str:
        if self.absolute_limit_s is not None:
            return f"≤ {self.absolute_limit_s * 1e3:.0f} ms"
        if self.target is None:
            return "—"
        return f"≥ {self.target:.2f}" + (f" (≤ {1 / self.target:.1f}× the time)" if self.target < 1 else "")


def row(case: str, reference: str, ours: str, times: dict[str, Timing], target: float | None, note: str = "") -> Row:
    ratios = paired_ratios(times[reference], times[ours])
    return Row(
        case,
        reference,
        ours,
        times[reference].median,
        times[ours].median,
        target,
        (min(ratios), max(ratios)),
        note,
        paired=statistics.median(ratios),
    )


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Run with `n` intra-op threads: overhead-bound cases on tiny tensors gain nothing from more, only noise."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- helpers ----------------------------------------------------------------------------------------------------


def quiet_build(source: Any, **kwargs: Any) -> builder.GraphModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return builder.build(source, **kwargs)


def mean_square(y: torch.Tensor) -> torch.Tensor:
    return y.float().pow(2).mean()


def check_close(what: str, expected: torch.Tensor, got: torch.Tensor, dtype: torch.dtype) -> None:
    """The compared models must compute the same function, or the timing means nothing."""
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


def load(module: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    module.load_state_dict(state)
    return module


# --- Transformer encoder ----------------------------------------------------------------------------------------

PRIMITIVE_NAMES = {"self_attn": "attn", "ffn": "ffn", "norms": ("norm1.norm", "norm2.norm")}
LAYER_NAMES = {"self_attn": "self_attn", "ffn": "ffn", "norms": ("norm1", "norm2")}


def encoder_overrides(cfg: Config) -> dict[str, Any]:
    return {"d_model": cfg.d_model, "heads": cfg.heads, "d_ff": cfg.d_ff, "layers": cfg.layers, "dropout": 0.0}


def layer_spec(cfg: Config) -> dict[str, Any]:
    """The same stack as specs/encoder.yaml from the library's `encoder_layer` block."""
    return {
        "name": "bench-encoder-layers",
        "inputs": {
            "x": {"shape": ["batch", "seq", cfg.d_model]},
            "pad": {"dtype": "bool", "shape": ["batch", "seq"], "optional": True},
        },
        "nodes": {
            "encoder": {
                "type": "encoder_layer",
                "repeat": cfg.layers,
                "params": {"d_model": cfg.d_model, "heads": cfg.heads, "d_ff": cfg.d_ff},
                "in": {"x": "x", "src_key_padding_mask": "pad"},
            }
        },
        "outputs": "encoder",
    }


def encoder_models(cfg: Config) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    primitives = quiet_build(SPECS / "encoder.yaml", overrides=encoder_overrides(cfg), dtype=cfg.dtype)
    layers = load(quiet_build(layer_spec(cfg), dtype=cfg.dtype), primitives_as_layers(primitives.state_dict(), cfg))
    ours = primitives.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "enable_nested_tensor is True, but ..." does not apply here
        layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.heads, cfg.d_ff, dropout=0.0, batch_first=True)
        torch_encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=True)
    torch_state = {}
    annotated_state = {}
    for i in range(cfg.layers):
        prefix = f"encoder.{i}"
        torch_state |= {f"layers.{i}.{k}": v for k, v in refs.torch_layer_state(ours, prefix, PRIMITIVE_NAMES).items()}
        annotated_state |= {
            f"layers.{i}.{k}": v for k, v in refs.annotated_layer_state(ours, prefix, PRIMITIVE_NAMES).items()
        }
    annotated = refs.AnnotatedEncoder(cfg.d_model, cfg.heads, cfg.d_ff, cfg.layers)
    return {
        "nn.TransformerEncoder": load(torch_encoder, torch_state).to(cfg.dtype),
        "hand-written SDPA": load(annotated, annotated_state).to(cfg.dtype),
        "blockgraph (primitives)": primitives,
        "blockgraph (encoder_layer)": layers,
    }


def primitives_as_layers(ours: dict[str, torch.Tensor], cfg: Config) -> dict[str, torch.Tensor]:
    state = {}
    for key, value in ours.items():
        key = key.replace(".attn.", ".self_attn.").replace(".norm1.norm.", ".norm1.").replace(".norm2.norm.", ".norm2.")
        state[key] = value
    return state


def call_encoder(name: str, model: nn.Module, x: torch.Tensor, pad: torch.Tensor | None) -> Callable[..., Any]:
    """Arguments as each model takes them; nn.TransformerEncoder gets `src_key_padding_mask`."""
    if name.startswith("blockgraph"):
        return lambda: model(x=x, pad=pad)
    if name == "nn.TransformerEncoder":
        return lambda: model(x, src_key_padding_mask=pad)
    return lambda: model(x, pad)


def padding_mask(cfg: Config) -> torch.Tensor:
    """Right padding, lengths spread between half and all of seq (a quarter padded on average)."""
    lengths = torch.linspace(cfg.seq // 2, cfg.seq, cfg.batch).long()
    return torch.arange(cfg.seq)[None, :] >= lengths[:, None]


def encoder_case(cfg: Config) -> list[Row]:
    models = encoder_models(cfg)
    x = torch.randn(cfg.batch, cfg.seq, cfg.d_model, dtype=cfg.dtype)
    pad = padding_mask(cfg)
    check_encoders(models, x, pad, cfg)
    torch_name, hand_name = "nn.TransformerEncoder", "hand-written SDPA"
    ours = [n for n in models if n.startswith("blockgraph")]
    rows: list[Row] = []

    # training: forward + backward, no mask (the common pre-training shape)
    for m in models.values():
        m.train()
    steps = {name: train_step_call(call_encoder(name, m, x, None), m, mean_square) for name, m in models.items()}
    times = compare(steps, warmup=cfg.warmup, repeats=cfg.repeats)
    for name in ours:
        rows.append(row("encoder train step", torch_name, name, times, 1.1))
        rows.append(row("encoder train step", hand_name, name, times, 1.0))

    # inference: eval + no_grad; nn.TransformerEncoder takes its fused fast path
    for m in models.values():
        m.eval()
    calls = {name: no_grad(call_encoder(name, m, x, None)) for name, m in models.items()}
    times = compare(calls, warmup=cfg.warmup, repeats=cfg.repeats)
    for name in ours:
        rows.append(row("encoder inference", torch_name, name, times, 1.0, "torch fast path (fused layer kernel)"))
        rows.append(row("encoder inference", hand_name, name, times, 1.0))

    # inference with a padding mask: the hand-written model builds the SDPA mask once per call, blockgraph's
    # attention once per layer; the note says what building it costs
    ours_name = ours[0]
    padded = {name: models[name] for name in (torch_name, hand_name, ours_name)}
    calls = {name: no_grad(call_encoder(name, m, x, pad)) for name, m in padded.items()}
    times = compare(calls, warmup=cfg.warmup, repeats=cfg.repeats)
    nested = "torch converts to nested tensors and skips the padded quarter"
    rows.append(row("encoder inference, padding mask", torch_name, ours_name, times, None, nested))
    per_layer = times[ours_name].median / cfg.layers
    mask_s = mask_cost(cfg, pad)
    note = f"building the mask: {mask_s * 1e6:.0f} µs per layer = {100 * mask_s / per_layer:.3f} % of a layer"
    rows.append(row("encoder inference, padding mask", hand_name, ours_name, times, 1.0, note))
    return rows


def check_encoders(models: dict[str, nn.Module], x: torch.Tensor, pad: torch.Tensor, cfg: Config) -> None:
    """Same outputs (at the real positions) from every encoder, with a padding mask, in eval mode."""
    keep = ~pad[:, :, None]
    with torch.no_grad():
        expected = None
        for name, m in models.items():
            got = call_encoder(name, m.eval(), x, pad)() * keep
            expected = got if expected is None else expected
            check_close(f"encoder {name} (padded)", expected, got, cfg.dtype)


def mask_cost(cfg: Config, pad: torch.Tensor) -> float:
    """Seconds to turn the [batch, seq] padding mask into the SDPA mask, what each attention does per call."""
    from blockgraph.blocks.attention import combine_masks

    n = 2000
    start = time.perf_counter()
    for _ in range(n):
        combine_masks(cfg.seq, cfg.seq, pad, None, False, pad.device)
    return (time.perf_counter() - start) / n


def small_case(cfg: Config) -> list[Row]:
    """The shipped tiny encoder's sizes, where Python work per call, not arithmetic, decides the speed."""
    with threads(1):
        return _small_case(cfg)


def _small_case(cfg: Config) -> list[Row]:
    small = Config(d_model=64, heads=4, d_ff=256, layers=2, batch=2, seq=16, dtype=cfg.dtype, quick=cfg.quick)
    models = encoder_models(small)
    x = torch.randn(small.batch, small.seq, small.d_model, dtype=cfg.dtype)
    check_encoders(models, x, padding_mask(small), small)
    what = "small encoder (d_model 64, 2 layers, batch 2, seq 16)"
    rows = []
    for mode in ("inference", "train step"):
        calls = {}
        for name, m in models.items():
            call = call_encoder(name, m.train(mode != "inference"), x, None)
            calls[name] = no_grad(call) if mode == "inference" else train_step_call(call, m, mean_square)
        times = compare(calls, warmup=3, repeats=cfg.light_repeats, inner=20)
        for ref in ("nn.TransformerEncoder", "hand-written SDPA"):
            rows.append(row(f"{what} {mode}", ref, "blockgraph (primitives)", times, None, "1 thread; overhead-bound"))
    return rows


def train_step_call(
    call: Callable[[], Any], model: nn.Module, loss: Callable[[Any], torch.Tensor]
) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        for p in params:
            p.grad = None
        loss(call()).backward()

    return step


def no_grad(call: Callable[[], Any]) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            call()

    return run


# --- translation Transformer (6 + 6) ----------------------------------------------------------------------------


def translation_spec(cfg: Config) -> dict[str, Any]:
    """The base Transformer of the paper as nn.Transformer builds it (final norms after both stacks)."""
    layer = {"d_model": "${d_model}", "heads": "${heads}", "d_ff": "${d_ff}", "dropout": "${dropout}"}
    return {
        "name": "bench-translation",
        "vars": {
            "vocab": cfg.vocab,
            "d_model": cfg.d_model,
            "heads": cfg.heads,
            "d_ff": cfg.d_ff,
            "layers": cfg.layers,
            "dropout": 0.0,
        },
        "dims": {"batch": cfg.batch, "src_len": cfg.seq, "tgt_len": cfg.seq},
        "inputs": {
            "src": {"dtype": "int64", "shape": ["batch", "src_len"], "high": "${vocab}"},
            "tgt": {"dtype": "int64", "shape": ["batch", "tgt_len"], "high": "${vocab}"},
        },
        "nodes": {
            "src_embed": {
                "type": "token_embedding",
                "params": {"vocab": "${vocab}", "dim": "${d_model}", "scale": True},
                "in": "src",
            },
            "src_pos": {
                "type": "sinusoidal_position",
                "params": {"dim": "${d_model}", "max_len": 512},
                "in": "src_embed",
            },
            "encoder": {"type": "encoder_layer", "repeat": "${layers}", "params": layer, "in": "src_pos"},
            "encoder_norm": {"type": "layer_norm", "params": {"dim": "${d_model}"}, "in": "encoder"},
            "tgt_embed": {
                "type": "token_embedding",
                "params": {"vocab": "${vocab}", "dim": "${d_model}", "scale": True},
                "in": "tgt",
            },
            "tgt_pos": {
                "type": "sinusoidal_position",
                "params": {"dim": "${d_model}", "max_len": 512},
                "in": "tgt_embed",
            },
            "decoder": {
                "type": "decoder_layer",
                "repeat": "${layers}",
                "params": layer,
                "in": {"x": "tgt_pos", "memory": "encoder_norm"},
            },
            "decoder_norm": {"type": "layer_norm", "params": {"dim": "${d_model}"}, "in": "decoder"},
            "generator": {
                "type": "generator",
                "params": {"d_model": "${d_model}", "vocab": "${vocab}"},
                "in": "decoder_norm",
            },
        },
        "outputs": "generator",
    }


def torch_translation(cfg: Config) -> refs.TorchSeq2Seq:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return refs.TorchSeq2Seq(cfg.vocab, cfg.d_model, cfg.heads, cfg.d_ff, cfg.layers)


def translation_state(ours: dict[str, torch.Tensor], cfg: Config) -> dict[str, torch.Tensor]:
    state = {
        "src_embed.weight": ours["src_embed.lut.weight"],
        "tgt_embed.weight": ours["tgt_embed.lut.weight"],
        "generator.weight": ours["generator.proj.weight"],
        "generator.bias": ours["generator.proj.bias"],
    }
    for side in ("encoder", "decoder"):
        for kind in ("weight", "bias"):
            state[f"transformer.{side}.norm.{kind}"] = ours[f"{side}_norm.norm.{kind}"]
    enc = {"self_attn": "self_attn", "ffn": "ffn", "norms": ("norm1", "norm2")}
    dec = {"self_attn": "self_attn", "cross_attn": "cross_attn", "ffn": "ffn", "norms": ("norm1", "norm2", "norm3")}
    for i in range(cfg.layers):
        for side, names in (("encoder", enc), ("decoder", dec)):
            layer = refs.torch_layer_state(ours, f"{side}.{i}", names)
            state |= {f"transformer.{side}.layers.{i}.{k}": v for k, v in layer.items()}
    return state


@dataclass
class Translation:
    """The 6+6 model of ours and nn.Transformer with the same weights, and the batch their train steps read."""

    ours: builder.GraphModel
    ref: refs.TorchSeq2Seq
    src: torch.Tensor
    tgt: torch.Tensor
    gold: torch.Tensor

    def nll(self, logp: torch.Tensor) -> torch.Tensor:
        return F.nll_loss(logp.flatten(0, 1).float(), self.gold)

    def models(self) -> dict[str, nn.Module]:
        return {"nn.Transformer": self.ref, "blockgraph": self.ours}

    def call(self, name: str) -> Callable[[], torch.Tensor]:
        if name == "blockgraph":
            return lambda: self.ours(src=self.src, tgt=self.tgt)
        return lambda: self.ref(self.src, self.tgt)


def translation(cfg: Config) -> Translation:
    torch.manual_seed(0)
    ours = quiet_build(translation_spec(cfg), dtype=cfg.dtype)
    ref = load(torch_translation(cfg), translation_state(ours.state_dict(), cfg)).to(cfg.dtype)
    src = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq))
    tgt = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq))
    return Translation(ours, ref, src, tgt, torch.randint(0, cfg.vocab, (cfg.batch * cfg.seq,)))


def translation_case(cfg: Config) -> list[Row]:
    t = translation(cfg)
    for m in t.models().values():
        m.eval()
    with torch.no_grad():
        check_close("translation", t.call("nn.Transformer")(), t.call("blockgraph")(), cfg.dtype)
    steps = {name: train_step_call(t.call(name), m.train(), t.nll) for name, m in t.models().items()}
    times = compare(steps, warmup=cfg.warmup, repeats=cfg.repeats)
    return [
        row("translation train step (6+6)", "nn.Transformer", "blockgraph", times, 1.1, "NLL loss, same embeddings")
    ]


# --- LSTM -------------------------------------------------------------------------------------------------------


def lstm_spec(cfg: Config, implementation: str | None) -> dict[str, Any]:
    params: dict[str, Any] = {"input_size": cfg.lstm_input, "hidden_size": cfg.lstm_hidden}
    if implementation is not None:
        params["implementation"] = implementation
    return {
        "name": f"bench-lstm-{implementation or 'default'}",
        "inputs": {"x": {"shape": ["batch", "seq", cfg.lstm_input]}},
        "nodes": {"lstm": {"type": "lstm", "params": params, "in": "x"}},
        "outputs": {"y": "lstm.y", "h": "lstm.h", "c": "lstm.c"},
    }


def lstm_case(cfg: Config) -> list[Row]:
    torch.manual_seed(0)
    ref = nn.LSTM(cfg.lstm_input, cfg.lstm_hidden, batch_first=True).to(cfg.dtype)
    default = quiet_build(lstm_spec(cfg, None), dtype=cfg.dtype)
    implementation = default.lstm.implementation
    models = {
        f"blockgraph default ({implementation})": default,
        "blockgraph gates": quiet_build(lstm_spec(cfg, "gates"), dtype=cfg.dtype),
        "blockgraph fused": quiet_build(lstm_spec(cfg, "fused"), dtype=cfg.dtype),
    }
    x = torch.randn(cfg.lstm_batch, cfg.lstm_seq, cfg.lstm_input, dtype=cfg.dtype)
    with torch.no_grad():
        expected = ref(x)[0]
        for name, m in models.items():
            m.load_state_dict({f"lstm.{k}": v for k, v in ref.state_dict().items()})
            check_close(name, expected, m(x=x)["y"], cfg.dtype)
    steps = {"nn.LSTM": train_step_call(lambda: ref(x)[0], ref, mean_square)}
    for name, m in models.items():
        steps[name] = train_step_call(lambda m=m: m(x=x)["y"], m, mean_square)
    times = compare(steps, warmup=cfg.warmup, repeats=cfg.repeats)
    return [
        row("LSTM train step", "nn.LSTM", name, times, 1.0 if name.startswith("blockgraph default") else None)
        for name in models
    ]


# --- graph overhead ---------------------------------------------------------------------------------------------


def chain_case(cfg: Config) -> list[Row]:
    """Only the calling code differs: the generated forward against nn.Sequential over the very same modules."""
    with threads(1):
        return _chain_case(cfg)


def _chain_case(cfg: Config) -> list[Row]:
    spec = {
        "name": "bench-chain",
        "inputs": {"x": {"shape": ["batch", cfg.chain_width]}},
        "nodes": {
            "chain": {
                "type": "linear",
                "repeat": cfg.chain,
                "params": {"in_features": cfg.chain_width, "out_features": cfg.chain_width},
                "in": "x",
            }
        },
        "outputs": "chain",
    }
    ours = quiet_build(spec, dtype=cfg.dtype).eval()
    sequential = nn.Sequential(*ours.chain).eval()  # the very same block modules
    x = torch.randn(8, cfg.chain_width, dtype=cfg.dtype)
    with torch.no_grad():
        check_close("chain", sequential(x), ours(x=x), cfg.dtype)
    calls = {"nn.Sequential": no_grad(lambda: sequential(x)), "blockgraph": no_grad(lambda: ours(x=x))}
    times = compare(calls, warmup=3, repeats=cfg.light_repeats * 2, inner=20)
    note = "1 thread; inference; the same modules, only the calling code differs"
    rows = [row(f"graph overhead, {cfg.chain}-node chain", "nn.Sequential", "blockgraph", times, 0.98, note)]
    steps = {
        "nn.Sequential": train_step_call(lambda: sequential(x), sequential, mean_square),
        "blockgraph": train_step_call(lambda: ours(x=x), ours, mean_square),
    }
    times = compare(steps, warmup=3, repeats=cfg.light_repeats, inner=5)
    rows.append(
        row(
            f"graph overhead, {cfg.chain}-node chain, train step",
            "nn.Sequential",
            "blockgraph",
            times,
            0.98,
            "1 thread",
        )
    )
    return rows


# --- mixture of experts -----------------------------------------------------------------------------------------


def moe_case(cfg: Config) -> list[Row]:
    """A Mixtral-shaped `mixture_of_experts` (each expert on the tokens routed to it) against the same routing
    with every expert on every token, forward only, the very same modules."""
    params = {"d_model": cfg.moe_d_model, "d_ff": cfg.moe_d_ff, "experts": cfg.moe_experts, "top_k": cfg.moe_top_k}
    spec = {
        "name": "bench-moe",
        "inputs": {"x": {"shape": ["batch", "seq", cfg.moe_d_model]}},
        "nodes": {"moe": {"type": "mixture_of_experts", "params": params, "in": "x"}},
        "outputs": "moe.y",
    }
    torch.manual_seed(0)
    ours = quiet_build(spec, dtype=cfg.dtype).eval()
    dense = refs.DenseExperts(ours.moe).eval()
    x = torch.randn(cfg.batch, cfg.seq, cfg.moe_d_model, dtype=cfg.dtype)
    with torch.no_grad():
        check_close("mixture of experts", dense(x), ours(x=x), cfg.dtype)
    calls = {"dense loop over experts": no_grad(lambda: dense(x)), "blockgraph": no_grad(lambda: ours(x=x))}
    times = compare(calls, warmup=cfg.warmup, repeats=cfg.repeats)
    ideal = cfg.moe_experts / cfg.moe_top_k
    note = f"forward; the dense loop does {ideal:g}× the expert work"
    return [row("Mixtral-shaped MoE layer forward", "dense loop over experts", "blockgraph", times, None, note)]


# --- torch.compile ----------------------------------------------------------------------------------------------


def compile_case(cfg: Config) -> list[Row]:
    """A small encoder (2 layers, d_model 128) eager vs `torch.compile(fullgraph=True)`: no graph breaks allowed."""
    what = "torch.compile (2-layer encoder, d_model 128, seq 64)"
    reason = compiler_unavailable()
    if reason:
        return [Row(what, "eager", "compiled", skipped=reason)]
    torch.manual_seed(0)
    overrides = {"d_model": 128, "heads": 4, "d_ff": 512, "layers": 2, "dropout": 0.0}
    model = quiet_build(SPECS / "encoder.yaml", overrides=overrides, dtype=cfg.dtype).eval()
    x = torch.randn(cfg.batch, 64, 128, dtype=cfg.dtype)
    try:
        compiled = torch.compile(model, fullgraph=True)
        start = time.perf_counter()
        with torch.no_grad():
            got = compiled(x=x)
        compile_s = time.perf_counter() - start
        with torch.no_grad():
            check_close("compiled", model(x=x), got, cfg.dtype)
    except Exception as exc:  # a missing toolchain shows up only when inductor compiles its first kernel
        last = traceback.format_exception_only(type(exc), exc)[-1].strip().splitlines()[0]
        return [Row(what, "eager", "compiled", skipped=f"torch.compile failed: {last[:160]}")]
    calls = {"eager": no_grad(lambda: model(x=x)), "compiled": no_grad(lambda: compiled(x=x))}
    times = compare(calls, warmup=2, repeats=cfg.light_repeats, inner=3)
    return [
        row(
            what,
            "eager",
            "compiled",
            times,
            None,
            f"inference; first call (compile) {compile_s:.1f} s, inductor cache may be warm",
        )
    ]


def compiler_unavailable() -> str:
    """Why torch.compile cannot run here, or '' when it should (inductor's CPU backend needs a C++ compiler)."""
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    if os.environ.get("BLOCKGRAPH_BENCH_NO_COMPILE"):
        return "skipped: BLOCKGRAPH_BENCH_NO_COMPILE is set"
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if not cxx:
        return "skipped: no C++ compiler (g++/clang++) on PATH, which inductor needs for CPU kernels"
    return ""


# --- build time -------------------------------------------------------------------------------------------------


def build_case(cfg: Config) -> list[Row]:
    spec = translation_spec(cfg)
    builder.load_spec(spec)  # imports, registry, sympy caches: not what we measure
    calls = {
        "nn.Transformer + embeddings": lambda: torch_translation(cfg),
        "blockgraph build": lambda: quiet_build(spec),
    }
    times = compare(calls, warmup=1, repeats=cfg.repeats)
    stages = time_stages(spec, cfg.repeats)
    note = "validate + shapes {:.0f} ms, compile + allocate {:.0f} ms".format(*(s * 1e3 for s in stages))
    rows = [row("build 6+6 translation model", "nn.Transformer + embeddings", "blockgraph build", times, 1 / 1.2, note)]
    meta = compare({"meta": lambda: quiet_build(spec, device="meta")}, warmup=1, repeats=cfg.light_repeats)["meta"]
    rows.append(
        Row(
            "build on the meta device",
            "",
            "blockgraph build",
            ours_s=meta.median,
            absolute_limit_s=0.05,
            note="validate + compile, no weights",
        )
    )
    return rows


def time_stages(spec: dict[str, Any], repeats: int) -> tuple[float, float]:
    """Median seconds of (load + validate + graph + shapes) and (compile + allocate)."""
    front, back = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            typed = builder.typed_graph(spec)
        middle = time.perf_counter()
        builder.compile_graph(typed)
        front.append(middle - start)
        back.append(time.perf_counter() - middle)
    return sorted(front)[len(front) // 2], sorted(back)[len(back) // 2]


CASES: dict[str, Callable[[Config], list[Row]]] = {
    "encoder": encoder_case,
    "translation": translation_case,
    "lstm": lstm_case,
    "small": small_case,
    "chain": chain_case,
    "moe": moe_case,
    "compile": compile_case,
    "build": build_case,
}


@dataclass
class Profiled:
    name: str
    table: str = field(default="")


def profile_case(cfg: Config, case: str, sort_by: str = "self_cpu_time_total", rows: int = 15) -> list[Profiled]:
    """torch.profiler tables of one training step (one inference for `chain`) of each contender of a case."""
    from torch.profiler import profile

    contenders: dict[str, Callable[[], Any]] = {}
    if case in ("encoder", "encoder-inference"):
        models = encoder_models(cfg)
        x = torch.randn(cfg.batch, cfg.seq, cfg.d_model, dtype=cfg.dtype)
        for name, m in models.items():
            if case == "encoder":
                contenders[name] = train_step_call(call_encoder(name, m, x, None), m.train(), mean_square)
            else:
                contenders[name] = no_grad(call_encoder(name, m.eval(), x, None))
    elif case == "translation":
        torch.manual_seed(0)
        ours = quiet_build(translation_spec(cfg))
        ref = torch_translation(cfg)
        src = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq))
        contenders["nn.Transformer"] = train_step_call(lambda: ref(src, src), ref, mean_square)
        contenders["blockgraph"] = train_step_call(lambda: ours(src=src, tgt=src), ours, mean_square)
    elif case == "lstm":
        ref = nn.LSTM(cfg.lstm_input, cfg.lstm_hidden, batch_first=True)
        x = torch.randn(cfg.lstm_batch, cfg.lstm_seq, cfg.lstm_input)
        contenders["nn.LSTM"] = train_step_call(lambda: ref(x)[0], ref, mean_square)
        for impl in ("gates", "fused"):
            m = quiet_build(lstm_spec(cfg, impl))
            contenders[f"blockgraph {impl}"] = train_step_call(lambda m=m: m(x=x)["y"], m, mean_square)
    else:
        raise SystemExit(f"--profile takes encoder, encoder-inference, translation or lstm, not {case!r}")
    out = []
    for name, fn in contenders.items():
        fn()
        with profile() as prof:
            fn()
        out.append(Profiled(name, prof.key_averages().table(sort_by=sort_by, row_limit=rows)))
    return out


__all__: Sequence[str] = ["CASES", "Config", "Row", "profile_case"]
