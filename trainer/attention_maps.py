"""Attention maps: where each target token of a translation looked in the source, read from the model and drawn.

`capture` runs a model once on a source and its decoded target (teacher forcing: the decoder reads the start
tokens and every generated token but the last, so row t is the query that chose target token t) and collects
the cross-attention weights of every attention node: each `multi_head_attention` whose keys are not its queries
(a Transformer decoder layer's `cross_attn`), and each RNN source attention (global, hard, local). The blocks
compute the weights themselves (`MultiHeadAttention.weights`, a source attention's `weights` output, a local
attention's window centre), so nothing here re-implements attention. `html` and `svg` draw them as heatmaps,
one row per target token and one column per source token (per layer and head, and their averages); `write`
writes either file atomically, refusing what every output refuses (common.atomic).
"""

from __future__ import annotations

import html as markup
import inspect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from blockgraph.blocks.attention import HardAttention, LocalAttention, MultiHeadAttention, SourceAttention
from blockgraph.common.atomic import check_file_target, write_text
from blockgraph.common.errors import Problem, UsageError

Kind = Literal["multi_head", "global", "hard", "local"]
FORMATS = (".html", ".htm", ".svg")

CELL = 18  # px per weight
GAP = 24  # px between panels
FONT = 11
ACCENT = "#2563eb"  # the weight colour: its opacity is the weight (readable on light and dark backgrounds)
WINDOW = "#ea580c"  # the outline of a local attention's window


@dataclass(frozen=True)
class AttentionMap:
    """One attention node's weights over one sentence."""

    node: str  # the attention's module path, as in state_dict keys (decoder.0.cross_attn, attn)
    kind: Kind
    weights: torch.Tensor  # [heads, tgt_len, src_len], float32 on the CPU; one head for an RNN source attention
    window: torch.Tensor | None = None  # local attention: each row's first and last source position, [tgt_len, 2]


@dataclass(frozen=True)
class SentenceAttention:
    """A translated sentence with the attention maps of its best translation."""

    source: list[str]  # the source tokens, as the model read them (its end mark included)
    target: list[str]  # the generated tokens, one per row of the maps (eos included when generated)
    translation: str
    maps: list[AttentionMap]


def check_path(path: Path) -> None:
    """Refuse an attention-map file name before any decoding: an unknown format, or a target no output replaces."""
    if path.suffix.lower() not in FORMATS:
        raise UsageError(Problem(f"cannot draw attention maps as {path.name!r}", hint="name an .html or .svg file"))
    check_file_target(path, what="attention maps")


