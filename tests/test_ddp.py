"""Data-parallel training: 2 CPU processes (gloo, loopback) follow the one-process run of the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import ROOT, SPECS
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from blockgraph.cli import app
from blockgraph.trainer import checkpoint
from blockgraph.trainer.distributed import free_port
from blockgraph.trainer.loop import TrainConfig, train

torch.set_num_threads(1)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _config(**changes) -> TrainConfig:
    settings = {
        "spec": str(SPECS / "rnn_seq2seq_attention.yaml"),
        "overrides": {"emb": 16, "hidden": 16, "layers": 1, "dropout": 0.0},
        "task": "reverse",
        "task_options": {"symbols": 6, "min_len": 2, "max_len": 6, "train": 65, "valid": 8},
        "batch_size": 16,  # 5 global batches an epoch, the last of 1 example: rank 1 gets none
        "epochs": 2,
        "max_steps": 8,
        "lr": 1e-2,
        "warmup": 4,
        "seed": 5,
        "bleu_sentences": 0,
    }
    return TrainConfig(**{**settings, **changes})


def _worker(rank: int, world: int, port: int, directory: str, changes: dict) -> None:
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(world)}
    )
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    result = train(_config(**changes), os.path.join(directory, "run"), quiet=True)
    save_file({k: v.contiguous() for k, v in result.model.state_dict().items()}, f"{directory}/rank{rank}.safetensors")
    with open(f"{directory}/history{rank}.json", "w") as handle:
        json.dump(result.history, handle)
    # everything is written: leave without the interpreter's teardown, where freeing the DDP wrapper can deadlock
    # with a gloo thread that waits for the GIL (torch's race, seen under load), which would hang the test run
    os._exit(0)


def test_two_processes_match_one(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path), {}), nprocs=2, join=True)
    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "the ranks' parameters differ"

    single = train(_config(), tmp_path / "single", quiet=True)
    expected = single.model.state_dict()
    assert single.step == 8
    for name, tensor in expected.items():
        torch.testing.assert_close(rank0[name], tensor, atol=1e-5, rtol=0, msg=name)
    history = json.loads((tmp_path / "history0.json").read_text())
    for ddp, one in zip(history, single.history, strict=True):
        assert ddp["train_loss"] == pytest.approx(one["train_loss"], abs=1e-5)
        assert ddp["valid_loss"] == pytest.approx(one["valid_loss"], abs=1e-5)
    # the checkpoint came from rank 0 alone, and it is the ranks' model
    saved = checkpoint.load(tmp_path / "run")
    assert saved.info["world"] == 2 and {"rng.cpu.0", "rng.cpu.1"} <= saved.tensors.keys()
    assert all(torch.equal(saved.model.state_dict()[k], rank0[k]) for k in rank0)


def test_two_processes_train_bf16_mixed_as_one(tmp_path):
    """Under --precision bf16-mixed each rank computes its shard's forward in bfloat16 (autocast around DDP): the
    ranks keep the same float32 weights, and their losses follow the one-process bf16-mixed run to bfloat16's
    rounding of a different batch split (within 1e-2; about 1e-3 measured)."""
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path), {"precision": "bf16-mixed"}), nprocs=2, join=True)
    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "the ranks' parameters differ"
    assert {tensor.dtype for tensor in rank0.values()} == {torch.float32}
    single = train(_config(precision="bf16-mixed"), quiet=True)
    history = json.loads((tmp_path / "history0.json").read_text())
    for ddp, one in zip(history, single.history, strict=True):
        assert ddp["train_loss"] == pytest.approx(one["train_loss"], abs=1e-2)
        assert ddp["valid_loss"] == pytest.approx(one["valid_loss"], abs=1e-2)
    assert checkpoint.load(tmp_path / "run").info["config"]["precision"] == "bf16-mixed"


def test_nproc_launches_the_processes(tmp_path):
    """`train --nproc 2` starts 2 processes; a Transformer follows the one-process loss curve.

    The attention's key-projection biases are left out of the weight comparison: softmax ignores a shift shared
    by all keys, so their gradient is zero up to rounding, and Adam (ε = 1e-9) turns that rounding noise, which
    differs between 1 and 2 processes, into steps of the size of the learning rate.
    """
    common = [
        "train", SPECS / "transformer.yaml", "--task", "reverse",
        "--task-options", "symbols=6,min_len=2,max_len=5,train=48,valid=8",
        "--set", "d_model=16", "--set", "heads=2", "--set", "enc_layers=1", "--set", "dec_layers=1",
        "--set", "d_ff=32", "--set", "dropout=0.0", "--batch-size", "16", "--epochs", "2",
        "--lr", "2e-3", "--warmup", "4", "--bleu-sentences", "0", "--quiet",
    ]  # fmt: skip
    command = [
        sys.executable,
        "-m",
        "blockgraph.cli",
        *map(str, common),
        "--out",
        str(tmp_path / "two"),
        "--nproc",
        "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    single = CliRunner().invoke(app, [*map(str, common), "--out", str(tmp_path / "one")])
    assert single.exit_code == 0, single.stderr
    two, one = checkpoint.load(tmp_path / "two"), checkpoint.load(tmp_path / "one")
    assert two.info["world"] == 2 and one.info["world"] == 1
    for a, b in zip(two.info["history"], one.info["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
    weights_two, weights_one = two.model.state_dict(), one.model.state_dict()
    for name, tensor in weights_one.items():
        if not name.endswith("w_k.bias"):
            torch.testing.assert_close(weights_two[name], tensor, atol=1e-5, rtol=0, msg=name)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [".lock", "checkpoint", "metrics.jsonl"]
