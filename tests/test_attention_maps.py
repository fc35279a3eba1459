"""Attention maps (`translate --attention`): the weights drawn are the attention blocks' own, on small trained
copy-task models, a Transformer (against torch.nn.MultiheadAttention) and the RNN seq2seq specs with global,
hard and local attention (against the spec's own `attention` output); the files are self-contained, labelled
and written as every output is."""

from __future__ import annotations

import io
import os
import re
import xml.etree.ElementTree as ET

import pytest
import torch
from conftest import SPECS, tiny_reverse_config
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from blockgraph.cli import app
from blockgraph.common.errors import UsageError, WriteError
from blockgraph.trainer import attention_maps
from blockgraph.trainer.generation import Translator
from blockgraph.trainer.loop import train
from blockgraph.trainer.vocab import BOS_ID

torch.set_num_threads(1)

SENTENCES = ["1 2 3", "4 5 0 1"]
RNN = {"global": "rnn_seq2seq_attention", "hard": "rnn_seq2seq_hard", "local": "rnn_seq2seq_local"}


def _train(path, steps: int, **changes):
    settings = dict(task="copy", epochs=100, max_steps=steps, label_smoothing=0.0, bleu_sentences=0, lr=1e-2)
    train(tiny_reverse_config(**{**settings, **changes}), path, quiet=True)
    return path


@pytest.fixture(scope="module")
def transformer_run(tmp_path_factory):
    """A 1+2-layer, 2-head Transformer trained briefly on the copy task."""
    layers = {"d_model": 16, "heads": 2, "enc_layers": 1, "dec_layers": 2, "d_ff": 32, "dropout": 0.0}
    return _train(tmp_path_factory.mktemp("transformer"), 80, overrides=layers)


@pytest.fixture(scope="module")
def transformer(transformer_run):
    return Translator.load(transformer_run)


@pytest.fixture(scope="module", params=sorted(RNN))
def rnn(request, tmp_path_factory):
    """An LSTM encoder–decoder with each source attention, trained briefly on the copy task (window D = 1)."""
    sizes = {"emb": 16, "hidden": 16, "layers": 1, "dropout": 0.0}
    if request.param == "local":
        sizes["window"] = 1
    spec = str(SPECS / f"{RNN[request.param]}.yaml")
    path = _train(tmp_path_factory.mktemp(request.param), 20, spec=spec, overrides=sizes)
    return request.param, Translator.load(path)


def _inputs(translator: Translator, found: attention_maps.SentenceAttention, sentence: str):
    """The source and the teacher-forced target of a translated sentence, as the model reads them."""
    assert translator.source is not None
    src = torch.tensor([translator.source.encode(sentence)])
    ids = [translator.target.encode(token)[0] for token in found.target[:-1]]  # the copy task's tokens are words
    return src, torch.tensor([[BOS_ID, *ids]])


