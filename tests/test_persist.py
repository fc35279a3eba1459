"""Saving a built model (safetensors + standalone spec + manifest) and loading it back bit-exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from blockgraph import builder
from blockgraph.common.errors import CheckpointError, WriteError

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "specs" / "tiny_encoder.yaml"
SMALL = {"vocab": 40, "d_model": 8, "heads": 2, "d_ff": 16, "layers": 2}

TIED = {
    "name": "tied-lm",
    "vars": {"vocab": 30, "d": 8},
    "dims": {"batch": 2, "seq": 5},
    "inputs": {"tokens": {"dtype": "int64", "shape": ["batch", "seq"], "high": "${vocab}"}},
    "nodes": {
        "embed": {"type": "token_embedding", "params": {"vocab": "${vocab}", "dim": "${d}"}, "in": "tokens"},
        "mix1": {"type": "linear", "params": {"in_features": "${d}", "out_features": "${d}"}, "in": "embed"},
        "mix2": {"type": "linear", "share": "mix1", "in": "mix1"},
        "generator": {"type": "generator", "params": {"d_model": "${d}", "vocab": "${vocab}"}, "in": "mix2"},
    },
    "outputs": "generator",
    "tie": {"generator.proj.weight": "embed.lut.weight"},
}


def assert_same_model(a: torch.nn.Module, b: torch.nn.Module, *inputs: torch.Tensor) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name
    assert torch.equal(a.eval()(*inputs), b.eval()(*inputs))


def test_round_trip_is_bit_exact(tmp_path):
    model = builder.build(TINY, overrides=SMALL)
    with torch.no_grad():  # weights that differ from a fresh build's
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    saved = builder.save(model, tmp_path / "tiny")
    assert sorted(p.name for p in saved.iterdir()) == ["blockgraph.json", "model.safetensors", "spec.yaml"]
    loaded = builder.load(saved)
    assert type(loaded).__name__ == type(model).__name__
    tokens = torch.randint(0, 40, (3, 7))
    assert_same_model(model, loaded, tokens)
    spec = yaml.safe_load((saved / "spec.yaml").read_text())
    assert spec["vars"]["d_model"] == 8 and "extends" not in spec  # overrides live in the standalone spec


def test_tied_and_shared_weights_are_stored_once_and_retied(tmp_path):
    model = builder.build(TIED, overrides={"d": 6})
    assert model.generator.proj.weight is model.embed.lut.weight
    builder.save(model, tmp_path / "tied")
    stored = load_file(tmp_path / "tied" / "model.safetensors")
    assert "embed.lut.weight" in stored and "generator.proj.weight" not in stored
    assert not any(name.startswith("mix2") for name in stored)  # share: reuses mix1's module
    loaded = builder.load(tmp_path / "tied")
    assert loaded.generator.proj.weight is loaded.embed.lut.weight  # still one tensor: training keeps them tied
    assert loaded.get_submodule("mix1") is not None
    assert_same_model(model, loaded, torch.randint(0, 30, (2, 5)))
    manifest = json.loads((tmp_path / "tied" / "blockgraph.json").read_text())
    assert manifest["tied"] == {"generator.proj.weight": "embed.lut.weight"}


def test_manifest(tmp_path):
    model = builder.build(TIED, dtype="float64")
    builder.save(model, tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "blockgraph.json").read_text())
    assert manifest["format"] == "blockgraph-model" and manifest["format_version"] == 1
    assert manifest["torch_version"] == torch.__version__
    assert manifest["blockgraph_version"]
    assert manifest["dtype"] == "float64"
    assert manifest["spec_name"] == "tied-lm"
    assert manifest["blocks"] == {"generator": "built-in", "linear": "built-in", "token_embedding": "built-in"}
    assert manifest["plugins"] == []
    loaded = builder.load(tmp_path / "m")
    assert loaded.embed.lut.weight.dtype == torch.float64
    assert_same_model(model, loaded, torch.randint(0, 30, (2, 5)))


def test_cli_build_out_then_load(run_cli, tmp_path):
    out = tmp_path / "run"
    args = [a for k, v in SMALL.items() for a in ("--set", f"{k}={v}")]
    result = run_cli("build", TINY, *args, "--out", out)
    assert result.code == 0, result.stderr
    assert f"saved to {out}" in " ".join(result.stdout.split())
    model = builder.load(out)
    assert model.embed.lut.weight.shape == (40, 8)
    assert len(model.encoder) == 2
    again = run_cli("build", TINY, *args, "--out", out)  # a saved model is replaced
    assert again.code == 0, again.stderr
    assert not torch.equal(builder.load(out).embed.lut.weight, model.embed.lut.weight)


def _tamper(directory: Path, change) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def test_load_refuses_renamed_tensor(tmp_path):
    builder.save(builder.build(TIED), tmp_path / "m")
    _tamper(tmp_path / "m", lambda t: t.__setitem__("mix1.proj.wieght", t.pop("mix1.proj.weight")))
    with pytest.raises(CheckpointError) as info:
        builder.load(tmp_path / "m")
    text = str(info.value)
    assert "model.safetensors" in text
    assert "lacks 1 tensor(s) the spec has: mix1.proj.weight" in text
    assert "has 1 tensor(s) the spec has not: mix1.proj.wieght" in text


def test_load_refuses_changed_shape(tmp_path):
    builder.save(builder.build(TIED), tmp_path / "m")
    _tamper(tmp_path / "m", lambda t: t.__setitem__("mix1.proj.bias", torch.zeros(9)))
    with pytest.raises(CheckpointError) as info:
        builder.load(tmp_path / "m")
    assert "mix1.proj.bias: [9] in the weights file, [8] in the spec" in str(info.value)


def test_load_accepts_a_tied_tensor_under_its_other_name(tmp_path):
    model = builder.build(TIED)
    builder.save(model, tmp_path / "m")
    _tamper(tmp_path / "m", lambda t: t.__setitem__("generator.proj.weight", t.pop("embed.lut.weight")))
    loaded = builder.load(tmp_path / "m")
    assert torch.equal(loaded.embed.lut.weight, model.embed.lut.weight)
    assert loaded.generator.proj.weight is loaded.embed.lut.weight


def test_failed_save_leaves_nothing_behind(tmp_path, file_size_limit):
    model = builder.build(TIED)
    with file_size_limit(1000), pytest.raises(WriteError, match="File too large"):  # the weights do not fit
        builder.save(model, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_the_previous_one(tmp_path, file_size_limit):
    first = builder.build(TIED)
    builder.save(first, tmp_path / "m")
    with file_size_limit(1000), pytest.raises(WriteError):
        builder.save(builder.build(TIED), tmp_path / "m")
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    assert torch.equal(builder.load(tmp_path / "m").embed.lut.weight, first.embed.lut.weight)


def test_save_refuses_a_foreign_directory_and_load_a_non_model(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("mine")
    with pytest.raises(WriteError, match="not a saved blockgraph model"):
        builder.save(builder.build(TIED), tmp_path / "docs")
    assert (tmp_path / "docs" / "notes.txt").read_text() == "mine"
    with pytest.raises(CheckpointError, match=r"no blockgraph\.json"):
        builder.load(tmp_path / "docs")


def test_load_never_unpickles(tmp_path, monkeypatch):
    builder.save(builder.build(TIED), tmp_path / "m")

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr("pickle.load", forbidden)
    monkeypatch.setattr("pickle.loads", forbidden)
    builder.load(tmp_path / "m")


def test_a_model_with_pretrained_vectors_loads_after_the_vectors_file_is_gone(tmp_path):
    """The saved weights hold the vectors; loading must not need the original text file."""
    vectors = tmp_path / "vectors.txt"
    vectors.write_text("a 1 2 3\nb 4 5 6\nc 7 8 9\n")
    spec = {
        "name": "pretrained",
        "inputs": {"ids": {"dtype": "int64", "shape": ["batch"]}},
        "nodes": {
            "emb": {
                "type": "token_embedding",
                "params": {"vocab": 3, "dim": 3, "pretrained": str(vectors)},
                "in": "ids",
            }
        },
        "outputs": "emb",
    }
    model = builder.build(spec, allow_external_files=True)  # an absolute path
    builder.save(model, tmp_path / "saved")
    vectors.unlink()
    loaded = builder.load(tmp_path / "saved")
    assert torch.equal(loaded.emb.lut.weight, model.emb.lut.weight)
    assert torch.equal(loaded.emb.lut.weight[1], torch.tensor([4.0, 5.0, 6.0]))
