"""`inspect --format html | svg | png` without a browser (issue 30): the files are what they say (valid XML with
every top-level name, a PNG Pillow opens, a page that requests nothing and carries the ids and classes its script
and tests/test_html_view.py rely on), written atomically like every output, and the CLI's refusals say why.
The page's behaviour in a browser is tests/test_html_view.py's."""

from __future__ import annotations

import json
import os
import re
import stat
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import SPECS
from PIL import Image
from typer.testing import CliRunner

from blockgraph import cli

SVG = "{http://www.w3.org/2000/svg}"
TRANSFORMER = SPECS / "transformer.yaml"
TOP_LEVEL = ["src_embed", "src_position", "encoder", "encoder_norm", "tgt_embed", "tgt_position", "decoder",
             "decoder_norm", "generator"]  # fmt: skip


def _inspect(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(cli.app, ["inspect", *(str(a) for a in args)], env={"COLUMNS": "200"})
    return result.exit_code, result.stdout + result.stderr


@pytest.fixture(scope="module")
def drawn(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The transformer drawn once in each format (the page with the per-rank view, at --dim batch=3)."""
    folder = tmp_path_factory.mktemp("views")
    files = {fmt: folder / f"model.{fmt}" for fmt in ("svg", "png", "html")}
    extra = {"html": ("--dim", "batch=3", "--ranks", "4", "--strategy", "fsdp"), "svg": (), "png": ()}
    for fmt, path in files.items():
        code, text = _inspect(TRANSFORMER, "--format", fmt, "--out", path, *extra[fmt])
        assert code == 0, text
        assert f"wrote {path}" in text
    return files


def test_the_svg_is_valid_xml_naming_every_top_level_node(drawn):
    root = ET.parse(drawn["svg"]).getroot()
    assert root.tag == f"{SVG}svg"
    boxes = {g.get("data-name"): g for g in root.iter(f"{SVG}g") if "node" in (g.get("class") or "").split()}
    for name in TOP_LEVEL:
        assert name in boxes
        assert name in "".join(boxes[name].itertext())
    assert "encoder ×6" in "".join(boxes["encoder"].itertext())
    assert not any(name.startswith("encoder.") for name in boxes)  # collapsed: a picture draws what is open
    edges = [g for g in root.iter(f"{SVG}g") if g.get("class") == "edge"]
    labels = {"".join(g.itertext()) for g in edges}
    assert "[batch, src_len, 512] = [2, 12, 512]" in labels  # symbolic, and at the spec's dims


def test_depth_opens_the_groups_above_it(tmp_path):
    path = tmp_path / "open.svg"
    code, text = _inspect(TRANSFORMER, "--format", "svg", "--depth", "2", "--out", path)
    assert code == 0, text
    root = ET.parse(path).getroot()
    names = {g.get("data-name") for g in root.iter(f"{SVG}g") if g.get("data-name")}
    assert {f"encoder.{n}" for n in range(6)} <= names and "decoder.5" in names


def test_the_png_opens_with_a_sensible_size(drawn):
    with Image.open(drawn["png"]) as image:
        image.verify()
    with Image.open(drawn["png"]) as image:
        width, height = image.size
        assert image.format == "PNG"
        assert 200 < width < 3000 and 400 < height < 5000
        darkest, lightest = image.convert("L").getextrema()
        assert darkest < 100 < lightest  # something drawn on the canvas


def test_the_page_requests_nothing_and_keeps_the_contract(drawn):
    page = drawn["html"].read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"""(src|href)\s*=|@import|url\((?!#)|fetch\(|XMLHttpRequest|<link""", page)
    for needle in ('id="search" type="search"', 'id="details"', 'id="totals"', 'class="edge"', "prefers-color-scheme"):
        assert needle in page
    encoder = re.search(r'<g class="node group" data-name="encoder" data-type="encoder_layer" [^>]*>', page)
    assert encoder is not None and 'data-repeat="6"' in encoder.group(0)
    assert 'data-shapes="[batch, src_len, 512]"' in encoder.group(0)
    assert "encoder ×6" in page
    for n in range(6):  # the copies are in the page (hidden until the click), each a node of its own
        assert f'data-name="encoder.{n}"' in page
    assert "= [3, 12, 512]" in page  # --dim batch=3 on the edges
    data = json.loads(re.search(r'<script type="application/json" id="bg-data">(.*?)</script>', page, re.S).group(1))
    assert data["encoder"]["type"] == "encoder_layer ×6"
    assert {"params", "parameters", "FLOPs", "activations"} <= set(data["src_embed"])
    totals = re.search(r'<div id="totals">(.*?)</div>', page, re.S).group(1)
    assert "parameters" in totals and "fsdp" in totals and "ddp" in totals


def test_out_refuses_a_fifo_and_leaves_it(tmp_path):
    fifo = tmp_path / "view.html"
    os.mkfifo(fifo)
    code, text = _inspect(TRANSFORMER, "--format", "html", "--out", fifo)
    assert code == 1 and "is a FIFO" in text and "never replaced" in text
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_out_replaces_a_file_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "model.svg"
    target.write_text("old")
    code, text = _inspect(TRANSFORMER, "--format", "svg", "--out", target)
    assert code == 0, text
    ET.parse(target)
    assert os.listdir(tmp_path) == ["model.svg"]


@pytest.mark.parametrize(
    ("args", "message", "hint"),
    [
        (("--format", "png"), "--format png is an image, not text", "give --out FILE.png"),
        (("--out", "x.txt"), "--out writes a file of the graph; --format tree prints to the terminal", "> FILE"),
        (("--format", "html", "--code", "--out", "x.html"), "--code prints to the terminal", "> FILE"),
    ],
)
def test_what_out_cannot_do_is_refused_with_a_hint(tmp_path, args, message, hint):
    code, text = _inspect(TRANSFORMER, *(tmp_path / a if a.startswith("x.") else a for a in args))
    assert code == 1 and message in text and hint in text
    assert not list(tmp_path.iterdir())


def test_html_and_svg_without_out_go_to_stdout():
    code, text = _inspect(TRANSFORMER, "--format", "svg")
    assert code == 0 and text.startswith("<?xml") and "encoder ×6" in text


def test_a_sub_graph_copy_is_a_group_holding_its_blocks(tmp_path):
    path = tmp_path / "encoder.svg"
    code, text = _inspect(SPECS / "tiny_encoder.yaml", "--format", "svg", "--depth", "3", "--out", path)
    assert code == 0, text
    boxes = {g.get("data-name"): g for g in ET.parse(path).getroot().iter(f"{SVG}g") if g.get("data-name")}
    assert boxes["encoder"].get("data-repeat") == "2" and "encoder ×2" in "".join(boxes["encoder"].itertext())
    copy = boxes["encoder.1"]
    assert copy.get("class") == "node group expanded" and copy.get("data-repeat") is None
    assert copy.get("data-type") == "encoder_block"
    inside = {g.get("data-name") for g in copy.iter(f"{SVG}g") if g.get("data-name")}
    assert {"encoder.1.attn", "encoder.1.norm1", "encoder.1.ffn", "encoder.1.norm2"} <= inside


def test_spec_text_cannot_break_the_page_or_the_picture(tmp_path):
    """A spec's own text (its name, a block's string param) is escaped everywhere: `<!--<script>` in the page's data
    would make the browser read the data's closing tag as text and swallow the page's script; a control character
    (YAML's "\\x01") is not XML, so the SVG says U+FFFD instead."""
    spec = tmp_path / "odd.yaml"
    spec.write_text(
        'name: "odd</title></script>\\x01<!--"\n'
        "inputs: {x: {dtype: int64, shape: [b, 4]}}\n"
        'nodes: {n: {type: token_embedding, params: {vocab: 10, dim: 4, pretrained: "<!--<script>.txt"}, in: x}}\n'
        "outputs: n\n"
    )
    page_path, svg_path = tmp_path / "odd.html", tmp_path / "odd.svg"
    for fmt, path in (("html", page_path), ("svg", svg_path)):
        code, text = _inspect(spec, "--format", fmt, "--out", path)
        assert code == 0, text
    page = page_path.read_text(encoding="utf-8")
    blob = re.search(r'<script type="application/json" id="bg-data">(.*?)</script>', page, re.S).group(1)
    assert "<" not in blob and "<!--<script>.txt" in json.loads(blob)["n"]["params"]
    assert page.count("<script") == 2 and "odd&lt;/title&gt;&lt;/script&gt;" in page
    title = ET.parse(svg_path).getroot().find(f"{SVG}title")
    assert title is not None and title.text == "odd</title></script>\ufffd<!--"


def test_a_png_too_large_to_hold_is_refused_before_it_is_drawn(tmp_path):
    """A wide row over a tall one makes a canvas of width × height: bounded (at Pillow's own image limit), not
    gigabytes allocated; the refusal names the formats that draw any size."""
    long_name = "n" * 20_000  # one box 144,000 px wide (an explicit `? key`: plain YAML keys stop at 1,024 chars)
    chain = "".join(f"  c{i}: {{type: layer_norm, params: {{dim: 4}}, in: c{i - 1}}}\n" for i in range(1, 12))
    spec = tmp_path / "wide.yaml"
    spec.write_text(
        "name: wide\ninputs: {x: {shape: [b, 4]}}\nnodes:\n"
        f"  ? {long_name}\n  : {{type: layer_norm, params: {{dim: 4}}, in: x}}\n"
        f"  c0: {{type: layer_norm, params: {{dim: 4}}, in: x}}\n{chain}outputs: {{y: c11, z: {long_name}}}\n"
    )
    code, text = _inspect(spec, "--format", "png", "--out", tmp_path / "wide.png")
    assert code == 1 and "pixels" in text and "--format svg" in text, text
    assert not (tmp_path / "wide.png").exists()
