"""Every command that reads a model takes every kind of model path (issue 23, item 3): a spec file, a saved model,
a training run, its checkpoint/, a consolidated checkpoint, a sharded run and its checkpoint/, an imported model;
each reads the part it needs, refuses with a reason what it cannot use, and a directory that is none of them is
a located error naming what was looked for."""

from __future__ import annotations

import json
from pathlib import Path

import hf_dirs
import pytest
import torch
from conftest import SPECS

from blockgraph import builder
from blockgraph.trainer import pretrained, sharded
from blockgraph.trainer.loop import TrainConfig, train

torch.set_num_threads(1)

TRANSFORMER = SPECS / "transformer.yaml"
SMALL = {"d_model": 16, "heads": 2, "enc_layers": 1, "dec_layers": 1, "d_ff": 32, "dropout": 0.0}
RUN = {
    "spec": str(TRANSFORMER),
    "overrides": SMALL,
    "task": "copy",
    "task_options": {"symbols": 6, "min_len": 2, "max_len": 5, "train": 32, "valid": 8},
    "batch_size": 16,
    "max_steps": 2,
    "bleu_sentences": 0,
}
SPEC = ["--set", "d_model=16", "--set", "heads=2", "--set", "enc_layers=1", "--set", "dec_layers=1"]

WEIGHTED = ["saved", "run", "checkpoint", "consolidated", "imported"]  # directories holding whole weights
SHARDED = ["sharded run", "sharded checkpoint"]
KINDS = ["spec", *WEIGHTED, *SHARDED, "no model", "missing"]
NO_MODEL = "is a directory that holds no model"


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, Path]:
    """One path of each kind, made the cheap way: build --out, two steps of train (one process, sharded too),
    consolidate, an import of a small GPT-2 (tests/hf_dirs.py); and a directory that holds no model."""
    root = tmp_path_factory.mktemp("kinds")
    saved = builder.save(builder.build(TRANSFORMER, overrides={**SMALL, "src_vocab": 12, "tgt_vocab": 12}), root / "s")
    train(TrainConfig(**RUN), root / "run", quiet=True)
    train(TrainConfig(**RUN, strategy="fsdp"), root / "fsdp", quiet=True)
    consolidated = sharded.consolidate(root / "fsdp", root / "merged")
    _, _, hf = hf_dirs.gpt2(root)
    pretrained.import_pretrained(hf, root / "gpt2")
    (root / "other").mkdir()
    (root / "other" / "notes.txt").write_text("not a model\n")
    return {
        "spec": TRANSFORMER,
        "saved": saved,
        "run": root / "run",
        "checkpoint": root / "run" / "checkpoint",
        "consolidated": consolidated,
        "imported": root / "gpt2",
        "sharded run": root / "fsdp",
        "sharded checkpoint": root / "fsdp" / "checkpoint",
        "no model": root / "other",
        "missing": root / "missing",
    }


def weights_of(paths: dict[str, Path], kind: str) -> Path:
    """The saved model holding a directory's weights, by the layouts' own docs (not by the resolver)."""
    path = paths[kind]
    return {"saved": path, "run": path / "checkpoint" / "model"}.get(kind, path / "model")


def saved_spec_of(paths: dict[str, Path], kind: str) -> Path:
    """The spec saved with a directory's weights (a sharded checkpoint keeps it beside its shards)."""
    path = paths[kind]
    sharded_specs = {"sharded run": path / "checkpoint" / "spec.yaml", "sharded checkpoint": path / "spec.yaml"}
    return sharded_specs.get(kind) or weights_of(paths, kind) / "spec.yaml"


def spec_args(kind: str) -> list[str]:
    return SPEC if kind == "spec" else []


@pytest.mark.parametrize("kind", KINDS)
def test_inspect_and_validate_read_the_spec_of_every_kind(paths, run_cli, kind):
    path = paths[kind]
    shown = run_cli("inspect", path, "--format", "json", *spec_args(kind))
    checked = run_cli("validate", path, *spec_args(kind))
    if kind == "no model":
        for result in (shown, checked):
            message = " ".join(result.stderr.split())
            assert result.code == 1 and f"{path} {NO_MODEL}" in message, message
            assert "blockgraph.json" in message and "trainer.json" in message and "pretrained.json" in message
        return
    if kind == "missing":
        assert shown.code == 1 and "not found" in shown.stderr and checked.code == 1
        return
    assert shown.code == 0 and checked.code == 0, shown.stderr + checked.stderr
    assert f"✓ {path}:" in checked.stdout
    if kind != "spec":  # the spec saved with the weights, as inspecting that file shows it
        own = run_cli("inspect", saved_spec_of(paths, kind), "--format", "json")
        assert json.loads(shown.stdout) == json.loads(own.stdout)


@pytest.mark.parametrize("kind", ["saved", "run", "sharded checkpoint", "imported"])
def test_set_applies_to_spec_files_only(paths, run_cli, kind):
    result = run_cli("inspect", paths[kind], "--set", "d_model=32")
    message = " ".join(result.stderr.split())
    assert result.code == 1 and "--set does not apply to a" in message and "give the spec file itself" in message


