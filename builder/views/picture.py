"""`inspect --format svg | png`: the layered layout (views.layout) drawn as a picture, without a renderer to install.

The SVG is also the body of the HTML view, which adds the members of collapsed groups (hidden until a click) and
the data its script reads; the PNG draws the same boxes, edges and labels with Pillow.
"""

from __future__ import annotations

import io
import re
from typing import TYPE_CHECKING
from xml.sax import saxutils

from blockgraph.builder.views.layout import BOX_PAD, HEADER, LINE_H, Scene, edge_path, place
from blockgraph.common.errors import Problem, UsageError

if TYPE_CHECKING:
    from PIL import Image

# Light colours; the HTML view and an SVG opened in a browser switch to the dark ones with the system's theme.
STYLE = """
svg.graph { font: 12px ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; }
.graph rect { fill: #ffffff; stroke: #4a5568; stroke-width: 1; }
.graph .group > rect { fill: #eef3fb; stroke: #3b6fb6; }
.graph .group.expanded > rect { fill: rgba(59, 111, 182, 0.06); stroke-dasharray: 5 3; }
.graph .input > rect, .graph .output > rect { fill: #f3f0e6; }
.graph text { fill: #1a202c; }
.graph .title { font-weight: bold; }
.graph .edge path { fill: none; stroke: #718096; stroke-width: 1.2; }
.graph .edge text { fill: #2b6cb0; font-size: 10px; paint-order: stroke; stroke: #ffffff; stroke-width: 3px; }
.graph .arrow { fill: #718096; }
.graph .match > rect { stroke: #d69e2e; stroke-width: 3; }
@media (prefers-color-scheme: dark) {
  .graph rect { fill: #1f2430; stroke: #a0aec0; }
  .graph .group > rect { fill: #1c2a40; stroke: #63a4ff; }
  .graph .input > rect, .graph .output > rect { fill: #2d2a20; }
  .graph text { fill: #e2e8f0; }
  .graph .edge path { stroke: #a0aec0; }
  .graph .edge text { fill: #90cdf4; stroke: #12151c; }
  .graph .arrow { fill: #a0aec0; }
}
"""


# Characters XML 1.0 forbids (a spec's name may hold any, through YAML's "\x01"): the picture shows U+FFFD.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def xml_safe(text: str) -> str:
    """`text` with every character XML cannot hold as U+FFFD (the attention maps' SVG uses it too)."""
    return _NOT_XML.sub("\ufffd", text)


def escape(text: str) -> str:
    return saxutils.escape(xml_safe(text))


def quoteattr(text: str) -> str:
    return saxutils.quoteattr(xml_safe(text))


def _f(value: float) -> str:
    return f"{value:.1f}".removesuffix(".0")


def svg_markup(scene: Scene, expanded: set[str], *, hidden: bool, standalone: bool) -> str:
    """The picture as SVG: visible items placed as `place` lays them out; with `hidden`, the members of collapsed
    groups too (laid out for when they open), as the HTML view needs them."""
    layout = place(scene, expanded)
    parts: list[str] = []

    def container(key: str) -> None:
        if key not in layout.inner:
            place(scene, expanded, layout, key)
        for edge in scene.edges.get(key, []):
            path, x, y = edge_path(layout.boxes[edge.source], layout.boxes[edge.target])
            parts.append(
                f'<g class="edge" data-from={quoteattr(edge.source)} data-to={quoteattr(edge.target)}>'
                f'<path d="{path}" marker-end="url(#arrow)"/>'
                f'<text x="{_f(x)}" y="{_f(y + 3)}" text-anchor="middle">{escape(edge.label)}</text></g>'
            )
        for member in scene.members(key):
            item = scene.items[member]
            box = layout.boxes[member]
            classes = f"node {item.kind}" + (" expanded" if member in expanded else "")
            repeat = f' data-repeat="{item.repeat}"' if item.repeat else ""
            parts.append(
                f'<g class="{classes}" data-name={quoteattr(member)} data-type={quoteattr(item.type)} '
                f'data-shapes={quoteattr(item.shapes)}{repeat} data-layer="{item.layer}" data-w="{_f(item.width)}" '
                f'data-h="{_f(item.height)}" transform="translate({_f(box.x)},{_f(box.y)})">'
                f'<rect width="{_f(box.width)}" height="{_f(box.height)}" rx="5"/>'
            )
            for n, line in enumerate(item.lines):
                style = ' class="title"' if n == 0 else ""
                parts.append(f'<text x="{_f(BOX_PAD)}" y="{_f(LINE_H * (n + 1))}"{style}>{escape(line)}</text>')
            if item.kind == "group" and (member in expanded or hidden):
                if member not in layout.inner:
                    place(scene, expanded, layout, member)
                shift = (box.width - layout.inner[member].width) / 2 if member in expanded else 0.0
                parts.append(f'<g class="children" transform="translate({_f(shift)},{_f(HEADER)})">')
                container(member)
                parts.append("</g>")
            parts.append("</g>")

    container("")
    size = layout.inner[""]
    style = f"<style>{STYLE}</style>" if standalone else ""
    namespace = ' xmlns="http://www.w3.org/2000/svg"' if standalone else ""  # HTML needs none (and makes no request)
    head = (
        f'<svg{namespace} class="graph" id="graph" width="{_f(size.width)}" '
        f'height="{_f(size.height)}" viewBox="0 0 {_f(size.width)} {_f(size.height)}">'
        f"<title>{escape(scene.name)}</title>{style}"
        '<defs><marker id="arrow" viewBox="0 0 8 8" refX="8" refY="4" markerWidth="7" markerHeight="7" '
        'orient="auto"><path class="arrow" d="M0,0 L8,4 L0,8 z"/></marker></defs>'
        '<g class="children" data-container="">'
    )
    return head + "".join(parts) + "</g></svg>\n"


