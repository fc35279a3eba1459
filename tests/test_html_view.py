"""The HTML view (`inspect --format html`) in a real browser: headless Chromium, driven by Playwright.

Debian's `chromium` (/usr/bin/chromium; .ci/run installs it where apt-get can) runs the page from a file:// URL:
nothing but the file itself (and data: URIs) may be requested, a repeat shows collapsed as `×N` and a click
expands it, the search box finds nodes by shape. Playwright's own browser download is never used.

`BLOCKGRAPH_SCREENSHOTS=docs/img .venv/bin/python -m pytest tests/test_html_view.py` writes the screenshots that
docs/inspect.md shows (otherwise they go to a temporary folder, and are checked to be PNG images).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import SPECS
from PIL import Image
from typer.testing import CliRunner

from blockgraph import cli

CHROMIUM = Path("/usr/bin/chromium")
# Headless and offline: without the background-networking flags Chromium reaches for Google's hosts at start.
FLAGS = ["--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-sandbox"]  # fmt: skip
VIEWS = {"transformer": "transformer.yaml", "gpt3": "gpt3_175b.yaml", "subgraph": "tiny_encoder.yaml"}
VIEWPORT = {"width": 1100, "height": 700}
# Drawn: not under a display:none or visibility:hidden ancestor, and of some size (one round trip for all).
VISIBLE_NAMES = """els => els.filter((e) => e.checkVisibility() && e.getBoundingClientRect().width > 0)
  .map((e) => e.dataset.name ?? null)"""


@dataclass
class Opened:
    """A page showing one view, with every request and script error it produced."""

    page: Any  # playwright.sync_api.Page (imported only where the browser exists)
    url: str
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def visible(self, selector: str) -> list[str]:
        """`data-name` of the visible elements `selector` matches."""
        return self.page.locator(selector).evaluate_all(VISIBLE_NAMES)

    def named(self, name: str) -> Any:
        return self.page.locator(f'g.node[data-name="{name}"]')


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One Chromium for the module (each test opens its own context: no state carries over)."""
    if not CHROMIUM.exists():
        pytest.skip(f"Debian's chromium is not installed ({CHROMIUM}): `apt-get install chromium` (.ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the [test] extra")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS, headless=True)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def views(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The HTML of each spec, written by the command a user runs (in-process)."""
    folder = tmp_path_factory.mktemp("html")
    written = {}
    for key, spec in VIEWS.items():
        out = folder / f"{key}.html"
        result = CliRunner().invoke(cli.app, ["inspect", str(SPECS / spec), "--format", "html", "--out", str(out)])
        assert result.exit_code == 0, result.output
        written[key] = out
    return written


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wanted = os.environ.get("BLOCKGRAPH_SCREENSHOTS")
    folder = Path(wanted) if wanted else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def open_view(browser, views: dict[str, Path]) -> Iterator[Callable[..., Opened]]:
    """Open a view (or any file) in a fresh context; anything but file: and data: is recorded, then refused."""
    contexts = []

    def open_(key: str | Path, color_scheme: str = "light") -> Opened:
        path = views[key] if isinstance(key, str) else key
        context = browser.new_context(viewport=VIEWPORT, color_scheme=color_scheme)
        contexts.append(context)
        page = context.new_page()
        opened = Opened(page, path.resolve().as_uri())
        page.on("request", lambda request: opened.requests.append(request.url))
        page.on("websocket", lambda socket: opened.requests.append(socket.url))
        page.on("pageerror", lambda error: opened.errors.append(str(error)))
        page.on("console", lambda message: message.type == "error" and opened.errors.append(message.text))
        context.route("**/*", _local_only)
        page.goto(opened.url, wait_until="load")
        return opened

    yield open_
    for context in contexts:
        context.close()


def _local_only(route) -> None:
    """Let the file (and data: URIs) load; anything else fails here, recorded, without leaving the machine."""
    if route.request.url.startswith(("file:", "data:")):
        route.continue_()
    else:
        route.abort()


def _screenshot(opened: Opened, path: Path) -> None:
    """A PNG of the page as it is, in 64 colours: sharp text at a third of the bytes, small enough for the docs."""
    with Image.open(io.BytesIO(opened.page.screenshot())) as shot:
        assert shot.format == "PNG" and shot.size == (VIEWPORT["width"], VIEWPORT["height"])
        shot.quantize(colors=64).save(path, optimize=True)
    assert 5_000 < path.stat().st_size < 150_000, (path, path.stat().st_size)


def _offline(opened: Opened) -> None:
    strays = [url for url in opened.requests if url != opened.url and not url.startswith("data:")]
    assert not strays, f"the page requested {strays}"
    assert not opened.errors, opened.errors


def test_the_network_check_sees_a_request(open_view, tmp_path):
    """The harness itself: a page that loads an image from a host is caught (and nothing leaves the machine)."""
    page = tmp_path / "online.html"
    page.write_text('<!doctype html><img src="http://example.invalid/a.png"><img src="data:image/png;base64,AA==">')
    opened = open_view(page)
    assert "http://example.invalid/a.png" in opened.requests
    with pytest.raises(AssertionError, match=r"example\.invalid"):
        _offline(opened)


EDGE_SHAPES = {"transformer": "[batch, src_len, 512]", "gpt3": "[batch, seq, 12288]", "subgraph": "[batch, seq, 64]"}


@pytest.mark.parametrize(("key", "shape"), list(EDGE_SHAPES.items()), ids=list(EDGE_SHAPES))
def test_the_view_opens_offline(open_view, key, shape):
    opened = open_view(key)
    opened.page.wait_for_load_state("networkidle")
    _offline(opened)
    assert opened.visible("g.node"), "no node is drawn"
    assert opened.visible("#search") == [None]
    labels = opened.page.locator("g.edge").filter(visible=True).all_text_contents()
    assert any(shape in label for label in labels), f"no edge is labelled {shape}: {labels}"


@pytest.mark.parametrize(("key", "group", "repeat"), [("transformer", "encoder", 6), ("gpt3", "decoder", 96)])
def test_a_repeat_is_collapsed_until_clicked(open_view, shots, key, group, repeat):
    opened = open_view(key)
    box = opened.named(group)
    assert box.get_attribute("data-repeat") == str(repeat)
    assert "group" in box.get_attribute("class").split()
    assert f"×{repeat}" in (box.text_content() or "")
    assert box.is_visible()
    copies = f'g.node[data-name^="{group}."]'
    assert opened.visible(copies) == [], "the copies show before the click"
    if key == "gpt3":
        _screenshot(opened, shots / "inspect-html-gpt3.png")

    box.click()
    assert "expanded" in box.get_attribute("class").split()
    shown = opened.visible(copies)
    assert f"{group}.{repeat - 1}" in shown and f"{group}.0" in shown, shown
    if key == "transformer":  # one copy in the side panel, its parameters those of torch's own layer
        opened.named(f"{group}.3").click()
        details = opened.page.inner_text("#details")
        layer = torch.nn.TransformerEncoderLayer(512, 8, 2048, device="meta")
        assert "encoder.3" in details and "encoder_layer" in details, details
        assert f"{sum(p.numel() for p in layer.parameters()):,}" in details, details
        _screenshot(opened, shots / "inspect-html-transformer.png")

    label = box.locator(":scope > text", has_text=f"×{repeat}").bounding_box()  # a click on the label closes it
    opened.page.mouse.click(label["x"] + label["width"] / 2, label["y"] + label["height"] / 2)
    assert "expanded" not in box.get_attribute("class").split()
    assert opened.visible(copies) == []
    _offline(opened)


def test_a_click_shows_the_node_in_the_side_panel(open_view):
    """GPT-3's token embedding: its vocabulary × d_model parameters; the totals: its 174.6B."""
    opened = open_view("gpt3")
    opened.named("embed").click()
    details = opened.page.inner_text("#details")
    assert "token_embedding" in details and f"{50257 * 12288:,}" in details, details
    assert "174,604,259,328" in opened.page.inner_text("#totals")


@pytest.mark.parametrize(
    ("key", "text", "inside", "outside"),
    [
        ("transformer", "[batch, tgt_len, 512]", ["tgt_embed", "decoder.5", "decoder_norm"], ["src_embed", "encoder"]),
        ("subgraph", "feed_forward", ["encoder.1.ffn"], ["encoder.1.attn", "embed"]),
        ("gpt3", "[batch, seq, 50257]", ["generator"], ["decoder", "embed"]),
    ],
    ids=["transformer-shape", "subgraph-type", "gpt3-shape"],
)
def test_search_marks_and_reveals_the_matches(open_view, shots, key, text, inside, outside):
    opened = open_view(key)
    opened.page.fill("#search", text)
    matched = opened.visible("g.node.match")
    for name in inside:
        assert name in matched, f"{name} is not a visible match of {text!r}: {matched}"
    for name in outside:
        assert name not in matched
    for name in matched:  # every visible match really holds the text, in its name, type or shapes
        node = opened.named(name)
        held = " ".join(node.get_attribute(a) or "" for a in ("data-name", "data-type", "data-shapes"))
        assert text.lower() in held.lower(), (name, held)
    if key == "subgraph":
        _screenshot(opened, shots / "inspect-html-search.png")
    opened.page.fill("#search", "")
    assert opened.visible("g.node.match") == []
    _offline(opened)


def test_the_dark_theme(open_view, shots):
    opened = open_view("transformer", color_scheme="dark")
    _screenshot(opened, shots / "inspect-html-dark.png")
    background = opened.page.evaluate("getComputedStyle(document.body).backgroundColor")
    channels = [int(c) for c in background[background.index("(") + 1 : -1].split(",")[:3]]
    assert sum(channels) < 3 * 96, f"the page stays light in a dark theme: {background}"
