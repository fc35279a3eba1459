"""Classifier specs train on label<TAB>text lines; user tokenizers are named as MODULE:FUNCTION."""

from __future__ import annotations

import json
import random
import sys

import pytest
import torch
from conftest import SPECS

from blockgraph.common.errors import CheckpointError, DataError, SpecError
from blockgraph.trainer import checkpoint
from blockgraph.trainer.commands import classify
from blockgraph.trainer.loop import TrainConfig, train
from blockgraph.trainer.roles import ModelIO, Roles

torch.set_num_threads(1)

CLASSIFIER = str(SPECS / "encoder_classifier.yaml")
SMALL = {"d_model": 32, "heads": 2, "layers": 1, "d_ff": 64, "dropout": 0.0, "max_len": 32}
GOOD = ["great", "lovely", "superb", "fine", "nice"]
BAD = ["awful", "poor", "dreadful", "nasty", "grim"]
FILLER = ["the", "a", "day", "film", "food", "was", "very", "and", "room", "it", "so", "our"]


def _labelled(path, count=240, seed=0):
    """A separable set: each line holds one cue word of its label among filler words."""
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        label = rng.choice(["pos", "neg"])
        words = rng.choices(FILLER, k=rng.randint(2, 6))
        words.insert(rng.randint(0, len(words)), rng.choice(GOOD if label == "pos" else BAD))
        lines.append(f"{label}\t{' '.join(words)}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def _config(data, **changes) -> TrainConfig:
    settings = {
        "spec": CLASSIFIER,
        "overrides": SMALL,
        "data": data,
        "epochs": 4,
        "batch_size": 16,
        "lr": 3e-3,
        "warmup": 20,
        "label_smoothing": 0.0,
        "valid_fraction": 0.2,
    }
    settings.update(changes)
    return TrainConfig(**settings)


def test_classifier_learns_labels_and_saves_them(tmp_path):
    """Chance is 50%; the cue word makes the set separable: ≥ 90% held-out accuracy after 4 epochs (60 steps)."""
    result = train(_config(_labelled(tmp_path / "train.tsv")), tmp_path / "run", quiet=True)
    assert result.roles.kind == "classify"
    assert result.corpus.labels == ["neg", "pos"]
    last = result.history[-1]
    assert last["valid_acc"] >= 0.9, result.history
    assert "valid_ppl" not in last and "bleu" not in last
    saved = checkpoint.load(tmp_path / "run")
    assert saved.labels == ["neg", "pos"]
    assert saved.model.typed_graph.graph.vars["classes"] == 2  # set from the data
    model, io = saved.model.eval(), ModelIO(Roles(**saved.info["roles"]))
    assert classify(model, io, saved.tgt_vocab, saved.labels, "the film was superb")[0] == "pos"
    label, probability = classify(model, io, saved.tgt_vocab, saved.labels, "the food was dreadful")
    assert label == "neg" and 0.5 < probability <= 1.0


def test_classifier_resume_is_exact(tmp_path):
    data = _labelled(tmp_path / "train.tsv", count=64)
    straight = train(_config(data, epochs=2, overrides={**SMALL, "dropout": 0.1}), tmp_path / "a", quiet=True)
    train(_config(data, epochs=1, overrides={**SMALL, "dropout": 0.1}), tmp_path / "b", quiet=True)
    resumed = train(_config(data, epochs=2), resume=tmp_path / "b", quiet=True)
    assert resumed.corpus.labels == straight.corpus.labels
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_bad_labelled_lines_are_reported_or_skipped(tmp_path):
    path = tmp_path / "bad.tsv"
    good = "\n".join(f"{'pos' if i % 2 else 'neg'}\tline {i}" for i in range(8))
    path.write_text(f"{good}\nno tab here\n\tno label\npos\t\n", encoding="utf-8")
    with pytest.raises(DataError) as caught:
        train(_config(str(path), epochs=1), quiet=True)
    messages = [(p.message, p.location.line) for p in caught.value.problems]
    assert messages == [
        ("line 9: no tab between the label and the text", 9),
        ("line 10: empty label", 10),
        ("line 11: empty text", 11),
    ]
    result = train(_config(str(path), epochs=1, skip_bad_lines=True), quiet=True)
    assert any("skipped 3 bad line(s)" in note for note in result.corpus.notes)


def test_class_count_mismatch_is_a_clear_error(tmp_path):
    path = tmp_path / "three.tsv"
    path.write_text("\n".join(f"{'abc'[i % 3]}\tword {i}" for i in range(12)) + "\n", encoding="utf-8")
    with pytest.raises(SpecError, match="output has 2 classes, the training data 3 labels"):
        train(_config(str(path), epochs=1, overrides={**SMALL, "classes": 2}), quiet=True)


def test_user_tokenizer_is_used_and_recorded(tmp_path, monkeypatch):
    (tmp_path / "mytok.py").write_text(
        "CALLS = []\n\ndef split_dashes(text):\n    CALLS.append(text)\n    return text.replace('-', ' ').split()\n",
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "dash.tsv"
    path.write_text("\n".join(f"{'pos' if i % 2 else 'neg'}\tw{i}-{'up' if i % 2 else 'down'}" for i in range(20)))
    result = train(_config(str(path), epochs=1, tgt_tokenizer="mytok:split_dashes"), tmp_path / "run", quiet=True)
    assert sys.modules["mytok"].CALLS
    assert "up" in result.corpus.tgt_vocab.index and "down" in result.corpus.tgt_vocab.index
    stored = json.loads((tmp_path / "run" / "checkpoint" / "vocab.json").read_text(encoding="utf-8"))
    assert stored["tgt"]["tokenizer"] == "mytok:split_dashes"
    del sys.modules["mytok"]
    with pytest.raises(CheckpointError) as refused:  # a checkpoint never imports the code it names
        checkpoint.load(tmp_path / "run")
    assert "mytok" not in sys.modules
    assert "--tokenizer mytok:split_dashes" in (refused.value.problems[0].hint or "")
    saved = checkpoint.load(tmp_path / "run", tokenizers=(None, "mytok:split_dashes"))
    assert saved.tgt_vocab.encode_text("w3-up")[-1] == saved.tgt_vocab.index["up"]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("no_such_module_xyz:split", "no module named 'no_such_module_xyz'"),
        ("json:no_such_function", "module json has no 'no_such_function'"),
        ("json:", "is not MODULE:FUNCTION"),
        ("letters", "unknown tokenizer 'letters'"),
    ],
)
def test_bad_tokenizer_name_is_a_clean_error(tmp_path, name, message):
    data = _labelled(tmp_path / "train.tsv", count=16)
    with pytest.raises(DataError, match=message):
        train(_config(data, epochs=1, tgt_tokenizer=name), quiet=True)


def test_texts_that_fill_the_positions_exactly_are_kept_and_nothing_is_said(tmp_path):
    """A classifier's text has no bos: a text as long as the position table fits, one token more does not."""
    path = tmp_path / "train.tsv"
    lines = [f"{'pos' if i % 2 else 'neg'}\t{' '.join(['good' if i % 2 else 'bad'] * 8)}" for i in range(20)]
    path.write_text("\n".join([*lines, "pos\t" + " ".join(["good"] * 9)]) + "\n", encoding="utf-8")
    config = _config(str(path), overrides={**SMALL, "max_len": 8}, epochs=1, max_steps=1, valid_fraction=0.2)
    result = train(config, quiet=True)
    assert len(result.corpus.train) + len(result.corpus.valid) == 20
    assert result.corpus.notes == ["left out 1 example(s) longer than the model's positions (8 target)"]
