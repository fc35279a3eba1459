"""`inspect --format html`: one self-contained page (inline SVG, style and script; no request of any kind).

The layout is views.layout's; the page's script repeats its `place` when a group is clicked open or closed, fills
the side panel (#details) from the data below the picture, and searches names, types and shapes (#search).
"""

from __future__ import annotations

import io
import json
from html import escape

from rich.console import Console, RenderableType

from blockgraph.builder.views.layout import H_GAP, HEADER, PAD, V_GAP, Scene
from blockgraph.builder.views.picture import STYLE, svg_markup

PAGE_STYLE = """
:root { color-scheme: light dark; --bg: #ffffff; --fg: #1a202c; --panel: #f7f8fa; --line: #cbd5e0; }
@media (prefers-color-scheme: dark) { :root { --bg: #12151c; --fg: #e2e8f0; --panel: #1a1f2b; --line: #4a5568; } }
body { margin: 0; background: var(--bg); color: var(--fg); font: 14px system-ui, sans-serif; display: flex;
  height: 100vh; }
#view { flex: 1; overflow: auto; }
#side { width: 430px; border-left: 1px solid var(--line); background: var(--panel); padding: 10px; overflow: auto; }
#search { width: 100%; box-sizing: border-box; padding: 6px; font: inherit; }
#details table { border-collapse: collapse; } #details td { padding: 2px 6px; vertical-align: top; }
#details td:first-child { font-weight: bold; } pre { white-space: pre-wrap; font-size: 12px; }
.node { cursor: pointer; } .group:not(.expanded) > .children { display: none; }
.node > text, .edge { pointer-events: none; }  /* a click anywhere on a box reaches the box */
"""

SCRIPT = """
(() => {
const C = {pad: %(pad)s, hgap: %(hgap)s, vgap: %(vgap)s, header: %(header)s};
const data = JSON.parse(document.getElementById('bg-data').textContent);
const svg = document.getElementById('graph');
const root = svg.querySelector('g.children');
const members = (c) => Array.from(c.children).filter((e) => e.classList.contains('node'));
function place(c) {
  const rows = new Map(), at = new Map();
  for (const el of members(c)) {
    let w = +el.dataset.w, h = +el.dataset.h;
    const inner = el.querySelector(':scope > g.children');
    if (inner && el.classList.contains('expanded')) {
      const s = place(inner);
      const width = Math.max(w, s.w);
      inner.setAttribute('transform', `translate(${(width - s.w) / 2},${C.header})`);
      w = width; h = C.header + s.h;
    }
    const rect = el.querySelector(':scope > rect');
    rect.setAttribute('width', w); rect.setAttribute('height', h);
    const layer = +el.dataset.layer;
    if (!rows.has(layer)) rows.set(layer, []);
    rows.get(layer).push([el, w, h]);
  }
  const widths = new Map();
  for (const [layer, row] of rows) widths.set(layer, row.reduce((a, r) => a + r[1], 0) + C.hgap * (row.length - 1));
  const total = Math.max(0, ...widths.values()) + 2 * C.pad;
  let y = C.pad;
  for (const layer of [...rows.keys()].sort((a, b) => a - b)) {
    let x = (total - widths.get(layer)) / 2;
    for (const [column, [el, w, h]] of rows.get(layer).entries()) {
      el.setAttribute('transform', `translate(${x},${y})`);
      at.set(el.dataset.name, {x, y, w, h, column});
      x += w + C.hgap;
    }
    y += Math.max(...rows.get(layer).map((r) => r[2])) + C.vgap;
  }
  for (const edge of c.querySelectorAll(':scope > g.edge')) {
    const a = at.get(edge.dataset.from), b = at.get(edge.dataset.to);
    const x1 = a.x + a.w / 2, y1 = a.y + a.h, x2 = b.x + b.w / 2, y2 = b.y, bend = Math.max((y2 - y1) / 2, 20);
    edge.querySelector('path').setAttribute('d', `M${x1},${y1} C${x1},${y1 + bend} ${x2},${y2 - bend} ${x2},${y2}`);
    const drop = Math.min(C.vgap / 2 + (a.column %% 2 ? 6 : -6), (y2 - y1) / 2), label = edge.querySelector('text');
    label.setAttribute('x', y2 > y1 ? x1 + (x2 - x1) * drop / (y2 - y1) : (x1 + x2) / 2);
    label.setAttribute('y', y1 + drop + 3);
  }
  return {w: total, h: rows.size ? y - C.vgap + C.pad : 2 * C.pad};
}
function relayout() {
  const s = place(root);
  svg.setAttribute('width', s.w); svg.setAttribute('height', s.h);
  svg.setAttribute('viewBox', `0 0 ${s.w} ${s.h}`);
}
const details = document.getElementById('details');
function show(el) {
  const d = data[el.dataset.name] || {};
  const rows = [['node', el.dataset.name], ...Object.entries(d), ['output shapes', el.dataset.shapes]];
  const table = document.createElement('table');
  for (const [k, v] of rows) {
    const tr = table.insertRow();
    tr.insertCell().textContent = k; tr.insertCell().textContent = v;
  }
  details.replaceChildren(table);
}
svg.addEventListener('click', (event) => {
  const el = event.target.closest('.node');
  if (!el) return;
  if (el.classList.contains('group')) { el.classList.toggle('expanded'); relayout(); }
  show(el);
});
svg.addEventListener('mouseover', (event) => { const el = event.target.closest('.node'); if (el) show(el); });
const nodes = Array.from(svg.querySelectorAll('.node'));
document.getElementById('search').addEventListener('input', (event) => {
  const query = event.target.value.trim().toLowerCase();
  let first = null;
  for (const el of nodes) {
    const text = [el.dataset.name, el.dataset.type, el.dataset.shapes].join('\\n').toLowerCase();
    const hit = query !== '' && text.includes(query);
    el.classList.toggle('match', hit);
    if (!hit) continue;
    first = first || el;
    for (let up = el.parentElement.closest('.group'); up; up = up.parentElement.closest('.group')) {
      up.classList.add('expanded');
    }
  }
  relayout();
  if (first) first.scrollIntoView({block: 'center', inline: 'center'});
});
relayout();
})();
"""