def capture(model: nn.Module, run: Callable[[], object]) -> list[AttentionMap]:
    """The cross-attention weights of example 0 at every attention node of `model` during `run()`, in the order
    the nodes ran."""
    found: list[AttentionMap] = []

    def hook(name: str, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        given = inspect.signature(module.forward).bind(*args, **kwargs).arguments
        if isinstance(module, MultiHeadAttention):
            if given.get("key") is None or given["key"] is given["query"]:
                return  # a self-attention
            weights = module.weights(**given)[0]
            found.append(AttentionMap(name, "multi_head", weights.detach().float().cpu()))
            return
        assert isinstance(module, SourceAttention)
        weights = output[1][0][None].detach().float().cpu()
        window = None
        if isinstance(module, LocalAttention):
            centre = module.aligned(0, given["query"], given["memory"], given.get("memory_padding_mask"))[0]
            last = given["memory"].size(1) - 1
            if given.get("memory_padding_mask") is not None:
                last = int((~given["memory_padding_mask"][0]).sum()) - 1
            low = torch.ceil(centre - module.window).clamp(0, last)
            high = torch.floor(centre + module.window).clamp(0, last)
            window = torch.stack((low, high), -1).long().cpu()
        kind: Kind = "hard" if isinstance(module, HardAttention) else "local" if window is not None else "global"
        found.append(AttentionMap(name, kind, weights, window))

    handles = [
        module.register_forward_hook(lambda m, a, k, o, name=name: hook(name, m, a, k, o), with_kwargs=True)
        for name, module in model.named_modules()
        if isinstance(module, MultiHeadAttention | SourceAttention)
    ]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return found


# --- drawing ------------------------------------------------------------------------------------------------------

_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _text(value: str) -> str:
    """`value` escaped for XML and HTML (characters XML cannot hold become U+FFFD)."""
    return markup.escape(_NOT_XML.sub("\ufffd", value), quote=True)


@dataclass(frozen=True)
class _Panel:
    title: str
    weights: torch.Tensor  # [tgt_len, src_len]
    window: torch.Tensor | None = None


def _panels(sentence: SentenceAttention) -> list[tuple[str, list[_Panel]]]:
    """The groups of heatmaps of a sentence: each attention node (its head average, then each head), and the
    average of all a Transformer's layers when it has several."""
    groups = []
    heads = [m for m in sentence.maps if m.kind == "multi_head"]
    if len(heads) > 1:
        every = torch.stack([m.weights.mean(0) for m in heads]).mean(0)
        groups.append(("all layers", [_Panel("average of every layer and head", every)]))
    for m in sentence.maps:
        if m.kind == "multi_head":
            panels = [_Panel("average of the heads", m.weights.mean(0))]
            panels += [_Panel(f"head {h + 1}", m.weights[h]) for h in range(m.weights.size(0))]
        else:
            title = {"global": "global (soft) weights", "hard": "hard: the one-hot choice", "local": "local: window"}
            panels = [_Panel(title[m.kind], m.weights[0], m.window)]
        groups.append((f"{m.node} ({m.kind.replace('_', '-')} attention)", panels))
    return groups


def _panel_svg(
    panel: _Panel, source: Sequence[str], target: Sequence[str], x: float, y: float
) -> tuple[str, float, float]:
    """One heatmap at (x, y): the source tokens above it, the target tokens left of it; its svg, width, height."""
    left = FONT * 0.62 * max((len(t) for t in target), default=1) + 6
    top = FONT * 0.62 * max((len(s) for s in source), default=1) * 0.75 + 26
    parts = [f'<text x="{x:.1f}" y="{y + FONT:.1f}" font-weight="bold">{_text(panel.title)}</text>']
    ox, oy = x + left, y + top
    for j, token in enumerate(source):
        cx = ox + j * CELL + CELL / 2 + FONT / 3
        parts.append(f'<text transform="translate({cx:.1f},{oy - 4:.1f}) rotate(-50)">{_text(token)}</text>')
    rows, cols = panel.weights.shape
    parts.append(
        f'<rect x="{ox:.1f}" y="{oy:.1f}" width="{cols * CELL}" height="{rows * CELL}" class="grid" '
        'fill="none" stroke="currentColor" stroke-opacity="0.3"/>'
    )
    for i in range(rows):
        cy = oy + i * CELL
        label = target[i] if i < len(target) else ""
        parts.append(f'<text x="{ox - 4:.1f}" y="{cy + CELL * 0.7:.1f}" text-anchor="end">{_text(label)}</text>')
        for j in range(cols):
            value = float(panel.weights[i, j])
            tip = f"{_text(label)} → {_text(source[j] if j < len(source) else '')}: {value:.3f}"
            parts.append(
                f'<rect x="{ox + j * CELL:.1f}" y="{cy:.1f}" width="{CELL}" height="{CELL}" fill="{ACCENT}" '
                f'fill-opacity="{value:.4f}"><title>{tip}</title></rect>'
            )
        if panel.window is not None:
            low, high = (int(v) for v in panel.window[i])
            parts.append(
                f'<rect x="{ox + low * CELL:.1f}" y="{cy:.1f}" width="{(high - low + 1) * CELL}" height="{CELL}" '
                f'fill="none" stroke="{WINDOW}" stroke-width="1.5" class="window"/>'
            )
    return "\n".join(parts), left + cols * CELL, top + rows * CELL


def _sentence_svg(sentence: SentenceAttention) -> tuple[str, float, float]:
    """A sentence's heatmaps, group below group, panels of a group side by side: svg content, width, height."""
    parts, y, width = [], 0.0, 0.0
    for title, panels in _panels(sentence):
        parts.append(f'<text x="0" y="{y + FONT + 2:.1f}" font-size="{FONT + 2}">{_text(title)}</text>')
        y += FONT + 12
        x, tallest = 0.0, 0.0
        for panel in panels:
            drawn, w, h = _panel_svg(panel, sentence.source, sentence.target, x, y)
            parts.append(drawn)
            x += w + GAP
            tallest = max(tallest, h)
        width = max(width, x)
        y += tallest + GAP
    return "\n".join(parts), width, y


def _legend() -> str:
    steps, step = [0.0, 0.25, 0.5, 0.75, 1.0], 2 * CELL
    cells = "".join(
        f'<rect x="{i * step}" y="0" width="{CELL}" height="{CELL}" fill="{ACCENT}" fill-opacity="{v}" '
        f'stroke="currentColor" stroke-opacity="0.3"/><text x="{i * step}" y="{CELL + FONT + 2}">{v:g}</text>'
        for i, v in enumerate(steps)
    )
    return (
        f'<svg width="{len(steps) * step}" height="{CELL + FONT + 6}" font-size="{FONT}" fill="currentColor">'
        f"{cells}</svg>"
    )


ABOUT = (
    "Each heatmap: one row per generated target token, one column per source token; a cell's colour is the "
    "weight with which that target position attended that source token (hover for the value). A Transformer "
    "shows each decoder layer's cross-attention, the average of its heads then each head, and first the "
    "average of every layer; an RNN's global attention its soft weights, a hard attention its one-hot choice, "
    "a local attention its weights with each row's window [p_t − D, p_t + D] outlined."
)


def html(sentences: Sequence[SentenceAttention]) -> str:
    """A self-contained HTML page (inline SVG and CSS, no request of any kind) of every sentence's heatmaps."""
    sections = []
    for n, sentence in enumerate(sentences, 1):
        drawn, width, height = _sentence_svg(sentence)
        sections.append(
            f"<section><h2>{n}. {_text(' '.join(sentence.source))}</h2>"
            f'<p class="translation">→ {_text(sentence.translation)}</p>'
            f'<svg width="{width:.0f}" height="{height:.0f}" font-size="{FONT}" font-family="sans-serif" '
            f'fill="currentColor">{drawn}</svg></section>'
        )
    style = (
        ":root{color-scheme:light dark}body{font-family:sans-serif;margin:1.5em;background:#fff;color:#111}"
        "@media (prefers-color-scheme:dark){body{background:#111;color:#eee}}"
        "section{margin-bottom:2em;overflow-x:auto}h2{font-size:1.1em}.translation{font-size:1.05em}"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Attention maps</title>'
        f"<style>{style}</style></head><body><h1>Attention maps</h1><p>{_text(ABOUT)}</p>"
        f"<p>Weight: {_legend()}</p>\n" + "\n".join(sections) + "\n</body></html>\n"
    )


def svg(sentences: Sequence[SentenceAttention]) -> str:
    """One SVG picture of every sentence's heatmaps, sentence below sentence, on a white background."""
    parts, y, width = [], 0.0, 0.0
    for n, sentence in enumerate(sentences, 1):
        parts.append(
            f'<text x="0" y="{y + 16:.1f}" font-size="14" font-weight="bold">{n}. '
            f"{_text(' '.join(sentence.source))} → {_text(sentence.translation)}</text>"
        )
        drawn, w, h = _sentence_svg(sentence)
        parts.append(f'<g transform="translate(0,{y + 28:.1f})">{drawn}</g>')
        y += h + 28 + GAP
        width = max(width, w)
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width + 20:.0f}" height="{y + 20:.0f}" '
        f'font-size="{FONT}" font-family="sans-serif" color="#111" fill="#111">'
        f'<rect width="100%" height="100%" fill="#fff"/><g transform="translate(10,10)">'
        + "\n".join(parts)
        + "</g></svg>\n"
    )


def write(path: Path, sentences: Sequence[SentenceAttention]) -> Path:
    """Write the maps to `path` as HTML or SVG (by its suffix), atomically."""
    check_path(path)
    text = svg(sentences) if path.suffix.lower() == ".svg" else html(sentences)
    return write_text(path, text, what="attention maps")
