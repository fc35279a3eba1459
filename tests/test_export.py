"""Exporting built models: torch.export programs and ONNX with the spec's named dimensions dynamic."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from blockgraph import builder
from blockgraph.builder import export as exporting
from blockgraph.builder.pipeline import compile_graph, typed_graph
from blockgraph.builder.trial import resolve_dims

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "specs" / "tiny_encoder.yaml"
SMALL = {"vocab": 40, "d_model": 8, "heads": 2, "d_ff": 16, "layers": 1}
SIZES = [(1, 3), (4, 9)]  # (batch, seq), both different from the spec's trial dims (2, 16)


def tiny():
    typed = typed_graph(TINY, SMALL)
    return compile_graph(typed).eval(), typed


def random_inputs(batch: int, seq: int) -> dict[str, torch.Tensor]:
    tokens = torch.randint(0, 40, (batch, seq))
    pad = torch.zeros(batch, seq, dtype=torch.bool)
    pad[0, seq - 1 :] = seq > 1  # some padding, never a whole row
    return {"tokens": tokens, "pad": pad}


def test_exported_program_is_dynamic_in_batch_and_seq(tmp_path):
    model, typed = tiny()
    result = exporting.export(
        model, typed, resolve_dims(typed.graph), "exported-program", tmp_path / "m.pt2", include_optional=True
    )
    assert result.inputs == ["tokens", "pad"]
    assert set(result.dynamic) == {"batch", "seq"} and not result.static
    assert result.dynamic["seq"][1] == 5000  # the sinusoidal table bounds seq
    program = torch.export.load(tmp_path / "m.pt2").module()
    for batch, seq in SIZES:
        inputs = random_inputs(batch, seq)
        with torch.no_grad():
            torch.testing.assert_close(program(**inputs), model(**inputs), rtol=0, atol=1e-5)


def test_onnx_matches_eager_with_named_dynamic_axes(tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'blockgraph[onnx]')")
    pytest.importorskip("onnxscript", reason="onnxscript is not installed (pip install 'blockgraph[onnx]')")
    model, typed = tiny()
    path = tmp_path / "m.onnx"
    exporting.export(model, typed, resolve_dims(typed.graph), "onnx", path, include_optional=True)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # one file, nothing left over
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    axes = [("tokens", ["batch", "seq"]), ("pad", ["batch", "seq"])]
    assert [(i.name, i.shape) for i in session.get_inputs()] == axes
    assert [o.name for o in session.get_outputs()] == ["output"]
    for batch, seq in SIZES:
        inputs = random_inputs(batch, seq)
        (got,) = session.run(None, {k: v.numpy() for k, v in inputs.items()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), model(**inputs), rtol=0, atol=1e-5)


def test_size_dependent_block_falls_back_to_static_with_a_warning(tmp_path):
    spec = {
        "name": "rnn-tagger",
        "dims": {"batch": 2, "seq": 5},
        "inputs": {"x": {"dtype": "float32", "shape": ["batch", "seq", 4]}},
        "nodes": {"rnn": {"type": "rnn", "params": {"input_size": 4, "hidden_size": 4}, "in": "x"}},
        "outputs": "rnn.y",
    }
    typed = typed_graph(spec)
    model = compile_graph(typed).eval()
    result = exporting.export(model, typed, resolve_dims(typed.graph), "exported-program", tmp_path / "r.pt2")
    assert [w.severity for w in result.warnings] == ["warning"] and "seq=5 are static" in result.warnings[0].message
    assert result.static == {"seq": 5} and "batch" in result.dynamic
    program = torch.export.load(tmp_path / "r.pt2").module()
    x = torch.randn(3, 5, 4)  # batch still dynamic
    torch.testing.assert_close(program(x=x), model(x=x), rtol=0, atol=1e-5)


def test_cli_exports_a_saved_model(run_cli, tmp_path):
    saved = builder.save(builder.build(TINY, overrides=SMALL), tmp_path / "saved")
    result = run_cli("export", saved, "--format", "exported-program", "--out", tmp_path / "m.pt2")
    assert result.code == 0, result.stderr
    assert "input tokens: int64 [batch, seq]" in result.stdout
    assert "dynamic batch" in result.stdout and "dynamic seq (at most 5000)" in result.stdout
    program = torch.export.load(tmp_path / "m.pt2").module()
    model = builder.load(saved).eval()
    tokens = torch.randint(0, 40, (3, 6))
    torch.testing.assert_close(program(tokens=tokens), model(tokens=tokens), rtol=0, atol=1e-5)


def test_cli_export_errors(run_cli, tmp_path):
    saved = builder.save(builder.build(TINY, overrides=SMALL), tmp_path / "saved")
    refused = run_cli("export", saved, "-f", "exported-program", "-o", tmp_path / "m.pt2", "--set", "layers=3")
    assert refused.code == 1 and "--set does not apply to a saved model" in refused.stderr
    bad_format = run_cli("export", TINY, "-f", "tflite", "-o", tmp_path / "m.tflite")
    assert bad_format.code == 2
    assert not (tmp_path / "m.pt2").exists()


def test_onnx_without_its_packages_says_what_to_install(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    model, typed = tiny()
    with pytest.raises(exporting.ExportError, match=r"pip install 'blockgraph\[onnx\]'"):
        exporting.export(model, typed, resolve_dims(typed.graph), "onnx", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
