"""ViT-B/16 inference (specs/vit.yaml at its defaults: 224 × 224 images, 1000 classes) against transformers'
ViTForImageClassification (its ViTModel and the classifier on [CLS]) with the same weights: the reference is drawn
at random, written by `save_pretrained` and imported through the `vit` family, so both compute one function (the
logits and final states are compared before timing). Eval mode, no_grad, batch 8 by default; transformers'
default attention (SDPA), as ours.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import warnings
from pathlib import Path

import torch

from benchmarks.cases import Config, Row, check_close, no_grad, row
from benchmarks.timing import compare
from blockgraph.builder.hf_import import import_directory

REFERENCE, OURS = "transformers ViTForImageClassification", "blockgraph (specs/vit.yaml)"
BATCH, SIZE = 8, 224


def vit_case(cfg: Config) -> list[Row]:
    what = f"ViT-B/16 inference (batch {BATCH}, {SIZE} × {SIZE})"
    try:
        import transformers
    except ImportError:
        return [Row(what, REFERENCE, OURS, skipped="skipped: transformers is not installed")]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=1000)).eval()
        with tempfile.TemporaryDirectory() as folder:
            with contextlib.redirect_stderr(io.StringIO()):  # its progress bar
                reference.save_pretrained(folder)
            ours = import_directory(Path(folder)).model.eval()
    reference, ours = reference.to(cfg.dtype), ours.to(cfg.dtype)
    image = torch.randn(BATCH, 3, SIZE, SIZE, dtype=cfg.dtype)
    with torch.no_grad():
        want, got = reference(image), ours(image=image)
        check_close("ViT logits", want.logits, got["logits"], cfg.dtype)
        states = reference.vit(image).last_hidden_state
        check_close("ViT last hidden state", states, got["last_hidden_state"], cfg.dtype)
    calls = {REFERENCE: no_grad(lambda: reference(image)), OURS: no_grad(lambda: ours(image=image))}
    times = compare(calls, warmup=cfg.warmup, repeats=cfg.repeats)
    note = (
        f"eval, no_grad, {str(cfg.dtype).removeprefix('torch.')}; the same aten calls (73 addmm, 12 SDPA, 1 "
        "convolution): parity, within noise; 35.13G FLOPs (17.56G multiply-adds) per image"
    )
    return [row(what, REFERENCE, OURS, times, 0.95, note)]
