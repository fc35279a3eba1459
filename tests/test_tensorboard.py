"""`train --tensorboard`: TensorBoard's own reader gives back metrics.jsonl's values and the run's options; a resumed
run appends without a step twice; only the main process writes; a missing package is a clear error."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_reverse_config

from blockgraph.common.errors import UsageError
from blockgraph.trainer import batching, distributed, tensorboard
from blockgraph.trainer.config import TrainConfig
from blockgraph.trainer.loop import Run, Voice, train

pytest.importorskip("tensorboard", reason="the [tensorboard] extra is not installed")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

torch.set_num_threads(1)

CURVES = {
    "train/loss", "train/acc", "train/lr", "train/grad_norm", "train/tokens_per_s",
    "valid/loss", "valid/ppl", "valid/acc", "valid/bleu", "valid/chrf",
}  # fmt: skip


def _events(directory) -> EventAccumulator:
    events = EventAccumulator(str(directory))
    events.Reload()
    return events


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run of 1 epoch with --tensorboard, resumed to 2 epochs."""
    out = tmp_path_factory.mktemp("tb") / "run"
    train(tiny_reverse_config(epochs=1, tensorboard=True), out, quiet=True)
    train(TrainConfig(epochs=2), resume=out, quiet=True)
    return out


def test_the_events_give_the_metrics_of_each_epoch_once(run):
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in logged] == [1, 2]
    events = _events(run / tensorboard.DIRECTORY)
    assert set(events.Tags()["scalars"]) == CURVES
    steps = [record["step"] for record in logged]
    for key in logged[0].keys() - {"epoch", "step"}:
        drawn = events.Scalars(tensorboard.tag(key))
        assert [event.step for event in drawn] == steps, key  # the resumed run appended, nothing twice
        for event, record in zip(drawn, logged, strict=True):
            assert event.value == pytest.approx(record[key], rel=1e-6, abs=1e-12), key  # stored as float32
    assert all(record["grad_norm"] > 0 and record["lr"] > 0 for record in logged)


def test_the_options_are_the_hparams(run):
    events = _events(run / tensorboard.DIRECTORY)
    content = events.PluginTagToContent("hparams")
    start = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["overrides.d_model"].number_value == 16
    assert start.hparams["task"].string_value == "reverse"
    assert start.hparams["epochs"].number_value == 1  # the options the run started with, written once
    written = [
        value.tag
        for path in sorted((run / tensorboard.DIRECTORY).iterdir())
        for event in EventFileLoader(str(path)).Load()
        for value in event.summary.value
    ]
    assert written.count("_hparams_/session_start_info") == 1  # by the first writer, not again by the resumed run
    assert start.hparams["task_options.symbols"].number_value == 6
    experiment = HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {metric.name.tag for metric in experiment.metric_infos} == CURVES


def test_a_resumed_run_drops_what_was_logged_after_its_checkpoint(tmp_path):
    """A process stopped after logging steps 2 and 3 but checkpointing at 1: the resumed run's steps 2 and 3 replace
    them (TensorBoard's purge), each step drawn once."""
    config = TrainConfig(tensorboard=True)
    board = tensorboard.Board.open(config, tmp_path, main=True, step=0, resumed=False)
    assert board is not None
    for step in (1, 2, 3):
        board.log({"step": step, "train_loss": float(step)})
    board.close()
    board = tensorboard.Board.open(config, tmp_path, main=True, step=1, resumed=True)
    assert board is not None
    for step in (2, 3):
        board.log({"step": step, "train_loss": 10.0 * step})
    board.close()
    drawn = _events(tmp_path / tensorboard.DIRECTORY).Scalars("train/loss")
    assert [(event.step, event.value) for event in drawn] == [(1, 1.0), (2, 20.0), (3, 30.0)]
    tensorboard.clear(tmp_path)  # a new run in the directory starts afresh
    assert not any((tmp_path / tensorboard.DIRECTORY).iterdir())


def test_only_the_main_process_writes(tmp_path):
    config = TrainConfig(tensorboard=True)
    assert tensorboard.Board.open(config, tmp_path, main=False, step=0, resumed=False) is None
    assert tensorboard.Board.open(TrainConfig(), tmp_path, main=True, step=0, resumed=False) is None
    assert not (tmp_path / tensorboard.DIRECTORY).exists()


def test_a_missing_package_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed: importing it fails
    with pytest.raises(UsageError) as caught:
        train(tiny_reverse_config(tensorboard=True), tmp_path / "run", quiet=True)
    assert "pip install 'blockgraph[tensorboard]'" in (caught.value.problems[0].hint or "")
    assert not (tmp_path / "run").exists()  # refused before any work
    monkeypatch.undo()
    with pytest.raises(UsageError, match="give --out DIR"):
        train(tiny_reverse_config(tensorboard=True), quiet=True)


def test_the_gradient_norm_is_the_norm_of_the_steps_gradient():
    """The step's reported norm is the 2-norm of the gradient of the loss it minimises, computed here apart."""
    config = tiny_reverse_config(overrides={**tiny_reverse_config().overrides, "dropout": 0.0}, clip_norm=0.5)
    say = Voice(console=None, on=False)  # type: ignore[arg-type]
    stepped = Run.start(config, distributed.Context(), None, say)
    first = batching.plan(stepped.data.train, config.batch_size, seed=config.seed, epoch=0)[0]
    figures = stepped.train_step(first)

    fresh = Run.start(config, distributed.Context(), None, say)  # the same weights, from the seed
    batch = batching.collate([fresh.data.train[i] for i in first], fresh.data.specials)
    fresh.loss(batch, 1.0 / batch.tokens).objective.backward()
    grads = [p.grad.double() for p in fresh.model.parameters() if p.grad is not None]
    expected = math.sqrt(sum(float(grad.pow(2).sum()) for grad in grads))
    assert figures.grad_norm == pytest.approx(expected, rel=1e-5)
    assert expected > 0.5  # so the step clipped, after measuring: the norm is of the unclipped gradient


def _worker(rank: int, world: int, port: int, directory: str) -> None:
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(world)}
    )
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    train(tiny_reverse_config(max_steps=2, bleu_sentences=0, tensorboard=True), directory, quiet=True)
    os._exit(0)  # as tests/test_ddp.py's workers: no interpreter teardown racing a gloo thread


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_two_processes_write_one_event_file(tmp_path):
    mp.spawn(_worker, args=(2, distributed.free_port(), str(tmp_path / "run")), nprocs=2, join=True)
    files = list((tmp_path / "run" / tensorboard.DIRECTORY).iterdir())
    assert len(files) == 1  # rank 1 wrote none
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    drawn = _events(tmp_path / "run" / tensorboard.DIRECTORY).Scalars("train/grad_norm")
    assert [(event.step, event.value) for event in drawn] == [(2, pytest.approx(logged["grad_norm"], rel=1e-6))]