@pytest.mark.parametrize("kind", KINDS)
def test_build_loads_the_weights_of_every_kind_that_holds_them(paths, run_cli, tmp_path, kind):
    path = paths[kind]
    result = run_cli("build", path, *spec_args(kind), "--out", tmp_path / "copy")
    if kind in SHARDED:
        message = " ".join(result.stderr.split())
        assert result.code == 1 and "sharded" in message and f"blockgraph consolidate {path} --out DIR" in message
        return
    if kind in ("no model", "missing"):
        assert result.code == 1 and (NO_MODEL if kind == "no model" else "not found") in " ".join(result.stderr.split())
        return
    assert result.code == 0, result.stderr
    copy = builder.load(tmp_path / "copy").state_dict()
    if kind == "spec":
        assert "time" in result.stdout and "compile" in result.stdout
        return
    assert "load" in result.stdout
    original = builder.load(weights_of(paths, kind)).state_dict()
    assert copy.keys() == original.keys() and all(torch.equal(copy[k], original[k]) for k in copy)


@pytest.mark.parametrize("kind", ["spec", *WEIGHTED, *SHARDED, "no model"])
def test_export_takes_the_weights_of_every_kind_that_holds_them(paths, run_cli, tmp_path, kind):
    path = paths[kind]
    target = tmp_path / "m.pt2"
    result = run_cli("export", path, "-f", "exported-program", "-o", target, *spec_args(kind))
    if kind in SHARDED:
        assert result.code == 1 and "consolidate" in result.stderr and not target.exists()
        return
    if kind == "no model":
        assert result.code == 1 and NO_MODEL in " ".join(result.stderr.split()) and not target.exists()
        return
    assert result.code == 0, result.stderr
    if kind == "spec":
        return
    model = builder.load(weights_of(paths, kind)).eval()
    program = torch.export.load(target).module()
    inputs = (
        {"tokens": torch.randint(0, 20, (2, 5))}
        if kind == "imported"
        else {"src": torch.randint(0, 10, (2, 5)), "tgt": torch.randint(0, 10, (2, 4))}
    )
    with torch.no_grad():
        torch.testing.assert_close(program(**inputs), model(**inputs), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_translate_takes_trained_models_and_says_what_else_is(paths, run_cli, kind):
    path = paths[kind]
    result = run_cli("translate", path, "1 2 3")
    message = " ".join(result.stderr.split())
    if kind in ("run", "checkpoint", "consolidated", "imported"):
        assert result.code == 0 and result.stdout.strip(), message
    elif kind in SHARDED:
        assert result.code == 1 and f"blockgraph consolidate {path} --out DIR" in message, message
    elif kind == "no model":
        assert result.code == 1 and NO_MODEL in message, message
    elif kind == "missing":
        assert result.code == 1 and f"{path} does not exist" in message, message
    else:
        expected = f"{path} is a {'spec file' if kind == 'spec' else 'saved model'}: translate needs a trained model"
        assert result.code == 1 and expected in message, message


@pytest.mark.parametrize("kind", ["saved", "imported", "sharded run", "no model"])
def test_generate_resolves_its_model_as_translate_does(paths, run_cli, kind):
    result = run_cli("generate", paths[kind], "what is", "--max-new", "3")
    message = " ".join(result.stderr.split())
    expected = {"saved": "is a saved model: generate needs a trained model", "sharded run": "consolidate"}
    if kind == "imported":
        assert result.code == 0 and result.stdout.strip(), message
    else:
        assert result.code == 1 and expected.get(kind, NO_MODEL) in message, message


@pytest.mark.parametrize("kind", KINDS)
def test_resume_takes_runs_and_their_checkpoints(paths, run_cli, tmp_path, kind):
    path = paths[kind]
    result = run_cli("train", "--resume", path, "--max-steps", "3", "--out", tmp_path / "more", "--quiet")
    message = " ".join(result.stderr.split())
    if kind in ("run", "checkpoint", "consolidated", *SHARDED):
        assert result.code == 0, message
        assert json.loads((tmp_path / "more" / "checkpoint" / "trainer.json").read_text())["step"] == 3
    elif kind == "imported":
        assert result.code == 1 and f"blockgraph train {path} --data FILE" in message, message
    elif kind in ("spec", "saved"):
        assert result.code == 1 and "--resume takes a training run" in message, message
    else:
        assert result.code == 1 and (NO_MODEL if kind == "no model" else "does not exist") in message, message


@pytest.mark.parametrize("kind", ["spec", "saved", "checkpoint", "imported", *SHARDED, "no model"])
def test_consolidate_takes_a_sharded_run_and_says_what_else_is(paths, run_cli, tmp_path, kind):
    path = paths[kind]
    result = run_cli("consolidate", path, "--out", tmp_path / "whole")
    message = " ".join(result.stderr.split())
    if kind in SHARDED:
        assert result.code == 0, message
        assert run_cli("translate", tmp_path / "whole", "1 2").code == 0
    elif kind == "checkpoint":
        assert result.code == 1 and "is an ordinary checkpoint already" in message, message
    elif kind == "no model":
        assert result.code == 1 and NO_MODEL in message, message
    else:
        assert result.code == 1 and "consolidate takes a training run" in message, message
        assert not (tmp_path / "whole").exists()


@pytest.mark.parametrize("kind", ["saved", "run"])
def test_train_starts_from_a_spec_or_an_import_and_points_elsewhere(paths, run_cli, tmp_path, kind):
    path = paths[kind]
    result = run_cli("train", path, "--task", "copy", "--out", tmp_path / "new", "--quiet")
    message = " ".join(result.stderr.split())
    assert result.code == 1 and "train starts from a spec file or an imported model" in message, message
    assert (f"--resume {path}" if kind == "run" else f"blockgraph train {path / 'spec.yaml'}") in message