def test_transformer_maps_are_each_layers_cross_attention(transformer):
    found = list(transformer.attention(SENTENCES))
    assert [s.translation for s in found] == [out[0].text for out in transformer.translate(SENTENCES)]
    for sentence, drawn in zip(SENTENCES, found, strict=True):
        assert [m.node for m in drawn.maps] == ["decoder.0.cross_attn", "decoder.1.cross_attn"]
        assert drawn.source == [*sentence.split(), "</s>"] and drawn.target[-1] == "</s>"
        src, tgt = _inputs(transformer, drawn, sentence)
        given: dict[str, tuple] = {}
        hooks = [
            transformer.model.get_submodule(m.node).register_forward_pre_hook(
                lambda module, args, name=m.node, seen=given: seen.setdefault(name, args)
            )
            for m in drawn.maps
        ]
        with torch.no_grad():
            transformer.model(src=src, tgt=tgt)
        for hook in hooks:
            hook.remove()
        for m in drawn.maps:
            block = transformer.model.get_submodule(m.node)
            query, key, value = given[m.node]
            reference = nn.MultiheadAttention(16, 2, batch_first=True)
            with torch.no_grad():
                reference.in_proj_weight.copy_(torch.cat([block.w_q.weight, block.w_k.weight, block.w_v.weight]))
                reference.in_proj_bias.copy_(torch.cat([block.w_q.bias, block.w_k.bias, block.w_v.bias]))
                _, expected = reference(query, key, value, need_weights=True, average_attn_weights=False)
            assert m.weights.shape == (2, len(drawn.target), len(drawn.source))
            torch.testing.assert_close(m.weights, expected[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(m.weights.sum(-1), torch.ones(2, len(drawn.target)), atol=1e-5, rtol=0)


def test_rnn_maps_are_the_source_attention_weights(rnn):
    kind, translator = rnn
    for sentence, drawn in zip(SENTENCES, translator.attention(SENTENCES), strict=True):
        (m,) = drawn.maps
        assert (m.node, m.kind) == ("attn", kind)
        src, tgt = _inputs(translator, drawn, sentence)
        with torch.no_grad():
            expected = translator.model(src=src, tgt=tgt)["attention"][0]  # the spec's output: attn.weights
        torch.testing.assert_close(m.weights[0], expected, atol=1e-6, rtol=0)
        rows = torch.ones(len(drawn.target))
        torch.testing.assert_close(m.weights[0].sum(-1), rows, atol=1e-5, rtol=0)
        if kind == "hard":
            assert ((m.weights == 0) | (m.weights == 1)).all()
        if kind == "local":
            assert m.window is not None and m.window.shape == (len(drawn.target), 2)
            columns = torch.arange(len(drawn.source))
            outside = (columns < m.window[:, :1]) | (columns > m.window[:, 1:])
            assert outside.any() and (m.weights[0][outside] == 0).all()
            assert (m.window[:, 1] - m.window[:, 0] <= 2).all()  # D = 1: three positions at most
            assert attention_maps.html([drawn]).count('class="window"') == len(drawn.target)
        else:
            assert m.window is None


def test_files_are_self_contained_and_labelled(transformer, tmp_path):
    found = list(transformer.attention(["3 1 4", "0 2"]))
    page = attention_maps.write(tmp_path / "maps.html", found).read_text(encoding="utf-8")
    assert not re.search(r"https?://|<script|<link|<img|@import|url\(", page)
    for drawn in found:
        labels = re.findall(r"<text[^>]*>([^<]*)</text>", page)
        assert set(drawn.source) - {"</s>"} <= set(labels) and "&lt;/s&gt;" in labels
        assert set(drawn.target) - {"</s>"} <= set(labels)
    assert page.count("head 2") == 2 * len(found) and "average of every layer and head" in page
    picture = ET.parse(attention_maps.write(tmp_path / "maps.svg", found)).getroot()
    texts = {t.text for t in picture.iter("{http://www.w3.org/2000/svg}text")}
    assert {"3", "1", "4", "0", "2", "</s>", "decoder.1.cross_attn (multi-head attention)"} <= texts


def test_hostile_tokens_are_escaped():
    weights = torch.full((1, 1, 1), 1.0)
    drawn = attention_maps.SentenceAttention(
        ["<script>x</script>\x01"], ["&amp;"], "t", [attention_maps.AttentionMap("attn", "global", weights)]
    )
    ET.fromstring(attention_maps.svg([drawn]))  # well-formed despite the markup and the control character
    page = attention_maps.html([drawn])
    assert "<script>" not in page and "&lt;script&gt;" in page and "&amp;amp;" in page
    halves = attention_maps.AttentionMap("attn", "global", torch.full((1, 1, 2), 0.5))
    chinese = attention_maps.SentenceAttention(["我们", "line\nbreak"], ["é"], "t", [halves])
    _png(attention_maps.png([chinese]))  # characters the built-in font lacks are drawn as boxes, not refused


def _png(data: bytes) -> Image.Image:
    """The PNG `data`, verified by Pillow and opened again to read its pixels."""
    Image.open(io.BytesIO(data)).verify()
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.mode == "RGB"
    return image


def _colour(hex_colour: str) -> tuple[int, int, int]:
    red, green, blue = (int(hex_colour[k : k + 2], 16) for k in (1, 3, 5))
    return red, green, blue


def test_png_cells_are_coloured_by_their_weight(rnn, tmp_path):
    kind, translator = rnn
    found = list(translator.attention(SENTENCES))
    image = _png(attention_maps.write(tmp_path / "maps.png", found).read_bytes())
    placed = attention_maps.png_panels(found)
    assert [p.panel.weights.shape for p in placed] == [m.weights[0].shape for s in found for m in s.maps]
    cell = attention_maps.CELL
    for place in placed:
        weights = place.panel.weights
        rows, cols = weights.shape
        # Each cell's centre pixel, read at its computed position: ACCENT over white at opacity = the weight, so
        # the ink (how far its red + green + blue fall below white) is proportional to the weight.
        centres = [
            [image.getpixel((place.x + j * cell + cell // 2, place.y + i * cell + cell // 2)) for j in range(cols)]
            for i in range(rows)
        ]
        ink = 255 * 3 - torch.tensor([[sum(rgb) for rgb in row] for row in centres], dtype=torch.float32)
        full = 255 * 3 - sum(_colour(attention_maps.ACCENT))
        torch.testing.assert_close(ink / full, weights, atol=0.01, rtol=0)
        if kind == "hard":  # the darkest cell of each row, the full colour, is the one-hot choice
            assert torch.equal(ink.argmax(-1), weights.argmax(-1))
            assert all(centres[i][int(weights[i].argmax())] == _colour(attention_maps.ACCENT) for i in range(rows))
        if kind == "local":  # each row's window is outlined in its colour, on the edge of its first cell
            assert place.panel.window is not None
            for i, (low, _) in enumerate(place.panel.window.tolist()):
                assert image.getpixel((place.x + low * cell, place.y + i * cell + cell // 2)) == _colour(
                    attention_maps.WINDOW
                )


def test_png_grows_with_its_tokens_and_panels(monkeypatch):
    def size(sources: int, targets: int, layers: int, heads: int) -> tuple[int, int]:
        maps = [
            attention_maps.AttentionMap(f"decoder.{n}.cross_attn", "multi_head", torch.rand(heads, targets, sources))
            for n in range(layers)
        ]
        words = attention_maps.SentenceAttention(["w"] * sources, ["t"] * targets, "t", maps)
        return _png(attention_maps.png([words])).size

    small = size(3, 2, 1, 1)
    assert size(5, 2, 1, 1)[0] > small[0] and size(3, 4, 1, 1)[1] > small[1]  # more source, target tokens
    assert size(3, 2, 1, 3)[0] > small[0]  # more heads: panels side by side
    assert size(3, 2, 2, 1)[1] > small[1]  # more layers: groups below each other (and their average)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", small[0] * small[1])  # what Pillow opens without a warning
    assert size(3, 2, 1, 1) == small
    with pytest.raises(UsageError, match="fewer or shorter sentences"):
        size(3, 3, 1, 1)


def test_outputs_are_written_atomically_and_refuse_what_every_output_refuses(transformer, tmp_path):
    found = list(transformer.attention(SENTENCES[:1]))
    target = tmp_path / "maps.html"
    target.write_text("old")
    attention_maps.write(target, found)
    assert target.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps.html"]  # no temporary left beside it
    fifo = tmp_path / "pipe.svg"
    os.mkfifo(fifo)
    link = tmp_path / "null.html"
    link.symlink_to(os.devnull)
    (tmp_path / "folder.html").mkdir()
    for refused in (fifo, link, tmp_path / "folder.html"):
        with pytest.raises(WriteError):
            attention_maps.write(refused, found)
    assert fifo.is_fifo() and link.is_symlink()
    png = tmp_path / "maps.png"
    png.write_bytes(b"old")
    attention_maps.write(png, found)
    _png(png.read_bytes())
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left beside it
    fifo_png = tmp_path / "pipe.png"
    os.mkfifo(fifo_png)
    with pytest.raises(WriteError):
        attention_maps.write(fifo_png, found)
    assert fifo_png.is_fifo()
    with pytest.raises(UsageError, match=r"html, \.svg or \.png"):
        attention_maps.check_path(tmp_path / "maps.pdf")


def test_translate_draws_attention_from_the_command_line(transformer_run, transformer, tmp_path):
    run = CliRunner().invoke(
        app, ["translate", str(transformer_run), *SENTENCES, "--attention", str(tmp_path / "a.svg")]
    )
    assert run.exit_code == 0, run.stderr
    assert run.stdout.splitlines() == [out[0].text for out in transformer.translate(SENTENCES)]
    assert ET.parse(tmp_path / "a.svg").getroot().tag == "{http://www.w3.org/2000/svg}svg"
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    refused = CliRunner().invoke(app, ["translate", str(transformer_run), "1", "--attention", str(fifo)])
    assert refused.exit_code == 1 and "never replaced" in refused.stderr and fifo.is_fifo()
    both = CliRunner().invoke(app, ["translate", "x", "1", "--n-best", "2", "--attention", str(tmp_path / "b.html")])
    assert both.exit_code == 1 and "--n-best" in both.stderr
