"""Attention maps: where each target token of a translation looked in the source, read from the model and drawn.

`capture` runs a model once on a source and its decoded target (teacher forcing: the decoder reads the start
tokens and every generated token but the last, so row t is the query that chose target token t) and collects
the cross-attention weights of every attention node: each `multi_head_attention` whose keys are not its queries
(a Transformer decoder layer's `cross_attn`), and each RNN source attention (global, hard, local). The blocks
compute the weights themselves (`MultiHeadAttention.weights`, a source attention's `weights` output, a local
attention's window centre), so nothing here re-implements attention. `html`, `svg` and `png` draw them as
heatmaps, one row per target token and one column per source token (per layer and head, and their averages);
`write` writes the file atomically, refusing what every output refuses (common.atomic).
"""

from __future__ import annotations

import html as markup
import inspect
import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from blockgraph.blocks.attention import HardAttention, LocalAttention, MultiHeadAttention, SourceAttention
from blockgraph.builder.views.picture import canvas, xml_safe
from blockgraph.common.atomic import check_file_target, write_file, write_text
from blockgraph.common.errors import Problem, UsageError

Kind = Literal["multi_head", "global", "hard", "local"]
FORMATS = (".html", ".htm", ".svg", ".png")

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
        raise UsageError(
            Problem(f"cannot draw attention maps as {path.name!r}", hint="name an .html, .svg or .png file")
        )
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


def _text(value: str) -> str:
    """`value` escaped for XML and HTML (characters XML cannot hold become U+FFFD)."""
    return markup.escape(xml_safe(value), quote=True)


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


# --- PNG -----------------------------------------------------------------------------------------------------------

PNG_FONT = 12  # px: Pillow's built-in scalable font (ImageFont.load_default(size), as `inspect --format png` draws)
MARGIN = 10
INK, GRID = (17, 17, 17), (190, 190, 190)
_UNDRAWABLE = re.compile("[\x00-\x1f\x7f]")  # a newline would start a second line; the others have no glyph


def _label(value: str) -> str:
    """`value` as one line of a PNG label: control characters become U+FFFD (drawn, as every character the
    built-in font lacks, as its missing-glyph box)."""
    return _UNDRAWABLE.sub("\ufffd", value)


def _shade(weight: float) -> tuple[int, int, int]:
    """The colour of a cell: ACCENT at opacity `weight` over the white background, as the SVG paints it."""
    alpha = min(max(weight, 0.0), 1.0)
    red, green, blue = (round(255 + (int(ACCENT[i : i + 2], 16) - 255) * alpha) for i in (1, 3, 5))
    return red, green, blue


@dataclass(frozen=True)
class PlacedPanel:
    """Where `png` draws a heatmap: its cell (i, j) covers [x + j·CELL, y + i·CELL] to the next cell, exclusive."""

    panel: _Panel
    x: int  # the grid's top-left corner, in pixels
    y: int


