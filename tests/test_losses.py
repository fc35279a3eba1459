"""Losses a spec declares (`roles: {loss: {aux: w}}`): the training objective adds each, times its weight, to the
cross-entropy; the figures are logged and survive a resume; mistakes are located in the spec."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import SPECS
from rich.console import Console

from blockgraph.common.errors import SpecError
from blockgraph.trainer import batching, checkpoint, distributed
from blockgraph.trainer.loop import Run, TrainConfig, Voice, train

torch.set_num_threads(1)

# a language model with a second output `aux`: a scalar (the first sequence's mean of a linear probe of its
# embeddings) made by existing blocks, so that its gradient reaches the probe and the embeddings only
AUX_SPEC = {
    "name": "aux-lm",
    "vars": {"vocab": 12, "emb": 8, "hidden": 8, "aux_weight": 0.5},
    "dims": {"batch": 2, "seq": 5},
    "inputs": {
        "tokens": {"dtype": "int64", "shape": ["batch", "seq"], "high": "${vocab}"},
        "pad": {"dtype": "bool", "shape": ["batch", "seq"], "optional": True},
    },
    "nodes": {
        "embed": {"type": "token_embedding", "params": {"vocab": "${vocab}", "dim": "${emb}"}, "in": "tokens"},
        "lstm": {
            "type": "lstm",
            "params": {"input_size": "${emb}", "hidden_size": "${hidden}", "layers": 1},
            "in": {"x": "embed", "mask": "pad"},
        },
        "generator": {"type": "generator", "params": {"d_model": "${hidden}", "vocab": "${vocab}"}, "in": "lstm.y"},
        "probe": {"type": "linear", "params": {"in_features": "${emb}", "out_features": 1}, "in": "embed"},
        "pooled": {"type": "mean_pool", "in": {"x": "probe", "mask": "pad"}},
        "first": {"type": "select", "params": {"dim": 1, "index": 0}, "in": "pooled"},
        "aux": {"type": "select", "params": {"dim": 0, "index": 0}, "in": "first"},
    },
    "outputs": {"log_probs": "generator", "aux": "aux"},
    "roles": {"loss": {"aux": "${aux_weight}"}},
}


def _config(tmp_path, weight: float | None = None, spec: dict | None = None, **changes) -> TrainConfig:
    path = tmp_path / "aux.yaml"
    path.write_text(yaml.safe_dump(spec or AUX_SPEC), encoding="utf-8")
    lines = [line.split("\t")[1] for line in (SPECS / "data" / "zh_en.tsv").read_text(encoding="utf-8").splitlines()]
    text = tmp_path / "en.txt"
    text.write_text("\n".join(lines[:48]) + "\n", encoding="utf-8")
    settings = {"epochs": 2, "batch_size": 8, "lr": 1e-2, "warmup": 4, "valid_fraction": 0.1, "seed": 5}
    overrides = {"aux_weight": weight} if weight is not None else {}
    return TrainConfig(spec=str(path), data=str(text), overrides=overrides, **{**settings, **changes})


def _run(config: TrainConfig) -> Run:
    return Run.start(config, distributed.setup("cpu"), None, Voice(Console(), on=False))


def test_the_objective_adds_the_weighted_output_and_its_gradient(tmp_path):
    """On the same weights and batch, objective(w) - objective(0) = w · aux, and the gradients differ by w · ∂aux:
    the probe, which only `aux` reads, learns from the declared loss alone."""
    weight = 0.75
    with_aux, without = _run(_config(tmp_path, weight)), _run(_config(tmp_path, 0.0))
    assert with_aux.roles.loss == {"aux": weight} and without.roles.loss == {"aux": 0.0}
    batch = batching.collate(with_aux.data.train[:8], with_aux.data.specials)
    scale = 1 / batch.tokens
    a, b = with_aux.loss(batch, scale), without.loss(batch, scale)
    aux = with_aux.model(tokens=batch.tgt_in, pad=batch.tgt_pad)["aux"]  # by hand: the model's own output
    assert aux.shape == () and torch.equal(a.outputs.losses["aux"], aux)
    assert torch.equal(a.nll, b.nll)
    assert torch.allclose(a.objective - b.objective, weight * aux, rtol=0, atol=1e-6)
    assert abs(float(weight * aux.detach())) > 1e-3  # the check above could not hold by a vanishing aux

    parameters = dict(with_aux.model.named_parameters())
    hand = dict(zip(parameters, torch.autograd.grad(aux, list(parameters.values()), allow_unused=True), strict=True))
    a.objective.backward()
    b.objective.backward()
    others = dict(without.model.named_parameters())
    for name, parameter in parameters.items():
        expected = weight * hand[name] if hand[name] is not None else torch.zeros_like(parameter)
        got = parameter.grad - (others[name].grad if others[name].grad is not None else 0.0)
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7), name
    probe = [name for name in parameters if name.startswith("probe.")]
    assert probe and all(parameters[name].grad.abs().sum() > 0 for name in probe)
    assert all(others[name].grad is None or not others[name].grad.any() for name in probe)


def test_declared_losses_are_logged_saved_and_resumed_exactly(tmp_path):
    """The epoch's mean of `aux` is in the history, metrics.jsonl and the epoch line; the checkpoint keeps the
    roles, and a run resumed midway ends with the weights and figures of the run that was not stopped."""
    full = train(_config(tmp_path), tmp_path / "full", quiet=True)
    assert [set(h) >= {"train_loss", "train_loss_aux"} for h in full.history] == [True, True]
    part = train(_config(tmp_path, max_steps=3), tmp_path / "part", quiet=True)
    assert part.step == 3
    saved = checkpoint.load(tmp_path / "part")
    assert saved.info["roles"]["loss"] == {"aux": 0.5} and set(saved.info["epoch_sums"]["outputs"]) == {"aux"}
    resumed = train(TrainConfig(max_steps=None), resume=tmp_path / "part", quiet=True)
    weights, expected = resumed.model.state_dict(), full.model.state_dict()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    figures = [(h["train_loss"], h["train_loss_aux"]) for h in full.history]
    assert [(h["train_loss"], h["train_loss_aux"]) for h in resumed.history[1:]] == figures
    logged = [json.loads(line) for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [h["train_loss_aux"] for h in logged[1:]] == [aux for _, aux in figures]


def test_a_zero_weight_trains_as_without_the_output(tmp_path):
    """Weight 0: the same weights as the spec with no declared loss (the probe never moves)."""
    plain = {**AUX_SPEC, "roles": {}}
    zero = train(_config(tmp_path, 0.0, max_steps=4), quiet=True)
    (tmp_path / "plain").mkdir()
    without = train(_config(tmp_path / "plain", spec=plain, max_steps=4), quiet=True)
    assert "train_loss_aux" in zero.history[0] and "train_loss_aux" not in without.history[0]
    weights, expected = zero.model.state_dict(), without.model.state_dict()
    assert all(torch.allclose(weights[k], expected[k], rtol=0, atol=1e-7) for k in expected)


@pytest.mark.parametrize(
    ("loss", "message"),
    [
        ({"auxx": 0.1}, r"roles: loss: 'auxx' is no output of the model \(its outputs: aux, log_probs, pooled\)"),
        ({"log_probs": 0.1}, "roles: loss: 'log_probs' is the output the model trains on"),
        ({"pooled": 0.1}, r"roles: loss: 'pooled' is \[batch, 1\] float32 from 'pooled': a loss term is a float"),
        ({"aux": float("inf")}, "finite number"),
        ({"aux": True}, "valid number"),
        ({"aux": "0.1"}, "valid number"),
    ],
)
def test_declared_loss_mistakes_are_located(tmp_path, loss, message):
    spec = {**AUX_SPEC, "outputs": {**AUX_SPEC["outputs"], "pooled": "pooled"}, "roles": {"loss": loss}}
    with pytest.raises(SpecError, match=message) as raised:
        train(_config(tmp_path, spec=spec), quiet=True)
    where = raised.value.problems[0].location
    assert where.file == str(tmp_path / "aux.yaml") and where.line is not None
    assert where.path[:2] == ("roles", "loss")
