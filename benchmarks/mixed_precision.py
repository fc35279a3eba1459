"""Train steps in bf16-mixed, as `blockgraph train --precision bf16-mixed` runs them: forward and loss under
`torch.autocast("cpu", torch.bfloat16)`, float32 master weights, backward outside the autocast.

The encoder (cases.encoder_models: d_model 512, 6 layers, batch 8 × seq 128) and the 6+6 translation model
(cases.translation), the same models and batches as the float32 train-step rows, against nn.TransformerEncoder
and nn.Transformer under the same autocast, and against our own float32 step in the same rounds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from benchmarks.cases import (
    Config,
    Row,
    call_encoder,
    check_close,
    encoder_models,
    mean_square,
    row,
    train_step_call,
    translation,
)
from benchmarks.timing import compare

MIXED, FULL = "bf16-mixed", "float32"
TORCH_ENCODER, OURS_ENCODERS = "nn.TransformerEncoder", ("blockgraph (primitives)", "blockgraph (encoder_layer)")


def autocast(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` run under CPU autocast to bfloat16."""

    def run(*args: Any) -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fn(*args)

    return run


def mixed_step(call: Callable[[], Any], model: nn.Module, loss: Callable[[Any], torch.Tensor]) -> Callable[[], None]:
    return train_step_call(autocast(call), model, autocast(loss))


def mixed_precision_case(cfg: Config) -> list[Row]:
    if cfg.dtype != torch.float32:
        reason = "skipped: bf16-mixed keeps float32 master weights (run with --dtype float32)"
        return [Row("train steps, bf16-mixed", "", "", skipped=reason)]
    return _encoder_rows(cfg) + _translation_rows(cfg)


def _encoder_rows(cfg: Config) -> list[Row]:
    models = encoder_models(cfg)
    x = torch.randn(cfg.batch, cfg.seq, cfg.d_model)
    names = (TORCH_ENCODER, *OURS_ENCODERS)
    with torch.no_grad():
        outputs = {n: autocast(call_encoder(n, models[n].eval(), x, None))() for n in names}
    for name in OURS_ENCODERS:
        check_close(f"encoder {name} ({MIXED})", outputs[TORCH_ENCODER], outputs[name], torch.bfloat16)
    steps = {
        f"{n} {MIXED}": mixed_step(call_encoder(n, models[n].train(), x, None), models[n], mean_square) for n in names
    }
    ours = OURS_ENCODERS[0]
    steps[f"{ours} {FULL}"] = train_step_call(call_encoder(ours, models[ours], x, None), models[ours], mean_square)
    times = compare(steps, warmup=cfg.warmup, repeats=cfg.repeats)
    what = f"encoder train step, {MIXED}"
    rows = [row(what, f"{TORCH_ENCODER} {MIXED}", f"{n} {MIXED}", times, 1.0, "same autocast") for n in OURS_ENCODERS]
    rows.append(row(what, f"{ours} {FULL}", f"{ours} {MIXED}", times, 2.0, "our own float32 step"))
    return rows


def _translation_rows(cfg: Config) -> list[Row]:
    t = translation(cfg)
    models = t.models()
    for m in models.values():
        m.eval()
    with torch.no_grad():
        expected, got = (autocast(t.call(name))() for name in models)
    check_close(f"translation ({MIXED})", expected, got, torch.bfloat16)
    steps = {f"{n} {MIXED}": mixed_step(t.call(n), m.train(), t.nll) for n, m in models.items()}
    steps[f"blockgraph {FULL}"] = train_step_call(t.call("blockgraph"), t.ours, t.nll)
    times = compare(steps, warmup=cfg.warmup, repeats=cfg.repeats)
    what = f"translation train step (6+6), {MIXED}"
    return [
        row(what, f"nn.Transformer {MIXED}", f"blockgraph {MIXED}", times, 1.0, "same autocast; NLL loss"),
        row(what, f"blockgraph {FULL}", f"blockgraph {MIXED}", times, 2.0, "our own float32 step"),
    ]