def svg_picture(scene: Scene, expanded: set[str]) -> str:
    """`inspect --format svg`: a standalone SVG file of the visible items."""
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + svg_markup(scene, expanded, hidden=False, standalone=True)


def canvas(width: int, height: int, what: str, hint: str) -> Image.Image:
    """A white RGB image to draw on; refused before anything is allocated over Pillow's own bound against
    decompression bombs (Image.MAX_IMAGE_PIXELS, about 89 million pixels: 256 MiB), which viewers open."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        message = f"{what} would be {width:,} × {height:,} pixels, over the {int(limit):,} a PNG is drawn with"
        raise UsageError(Problem(message, hint=hint))
    return Image.new("RGB", (width, height), "white")


def png_picture(scene: Scene, expanded: set[str]) -> bytes:
    """`inspect --format png`: the same layout drawn with Pillow (light colours, white background)."""
    from PIL import ImageDraw, ImageFont

    layout = place(scene, expanded)
    size = layout.inner[""]
    hint = "use --format svg or html (any size), or open fewer groups (a smaller --depth)"
    image = canvas(int(size.width) + 1, int(size.height) + 1, "the picture", hint)
    draw = ImageDraw.Draw(image)
    font, small = ImageFont.load_default(12), ImageFont.load_default(10)

    def container(key: str, dx: float, dy: float) -> None:
        for edge in scene.edges.get(key, []):
            a, b = layout.boxes[edge.source], layout.boxes[edge.target]
            x1, y1, x2, y2 = dx + a.x + a.width / 2, dy + a.y + a.height, dx + b.x + b.width / 2, dy + b.y
            draw.line([(x1, y1), (x2, y2)], fill="#718096", width=1)
            draw.polygon([(x2, y2), (x2 - 4, y2 - 8), (x2 + 4, y2 - 8)], fill="#718096")
            _, x, y = edge_path(a, b)
            draw.text((dx + x, dy + y), edge.label, "#2b6cb0", small, "mm", stroke_width=2, stroke_fill="white")
        for member in scene.members(key):
            item, box = scene.items[member], layout.boxes[member]
            x, y = dx + box.x, dy + box.y
            fill = {"group": "#eef3fb", "input": "#f3f0e6", "output": "#f3f0e6"}.get(item.kind, "#ffffff")
            opened = member in expanded
            draw.rounded_rectangle(
                [x, y, x + box.width, y + box.height],
                radius=5,
                fill=None if opened else fill,
                outline="#3b6fb6" if item.kind == "group" else "#4a5568",
            )
            for n, line in enumerate(item.lines):  # Pillow's own font has no ×
                draw.text((x + BOX_PAD, y + LINE_H * (n + 1) - 11), line.replace("×", "x"), fill="#1a202c", font=font)
            if opened:
                container(member, x + (box.width - layout.inner[member].width) / 2, y + HEADER)

    container("", 0.0, 0.0)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
