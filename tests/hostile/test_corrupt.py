"""Class 5: corrupt or foreign checkpoints and saved models are clean errors that name the file and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from harness import assert_clean, bounded, tiny_spec
from safetensors.torch import load_file, save_file

from blockgraph import builder

pytest_plugins = ("harness",)


def _export(saved: Path, tmp_path: Path, case: str):
    return bounded(case, "export", saved, "--format", "exported-program", "--out", tmp_path / "m.pt2")


def _tamper_weights(saved: Path, change) -> None:
    path = saved / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda t: t.__setitem__("embed.lut.weight", t["embed.lut.weight"].long()), "I64 in the file, float32"),
        (lambda t: t.__setitem__("embed.lut.weight", t["embed.lut.weight"] > 0), "BOOL in the file, float32"),
        (lambda t: t.__setitem__("embed.lut.weight", t["embed.lut.weight"].int()), "I32 in the file, float32"),
        (lambda t: t.__setitem__("embed.lut.weight", torch.zeros(3, 3)), "embed.lut.weight: [3, 3] in the weights"),
        (lambda t: t.pop("generator.proj.bias"), "lacks 1 tensor(s) the spec has: generator.proj.bias"),
        (lambda t: t.__setitem__("extra", torch.zeros(1)), "has 1 tensor(s) the spec has not: extra"),
    ],
)
def test_weights_of_the_wrong_kind(saved_model, tmp_path, change, fragment):
    _tamper_weights(saved_model, change)
    assert_clean(_export(saved_model, tmp_path, "weights-kind"), 1, "model.safetensors", fragment)


def test_a_float16_weight_is_converted_to_the_models_dtype(saved_model, tmp_path):
    _tamper_weights(saved_model, lambda t: t.__setitem__("embed.lut.weight", t["embed.lut.weight"].half()))
    assert builder.load(saved_model).embed.lut.weight.dtype == torch.float32
    assert_clean(_export(saved_model, tmp_path, "weights-half"), 0)


def test_weights_of_another_spec(saved_model, tmp_path):
    other = builder.build(tiny_spec(tmp_path / "other", replace={"d_model: 8": "d_model: 12"}))
    builder.save(other, tmp_path / "other_model")
    (saved_model / "model.safetensors").write_bytes((tmp_path / "other_model" / "model.safetensors").read_bytes())
    assert_clean(_export(saved_model, tmp_path, "weights-other-spec"), 1, "differ in shape")


@pytest.mark.parametrize("cut", [0.5, 0.99])
def test_truncated_weights(saved_model, tmp_path, cut):
    path = saved_model / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    assert_clean(_export(saved_model, tmp_path, f"weights-truncated-{cut}"), 1, "model.safetensors")


@pytest.mark.parametrize("garbage", [b"\x00" * 64, b"PK\x03\x04 not safetensors" * 10, b"\xff" * 8 + b"{}"])
def test_garbage_weights(saved_model, tmp_path, garbage):
    (saved_model / "model.safetensors").write_bytes(garbage)
    assert_clean(_export(saved_model, tmp_path, "weights-garbage"), 1, "model.safetensors")


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    result = change(data)
    data = data if result is None else result
    path.write_text(json.dumps(data), encoding="utf-8")


TRAINER_CHANGES = {
    "a list": (lambda d: [1], "field (top level)"),
    "no roles": (lambda d: d.pop("roles") and None, "field roles"),
    "an extra role": (lambda d: d["roles"].__setitem__("extra", "x"), "field roles"),
    "a missing input": (lambda d: d["roles"].__setitem__("src", "nope"), "field roles"),
    "classify on seq2seq": (lambda d: d["roles"].__setitem__("kind", "classify"), "field roles"),
    "step not a number": (lambda d: d.__setitem__("step", "five"), "field step"),
    "no config": (lambda d: d.pop("config") and None, "field config"),
    "optimizer null": (lambda d: d.__setitem__("optimizer", None), "field optimizer"),
    "bool version": (lambda d: d.__setitem__("format_version", True), "field format_version"),
    "params a number": (lambda d: d["optimizer"]["param_groups"][0].__setitem__("params", 5), "field optimizer"),
    "eps a string": (lambda d: d["optimizer"]["param_groups"][0].__setitem__("eps", "x"), "field optimizer"),
    "one beta": (lambda d: d["optimizer"]["param_groups"][0].__setitem__("betas", [0.9]), "field optimizer"),
    "newer version": (lambda d: d.__setitem__("format_version", 99), "newer than this blockgraph"),
}


@pytest.mark.parametrize("case", TRAINER_CHANGES)
def test_a_malformed_trainer_json(run_dir, case):
    change, fragment = TRAINER_CHANGES[case]
    _edit_json(run_dir / "checkpoint" / "trainer.json", change)
    for command in (("translate", run_dir, "1 2"), ("train", "--resume", run_dir, "--max-steps", "3", "--quiet")):
        assert_clean(bounded(f"trainer.json {case}", *command), 1, "trainer.json", fragment)


VOCAB_CHANGES = {
    "a list": (lambda d: [1], "field (top level)"),
    "empty": (lambda d: {}, "field tgt"),
    "tokens a number": (lambda d: d["tgt"].__setitem__("tokens", 5), "field tgt.tokens"),
    "no specials": (lambda d: d["tgt"].__setitem__("tokens", ["a", "b", "c", "d", "e"]), "field tgt.tokens"),
    "tokenizer a number": (lambda d: d["src"].__setitem__("tokenizer", 7), "field src.tokenizer"),
}


@pytest.mark.parametrize("case", VOCAB_CHANGES)
def test_a_malformed_vocab_json(run_dir, case):
    change, fragment = VOCAB_CHANGES[case]
    _edit_json(run_dir / "checkpoint" / "vocab.json", change)
    assert_clean(bounded(f"vocab.json {case}", "translate", run_dir, "1 2"), 1, "vocab.json", fragment)


def _tamper_state(run: Path, change) -> None:
    path = run / "checkpoint" / "state.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def _first_moment(tensors: dict) -> str:
    return next(k for k in tensors if k.endswith("exp_avg"))


STATE_CHANGES = {
    "moment of the wrong shape": lambda t: t.__setitem__(_first_moment(t), torch.zeros(3)),
    "moment of ints": lambda t: t.__setitem__(_first_moment(t), t[_first_moment(t)].long()),
    "a tensor of no parameter": lambda t: t.__setitem__("optimizer.x.exp_avg", torch.zeros(1)),
    "a parameter beyond the model": lambda t: t.__setitem__("optimizer.999.exp_avg", torch.zeros(1)),
    "a name without a field": lambda t: t.__setitem__("optimizer.x", torch.zeros(1)),
    "a step of three numbers": lambda t: t.__setitem__("optimizer.0.step", torch.zeros(3)),
    "a field Adam has not": lambda t: t.__setitem__("optimizer.0.momentum_buffer", t["optimizer.0.step"].clone()),
    "a step without moments": lambda t: [t.pop(k) for k in list(t) if k.startswith("optimizer.0.exp_avg")],
}


@pytest.mark.parametrize("case", STATE_CHANGES)
def test_foreign_optimizer_state(run_dir, case):
    _tamper_state(run_dir, STATE_CHANGES[case])
    outcome = bounded(f"state {case}", "train", "--resume", run_dir, "--max-steps", "3", "--quiet")
    assert_clean(outcome, 1, "state.safetensors", "are not Adam's state")


@pytest.mark.parametrize("case", ["duplicated group", "a parameter twice", "a group too few"])
def test_optimizer_groups_that_do_not_list_the_parameters(run_dir, case):
    def change(data):
        groups = data["optimizer"]["param_groups"]
        if case == "duplicated group":
            groups.append(dict(groups[0]))
        elif case == "a parameter twice":
            groups[0]["params"] = [0, *groups[0]["params"][:-1]]
        else:
            groups[0]["params"] = groups[0]["params"][:-1]

    _edit_json(run_dir / "checkpoint" / "trainer.json", change)
    outcome = bounded(f"optimizer {case}", "train", "--resume", run_dir, "--max-steps", "3", "--quiet")
    assert_clean(outcome, 1, "field optimizer.param_groups")


def test_a_corrupt_random_state_is_not_restored(run_dir):
    _tamper_state(run_dir, lambda t: t.__setitem__("rng.cpu.0", torch.zeros(7, dtype=torch.float32)))
    outcome = bounded("state rng", "train", "--resume", run_dir, "--max-steps", "3", "--quiet")
    assert_clean(outcome, 0)


@pytest.mark.parametrize("cut", [10, 1000])
def test_truncated_optimizer_state(run_dir, cut):
    path = run_dir / "checkpoint" / "state.safetensors"
    path.write_bytes(path.read_bytes()[:cut])
    for command in (("translate", run_dir, "1 2"), ("train", "--resume", run_dir, "--max-steps", "3", "--quiet")):
        assert_clean(bounded(f"state truncated {cut}", *command), 1, "state.safetensors")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[", "not valid JSON"),
        ('{"format": "blockgraph-model", "format_version": "1"}', "field format_version"),
        ('{"format": "other", "format_version": 1}', "not a blockgraph model manifest"),
        ('{"format": "blockgraph-model", "format_version": 1, "plugins": 3}', "field plugins"),
    ],
)
def test_a_malformed_manifest(saved_model, tmp_path, text, fragment):
    (saved_model / "blockgraph.json").write_text(text)
    assert_clean(_export(saved_model, tmp_path, "manifest"), 1, "blockgraph.json", fragment)
