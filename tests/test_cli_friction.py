"""What a new user tripped over (issue 17), each held to what the docs say: plugins for every command, a fast
start, Ctrl-C, exported programs' calls, quick benchmarks, the plugin example, reproducible files, docs outputs."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

PLUGIN = ROOT / "examples" / "blockgraph-highway" / "blockgraph_highway.py"

LM_WITH_A_PLUGIN_BLOCK = """
name: plugged-lm
vars: {vocab: 20, d: 8}
dims: {batch: 2, seq: 4}
inputs:
  tokens: {dtype: int64, shape: [batch, seq], high: "${vocab}"}
nodes:
  embed: {type: token_embedding, params: {vocab: "${vocab}", dim: "${d}"}, in: tokens}
  hidden: {type: feed_forward, params: {d_model: "${d}", d_ff: 16}, in: embed}
  gate: {type: highway, params: {dim: "${d}"}, in: [embed, hidden]}
  generator: {type: generator, params: {d_model: "${d}", vocab: "${vocab}"}, in: gate}
outputs: generator
"""


@pytest.fixture(autouse=True)
def clean_registry(restored_registry):
    yield


def test_plugins_are_an_option_of_every_command_training_and_decoding_included(tmp_path, run_cli):
    spec = tmp_path / "lm.yaml"
    spec.write_text(LM_WITH_A_PLUGIN_BLOCK)
    (tmp_path / "lines.txt").write_text("a b c\nb c d\nc d e\n")
    run = ("train", spec, "--data", tmp_path / "lines.txt", "--max-steps", "1", "--valid-fraction", "0")
    trained = run_cli("--plugin", PLUGIN, *run, "--out", tmp_path / "run")
    assert trained.code == 0, trained.stderr
    generated = run_cli("--plugin", PLUGIN, "generate", tmp_path / "run", "a b", "--max-new", "2")
    assert generated.code == 0 and generated.stdout.startswith("a b"), generated.stderr
    translated = run_cli("--plugin", PLUGIN, "translate", tmp_path / "run", "a b", "--max-len", "2")
    assert translated.code == 0, translated.stderr


def test_a_model_saved_with_a_plugin_block_says_how_to_load_it(tmp_path, run_cli, restored_registry):
    spec = tmp_path / "lm.yaml"
    spec.write_text(LM_WITH_A_PLUGIN_BLOCK)
    assert run_cli("--plugin", PLUGIN, "build", spec, "--out", tmp_path / "saved").code == 0
    restored_registry._entries.pop("highway")
    restored_registry.plugins.clear()
    result = run_cli("export", tmp_path / "saved", "--format", "exported-program", "--out", tmp_path / "m.pt2")
    message = " ".join(result.stderr.split())
    assert result.code == 1 and "blocks from plugin blockgraph_highway.py" in message, message
    assert "`blockgraph --plugin FILE_OR_MODULE COMMAND ...`" in message


def test_help_and_version_answer_without_loading_torch():
    watched = ("torch", "blockgraph.builder.graph", "blockgraph.blocks")
    code = f"import sys; from blockgraph import cli; print(sorted(m for m in {watched} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0 and loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr
    version = subprocess.run(
        [sys.executable, "-c", "from blockgraph import cli; cli.app()", "--version"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert version.returncode == 0 and re.fullmatch(r"blockgraph \d+\.\d+\.\d+\S*\n", version.stdout)


def test_ctrl_c_before_the_first_checkpoint_says_there_is_none(tmp_path, run_cli, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("blockgraph.trainer.loop.train", interrupted)
    spec = ROOT / "specs" / "transformer.yaml"
    result = run_cli("train", spec, "--task", "copy", "--out", tmp_path / "run")
    assert result.code == 130 and "interrupted: no checkpoint yet" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_an_exported_program_is_called_as_its_export_says(tmp_path, run_cli):
    path = tmp_path / "model.pt2"
    result = run_cli("export", ROOT / "specs" / "tiny_encoder.yaml", "--format", "exported-program", "--out", path)
    assert result.code == 0, result.stderr
    (call,) = [line.strip() for line in result.stdout.splitlines() if line.strip().startswith("call:")]
    assert call == f"call: torch.export.load({str(path)!r}).module()(tokens=...)"
    program = torch.export.load(str(path)).module()
    tokens = torch.randint(0, 10, (2, 5))
    assert program(tokens=tokens).shape[:2] == (2, 5)
    with pytest.raises(ValueError, match="kwarg"):  # as docs/persist.md says
        program(tokens)


def test_quick_and_partial_benchmark_runs_leave_the_tracked_results_alone():
    from benchmarks import run

    assert run.parse(["--quick"]).out == run.SCRATCH
    assert run.parse(["--only", "encoder"]).out == run.SCRATCH
    assert run.parse([]).out == run.RESULTS
    assert "benchmarks/RESULTS-quick.md" in (ROOT / ".gitignore").read_text().splitlines()


def test_the_writing_blocks_example_works_as_a_plugin_as_written(tmp_path, run_cli):
    text = (ROOT / "docs" / "writing-blocks.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    name = re.search(r'@register\("(\w+)"', code).group(1)
    (tmp_path / "my_block.py").write_text(code)
    shown = run_cli("--plugin", tmp_path / "my_block.py", "blocks", "show", name)
    assert shown.code == 0, shown.stderr
    assert f"blockgraph --plugin my_{name.removeprefix('my_')}.py blocks show {name}" in text


def test_saved_models_are_byte_reproducible_with_the_users_file_modes(tmp_path):
    from blockgraph import builder
    from blockgraph.builder import persist

    model = builder.build(ROOT / "specs" / "tiny_encoder.yaml")
    for name in ("a", "b", "c"):
        persist.save(model, tmp_path / name)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    modes = set()
    for file in files:
        data = {(tmp_path / name / file).read_bytes() for name in ("a", "b", "c")}
        assert len(data) == 1, file  # safetensors' metadata in one order, whatever its hash map's
        modes.add((tmp_path / "a" / file).stat().st_mode & 0o777)
    assert len(modes) == 1, modes  # the weights as every other file, not 0600


def test_the_project_says_its_license_and_ignores_run_outputs():
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert {"runs/", "*.pt2", "*.onnx"} <= set(ignored)


def _shape(line: str) -> str:
    return re.sub(r"-?\d[\d,]*(\.\d+)?", "N", line)


def test_documented_training_outputs_are_marked_examples_in_todays_format():
    """Outputs with figures in docs/training.md come from no seeded run here: each is marked as an example, and
    its lines have the shape the code prints today."""
    from blockgraph.trainer.config import TrainConfig
    from blockgraph.trainer.loop import _epoch_line

    text = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    blocks = re.findall(r"(<!-- output: example -->\n)?```[a-z]*\n(.*?)```", text, re.S)
    figures = re.compile(r"^(epoch \d+/\d+:|# -?\d+\.\d+\t|# \w+\t\d\.\d+$)", re.M)
    shown = [(marker, body) for marker, body in blocks if figures.search(body)]
    assert len(shown) == 3 and all(marker for marker, _ in shown)
    record = {"epoch": 60, "step": 1, "train_loss": 1.0, "train_acc": 0.5, "valid_loss": 2.0, "valid_ppl": 7.4,
              "valid_acc": 0.5, "bleu": 10.0, "chrf": 30.0, "tokens_per_s": 1875.0}  # fmt: skip
    printed = re.sub(r"\[/?(bold)?\]", "", _epoch_line(record, TrainConfig(epochs=60), True))
    epochs = [line for _, body in shown for line in body.splitlines() if line.startswith("epoch ")]
    assert epochs and all(_shape(line) == _shape(printed) for line in epochs), (epochs, printed)


def test_help_shows_metavars_not_python_types_and_flags_take_none(run_cli):
    from blockgraph import cli

    names = [c.name or c.callback.__name__ for c in cli.app.registered_commands]
    for args in ([], *([name] for name in names), ["blocks", "list"], ["blocks", "show"]):
        result = run_cli(*args, "--help", env={"COLUMNS": "80"})
        assert result.code == 0, (args, result.stderr)
        assert "<bool>" not in result.stdout and "<list[" not in result.stdout and "<int>" not in result.stdout, args
    shown = run_cli("validate", "--help", env={"COLUMNS": "80"}).stdout
    assert re.search(r"--strict\s+Treat warnings", shown) and "NAME=VALUE" in shown


def test_a_broken_tie_points_to_the_parameter_listing(run_cli, write_spec):
    spec = write_spec(
        {
            "name": "tied",
            "dims": {"b": 2},
            "inputs": {"x": {"shape": ["b", 4]}},
            "nodes": {
                "a": {"type": "linear", "params": {"in_features": 4, "out_features": 4}, "in": "x"},
                "c": {"type": "linear", "params": {"in_features": 4, "out_features": 4}, "in": "a"},
            },
            "tie": {"c.weigth": "a.weight"},
            "outputs": "c",
        }
    )
    result = run_cli("build", spec)
    assert result.code == 1 and "`blockgraph inspect SPEC --params` lists them" in " ".join(result.stderr.split())
    listing = run_cli("inspect", spec, "--params")
    assert listing.code == 0 and "c.proj.weight" in listing.stdout and "did you mean c.proj.weight" in listing.stdout


def test_the_plugins_reach_every_process_of_a_parallel_run(tmp_path):
    spec = tmp_path / "lm.yaml"
    spec.write_text(LM_WITH_A_PLUGIN_BLOCK)
    (tmp_path / "lines.txt").write_text("a b c\nb c d\nc d e\nd e f\n")
    command = [sys.executable, "-m", "blockgraph.cli", "--plugin", str(PLUGIN), "train", str(spec), "--data",
               str(tmp_path / "lines.txt"), "--max-steps", "1", "--valid-fraction", "0", "--batch-size", "4",
               "--nproc", "2", "--strategy", "fsdp", "--quiet", "--out", str(tmp_path / "run")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "run" / "checkpoint" / "sharded" / ".metadata").is_file()