def _png_layout(sentences: Sequence[SentenceAttention], font: Any) -> tuple[int, int, list, list[PlacedPanel]]:
    """The PNG's width, height, its lines of text [(x, y, text, vertical)] and its heatmaps, laid out as the SVG
    lays them out: sentence below sentence, a title, group below group, a group's panels side by side."""

    def width(text: str) -> int:
        return int(font.getlength(text)) + 1

    line = PNG_FONT + 6
    texts: list[tuple[int, int, str, bool]] = []
    placed: list[PlacedPanel] = []
    y, right = MARGIN, MARGIN
    for n, sentence in enumerate(sentences, 1):
        source, target = [_label(t) for t in sentence.source], [_label(t) for t in sentence.target]
        heading = f"{n}. {_label(' '.join(sentence.source))} -> {_label(sentence.translation)}"
        texts.append((MARGIN, y, heading, False))
        right = max(right, MARGIN + width(heading))
        y += line + 6
        left = max((width(t) for t in target), default=0) + 6
        top = line + max((width(s) for s in source), default=0) + 6
        for title, panels in _panels(sentence):
            texts.append((MARGIN, y, _label(title), False))
            y += line
            x, tallest = MARGIN, 0
            for panel in panels:
                rows, cols = panel.weights.shape
                texts.append((x, y, _label(panel.title), False))
                ox, oy = x + left, y + top
                for j in range(cols):
                    texts.append(
                        (ox + j * CELL + (CELL - PNG_FONT) // 2, oy - 4, source[j] if j < len(source) else "", True)
                    )
                for i in range(rows):
                    label = target[i] if i < len(target) else ""
                    texts.append((ox - 4 - width(label), oy + i * CELL + (CELL - line) // 2 + 2, label, False))
                placed.append(PlacedPanel(panel, ox, oy))
                right = max(right, ox + cols * CELL, x + width(panel.title))
                x = ox + cols * CELL + GAP
                tallest = max(tallest, top + rows * CELL)
            y += tallest + GAP
        y += GAP
    return right + MARGIN, y + MARGIN, texts, placed


def png_panels(sentences: Sequence[SentenceAttention]) -> list[PlacedPanel]:
    """Where `png(sentences)` draws each heatmap (in the order of the sentences and their panels)."""
    from PIL import ImageFont

    return _png_layout(sentences, ImageFont.load_default(PNG_FONT))[3]


def png(sentences: Sequence[SentenceAttention]) -> bytes:
    """The SVG's picture as PNG bytes, drawn with Pillow: the same heatmaps, labels and windows on white. Its
    built-in font covers Latin letters, digits and ASCII signs; another character (Chinese, é, →) is drawn as
    the font's missing-glyph box, and the HTML and SVG files show it as written. A picture larger than Pillow
    opens without a warning (Image.MAX_IMAGE_PIXELS, about 89 million pixels) is refused before it is drawn."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(PNG_FONT)
    width, height, texts, placed = _png_layout(sentences, font)
    hint = "draw fewer or shorter sentences into the PNG, or write FILE.html or FILE.svg"
    image = canvas(width, height, "the attention maps", hint)
    draw = ImageDraw.Draw(image)
    for x, y, text, vertical in texts:
        if not text:
            continue
        if not vertical:
            draw.text((x, y), text, fill=INK, font=font)
            continue
        # A source token reads upwards above its column, ending just above the grid.
        stamp = Image.new("L", (int(font.getlength(text)) + 1, PNG_FONT + 6), 0)
        ImageDraw.Draw(stamp).text((0, 0), text, fill=255, font=font)
        upright = stamp.rotate(90, expand=True)
        image.paste(INK, (x, y - upright.height), upright)
    for place in placed:
        weights = place.panel.weights
        rows, cols = weights.shape
        for i in range(rows):
            for j in range(cols):
                x, y = place.x + j * CELL, place.y + i * CELL
                draw.rectangle([x, y, x + CELL - 1, y + CELL - 1], fill=_shade(float(weights[i, j])))
        draw.rectangle([place.x - 1, place.y - 1, place.x + cols * CELL, place.y + rows * CELL], outline=GRID)
        if place.panel.window is not None:
            for i, (low, high) in enumerate(place.panel.window.tolist()):
                box = [
                    place.x + low * CELL,
                    place.y + i * CELL,
                    place.x + (high + 1) * CELL - 1,
                    place.y + (i + 1) * CELL - 1,
                ]
                draw.rectangle(box, outline=WINDOW, width=2)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write(path: Path, sentences: Sequence[SentenceAttention]) -> Path:
    """Write the maps to `path` as HTML, SVG or PNG (by its suffix), atomically."""
    check_path(path)
    suffix = path.suffix.lower()
    if suffix == ".png":
        data = png(sentences)
        return write_file(path, lambda tmp: tmp.write_bytes(data), what="attention maps")
    text = svg(sentences) if suffix == ".svg" else html(sentences)
    return write_text(path, text, what="attention maps")