def _text(renderable: RenderableType) -> str:
    """A Rich rendering (the totals, the per-rank table) as plain text for the page."""
    console = Console(file=io.StringIO(), width=56, color_system=None, record=True)
    console.print(renderable)
    return console.export_text()


def html_page(scene: Scene, expanded: set[str], totals: list[RenderableType]) -> str:
    """The page: search box, the graph, the side panel (details of the node under the pointer, the totals)."""
    data = {key: item.details for key, item in scene.items.items() if item.details}
    script = SCRIPT % {"pad": PAD, "hgap": H_GAP, "vgap": V_GAP, "header": HEADER}
    # No `<` at all inside the script element: `</script>` would end it early, and `<!--<script>` would keep its own
    # closing tag from ending it (the HTML tokenizer's "double escaped" state), swallowing the page's script.
    blob = json.dumps(data, ensure_ascii=False).replace("<", "\\u003c")
    summary = "\n".join(_text(part) for part in totals)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(scene.name)} · blockgraph</title>"
        f"<style>{PAGE_STYLE}{STYLE}</style></head><body>"
        f'<div id="view">{svg_markup(scene, expanded, hidden=True, standalone=False)}</div>'
        f'<div id="side"><h2>{escape(scene.name)}</h2>'
        '<input id="search" type="search" placeholder="search a name, type or shape" aria-label="search">'
        '<h3>details</h3><div id="details">click or point at a box; click a group (×N) to open it</div>'
        f'<h3>totals</h3><div id="totals"><pre>{escape(summary)}</pre></div></div>'
        f'<script type="application/json" id="bg-data">{blob}</script>'
        f"<script>{script}</script></body></html>\n"
    )
