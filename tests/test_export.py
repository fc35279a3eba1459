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


def test_cli_exports_in_bfloat16(run_cli, tmp_path):
    """--dtype casts the weights before tracing: the program holds bfloat16 weights and computes what the model
    cast to bfloat16 computes, within bfloat16's rounding of float32's output."""
    saved = builder.save(builder.build(TINY, overrides=SMALL), tmp_path / "saved")
    result = run_cli("export", saved, "-f", "exported-program", "-o", tmp_path / "m.pt2", "--dtype", "bfloat16")
    assert result.code == 0, result.stderr
    loaded = torch.export.load(tmp_path / "m.pt2")
    assert {t.dtype for t in loaded.state_dict.values() if t.is_floating_point()} == {torch.bfloat16}
    model, tokens = builder.load(saved).eval(), torch.randint(0, 40, (3, 6))
    with torch.no_grad():
        exact, ours = model(tokens=tokens), loaded.module()(tokens=tokens)
        torch.testing.assert_close(ours, model.to(torch.bfloat16)(tokens=tokens), rtol=0, atol=1e-2)
    assert ours.dtype == torch.bfloat16 and not torch.equal(ours.float(), exact)
    torch.testing.assert_close(ours.float(), exact, rtol=0.02, atol=0.05)
    assert run_cli("export", saved, "-f", "onnx", "-o", tmp_path / "m.onnx", "--dtype", "int4").code == 1


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


RNN_ATTENTION = ROOT / "specs" / "rnn_seq2seq_attention.yaml"
SMALL_RNN = [f"--set={pair}" for pair in ("emb=8", "hidden=8", "layers=1", "src_vocab=20", "tgt_vocab=20")]


def test_a_failed_export_says_only_its_error_and_debug_shows_what_torch_printed(run_cli, tmp_path):
    """The LSTM encoder's padding mask makes torch.export fail: the error alone, torch's graph under --debug."""
    args = ("export", RNN_ATTENTION, "-f", "exported-program", "-o", tmp_path / "m.pt2", "--with-optional", *SMALL_RNN)
    result = run_cli(*args)
    assert result.code == 1 and "torch.export cannot trace" in result.stderr, result.stderr
    assert "def forward" not in result.stderr and "torch.ops.aten" not in result.stderr, result.stderr
    assert result.stderr.count("\n") < 12, result.stderr  # the located error and its hint
    debugged = run_cli("--debug", *args)
    assert debugged.code != 0 and "def forward" in debugged.stderr  # the partial graph torch printed
    assert not (tmp_path / "m.pt2").exists()


def test_export_names_the_optional_inputs_it_leaves_out(run_cli, tmp_path):
    spec = [f"--set={name}={value}" for name, value in SMALL.items()]
    left = run_cli("export", TINY, "-f", "exported-program", "-o", tmp_path / "a.pt2", *spec)
    assert left.code == 0, left.stderr
    message = " ".join(left.stderr.split())
    assert "warning: optional input(s) left out of the export: pad (bool [batch, seq])" in message, message
    assert "--with-optional" in message
    assert "input pad" not in left.stdout
    taken = run_cli("export", TINY, "-f", "exported-program", "-o", tmp_path / "b.pt2", *spec, "--with-optional")
    assert taken.code == 0 and "left out" not in taken.stderr, taken.stderr
    assert "input pad: bool [batch, seq]" in taken.stdout


def test_the_export_api_warns_of_each_optional_input_left_out(tmp_path):
    model, typed = tiny()
    dims = resolve_dims(typed.graph)
    result = exporting.export(model, typed, dims, "exported-program", tmp_path / "m.pt2")
    (warning,) = result.warnings
    assert warning.severity == "warning" and "pad (bool [batch, seq])" in warning.message
    named = exporting.export(model, typed, dims, "exported-program", tmp_path / "n.pt2", include_optional=["pad"])
    assert named.inputs == ["tokens", "pad"] and not named.warnings


def test_a_strided_convolution_keeps_its_length_dynamic_from_the_least_size_it_takes(tmp_path):
    """Whisper's stride-2 convolution halves the frames: torch.export specialises a length of 1, so the frames
    stay dynamic from the least size that keeps every derived length at 2 or more (or the next that torch's range
    analysis proves) rather than falling back to the trial size."""
    small = {"vocab": 50, "d_model": 16, "heads": 2, "d_ff": 32, "enc_layers": 1, "dec_layers": 1, "mel": 8}
    typed = typed_graph(ROOT / "specs" / "whisper.yaml", {**small, "source_positions": 16, "max_len": 16})
    model = compile_graph(typed).eval()
    sizes = {"batch": 2, "frames": 32, "tgt_len": 10}
    assert exporting.smallest_size(typed, "frames", sizes) == 3  # floor((3 - 1) / 2) + 1 = 2; 2 frames give 1
    result = exporting.export(model, typed, sizes, "exported-program", tmp_path / "w.pt2")
    low, high = result.dynamic["frames"]
    assert not result.static and 3 <= low < 32 and high == 32, result.dynamic  # 32 frames fill 16 positions
    program = torch.export.load(tmp_path / "w.pt2").module()
    for batch, frames, length in ((1, low, 3), (3, 17, 7)):
        inputs = {"features": torch.randn(batch, 8, frames), "tgt": torch.randint(0, 50, (batch, length))}
        with torch.no_grad():
            torch.testing.assert_close(program(**inputs), model(**inputs), rtol=0, atol=1e-5)
