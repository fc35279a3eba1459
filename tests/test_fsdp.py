"""FSDP2 (--strategy fsdp): 2 CPU processes (gloo) follow the one-process run with about half the memory each,
their sharded checkpoint resumes on 1 or 2 processes alike and consolidates into the trained model, and a rank
killed mid-checkpoint leaves the previous checkpoint whole."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import SPECS

from blockgraph.builder import sharding
from blockgraph.trainer import batching, checkpoint, sharded
from blockgraph.trainer.distributed import free_port
from blockgraph.trainer.loop import TrainConfig, train
from blockgraph.trainer.roles import ModelIO, Roles

torch.set_num_threads(1)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

SETTINGS = {
    "spec": str(SPECS / "transformer.yaml"),
    "overrides": {"d_model": 16, "heads": 2, "enc_layers": 2, "dec_layers": 2, "d_ff": 32, "dropout": 0.0},
    "task": "reverse",
    "task_options": {"symbols": 6, "min_len": 2, "max_len": 5, "train": 48, "valid": 8},
    "batch_size": 16,
    "epochs": 2,
    "max_steps": 5,
    "lr": 2e-3,
    "warmup": 4,
    "seed": 3,
    "bleu_sentences": 0,
}
# softmax ignores a shift shared by all keys: the key biases' gradients are rounding noise, which Adam turns
# into steps of the learning rate's size, differently in 1 and 2 processes (see tests/test_ddp.py)
NOISE = "w_k.bias"


def _local_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """The bytes this process holds of the parameters and of the optimizer state: its shards only, as measured
    (what builder.sharding estimates)."""

    def size(tensor: torch.Tensor) -> int:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        return local.numel() * local.element_size()

    parameters = sum(size(p) for p in model.parameters())
    state = sum(size(v) for entries in optimizer.state.values() for v in entries.values() if torch.is_tensor(v))
    return parameters, state


def _worker(rank: int, world: int, port: int, folder: str, changes: dict, resume: str | None, kill_at: int) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})  # fmt: skip
    torch.set_num_threads(1)
    if kill_at and rank == 1:  # a kill of this rank in the middle of its kill_at-th checkpoint write
        import torch.distributed.checkpoint as dcp

        calls, save = [0], dcp.save

        def dying(*args, **kwargs):
            calls[0] += 1
            if calls[0] == kill_at:
                os._exit(9)
            return save(*args, **kwargs)

        dcp.save = dying
    config = TrainConfig(**changes) if resume else TrainConfig(**{**SETTINGS, **changes})
    result = train(config, None if resume else os.path.join(folder, "run"), resume=resume, quiet=True)
    params, state = _local_bytes(result.model, result.optimizer)
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as handle:
        json.dump({"history": result.history, "params": params, "state": state}, handle)


def _spawn(folder, changes: dict, *, resume=None, kill_at: int = 0) -> list[dict]:
    mp.spawn(_worker, args=(2, free_port(), str(folder), changes, resume, kill_at), nprocs=2, join=True)
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(2)]


def _close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        if not name.endswith(NOISE):
            torch.testing.assert_close(got[name], tensor, atol=1e-5, rtol=0, msg=name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-process FSDP run and the one-process run of the same global batches."""
    folder = tmp_path_factory.mktemp("fsdp")
    ranks = _spawn(folder, {"strategy": "fsdp"})
    single = train(TrainConfig(**SETTINGS), folder / "one", quiet=True)
    return folder, ranks, single


def test_two_sharded_processes_follow_one_with_half_the_memory_each(runs, tmp_path):
    folder, ranks, single = runs
    for fsdp, one in zip(ranks[0]["history"], single.history, strict=True):
        assert fsdp["train_loss"] == pytest.approx(one["train_loss"], abs=1e-5)
        assert fsdp["valid_loss"] == pytest.approx(one["valid_loss"], abs=1e-5)
    whole = sum(_local_bytes(single.model, single.optimizer))
    for rank in ranks:
        assert rank["params"] + rank["state"] <= 0.6 * whole, (rank, whole)
    # what `inspect --ranks 2 --strategy fsdp` says is what the processes held
    expected, ddp = sharding.per_rank(single.model, 2, "fsdp"), sharding.per_rank(single.model, 2, "ddp")
    assert (ranks[0]["params"], ranks[0]["state"]) == (expected.parameters, expected.optimizer)
    assert ddp.parameters + ddp.optimizer == whole

    merged = sharded.consolidate(folder / "run", tmp_path / "merged")
    saved = checkpoint.load(merged)
    _close(saved.model.state_dict(), single.model.state_dict())
    batch = batching.collate(single.corpus.valid)
    io = ModelIO(Roles(**saved.info["roles"]))
    with torch.no_grad():
        ours = io(saved.model.eval(), batch.tgt_in, batch.src, batch.src_pad, batch.tgt_pad)
        reference = io(single.model.eval(), batch.tgt_in, batch.src, batch.src_pad, batch.tgt_pad)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    assert saved.info["config"]["strategy"] == "ddp"  # an ordinary checkpoint resumes data-parallel


def test_a_sharded_checkpoint_resumes_on_one_or_two_processes_alike(runs, tmp_path):
    folder, _, _ = runs
    for name in ("one", "two"):
        shutil.copytree(folder / "run", tmp_path / name)
    once = train(TrainConfig(max_steps=6), resume=tmp_path / "one", quiet=True)
    (twice, _) = _spawn(tmp_path, {"max_steps": 6}, resume=str(tmp_path / "two"))
    assert once.step == 6 and once.history[-1]["step"] == twice["history"][-1]["step"] == 6
    assert once.history[-1]["train_loss"] == pytest.approx(twice["history"][-1]["train_loss"], abs=1e-5)
    one = sharded.consolidate(tmp_path / "one", tmp_path / "merged-one")
    two = sharded.consolidate(tmp_path / "two", tmp_path / "merged-two")
    _close(checkpoint.load(one).model.state_dict(), checkpoint.load(two).model.state_dict())


def test_a_rank_killed_mid_checkpoint_leaves_the_previous_one(tmp_path):
    with pytest.raises(mp.ProcessExitedException):
        _spawn(tmp_path, {"strategy": "fsdp", "save_every": 1, "max_steps": 3}, kill_at=3)
    saved = checkpoint.load(tmp_path / "run", sharded_ok=True)
    assert saved.sharded and saved.info["step"] == 2
    merged = checkpoint.load(sharded.consolidate(tmp_path / "run", tmp_path / "merged"))
    assert merged.info["step"] == 2


def test_inspect_shows_what_each_process_would_hold(runs, run_cli):
    """The per-process figures of `inspect --ranks 2 --strategy fsdp` for the spec the 2 processes trained."""
    _, ranks, _ = runs
    sets = [f"{name}={value}" for name, value in SETTINGS["overrides"].items()]
    dims = ["--dim", "batch=2", "--dim", "src_len=5", "--dim", "tgt_len=5"]
    args = ["inspect", SETTINGS["spec"], *[a for s in sets for a in ("--set", s)], *dims, "--ranks", "2"]
    extra = ["--set", "src_vocab=10", "--set", "tgt_vocab=10"]  # the task's 6 symbols and the 4 specials
    result = run_cli(*args, *extra, "--strategy", "fsdp", "--format", "json")
    assert result.code == 0, result.stderr
    shown = json.loads(result.stdout)["per_process"]
    assert shown["strategy"] == "fsdp" and shown["parameters_bytes"] == ranks[0]["params"]
    assert shown["optimizer_bytes"] == ranks[0]["state"]
    table = run_cli(*args, *extra, "--strategy", "fsdp", env={"COLUMNS": "100"})
    assert table.code == 0 and "per process, 2 processes" in table.stdout and "fsdp" in table.stdout


def test_sharding_options_need_the_fsdp_strategy(tmp_path, run_cli):
    args = ("train", SPECS / "transformer.yaml", "--task", "copy", "--checkpoint-activations", "--out", tmp_path)
    result = run_cli(*args)
    assert result.code == 1 and "--checkpoint-activations applies to --strategy fsdp" in result.stderr, result.stderr


def test_a_sharded_checkpoint_points_translate_to_consolidate(runs, run_cli):
    folder, _, _ = runs
    result = run_cli("translate", folder / "run", "1 2 3")
    assert result.code == 1 and "blockgraph consolidate" in result.stderr and "Traceback" not in result.stderr


def test_recomputed_activations_change_nothing_and_bfloat16_stays_close(tmp_path):
    """One process under fsdp: with --checkpoint-activations every repeated layer recomputes its forward in the
    backward pass (registered with torch's checkpoint) and the run is the same; under --precision bf16-mixed,
    bfloat16 parameters (FSDP's policy, no autocast) follow the float32 run to bfloat16's precision, the sharded
    parameters and Adam's state float32."""
    from torch.distributed._composable.contract import _get_registry

    plain = train(TrainConfig(**{**SETTINGS, "max_steps": 3}, strategy="fsdp"), quiet=True)
    recomputed = train(
        TrainConfig(**{**SETTINGS, "max_steps": 3}, strategy="fsdp", checkpoint_activations=True), quiet=True
    )
    layers = [m for m in recomputed.model.modules() if isinstance(m, torch.nn.ModuleList)]
    assert layers and all("checkpoint" in (_get_registry(layer) or {}) for stack in layers for layer in stack)
    for a, b in zip(plain.history, recomputed.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
    half = train(TrainConfig(**{**SETTINGS, "max_steps": 3}, strategy="fsdp", precision="bf16-mixed"), quiet=True)
    for a, b in zip(plain.history, half.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=2e-2)
        assert a["train_loss"] != b["train_loss"]  # it did compute in bfloat16
    half.model.reshard()  # evaluation's forward left the root's parameters gathered, in bfloat16
    assert {p.dtype for p in half.model.parameters()} == {torch.float32}
    moments = [v for state in half.optimizer.state.values() for v in state.values() if v.is_floating_point()]
    assert moments and {v.dtype for v in moments} == {torch.float32}


GPT = {
    "spec": str(SPECS / "gpt_decoder.yaml"),
    "overrides": {"d_model": 16, "heads": 2, "layers": 3, "d_ff": 32, "max_len": 32, "dropout": 0.0},
    "max_steps": 3,
    "batch_size": 8,
    "lr": 2e-3,
    "warmup": 2,
    "seed": 1,
    "valid_fraction": 0.0,
}


def test_repeated_sub_graphs_are_units_and_recompute_in_the_backward(tmp_path):
    """A GPT's layers are sub-graph copies (no forward of their own): each copy's blocks are one unit, and
    with --checkpoint-activations each block runs its forward twice a step, the second time in backward."""
    lines = [" ".join(f"w{(i * 7 + j) % 11}" for j in range(3 + i % 5)) for i in range(24)]
    (tmp_path / "lm.txt").write_text("\n".join(lines) + "\n")
    settings = {**GPT, "data": str(tmp_path / "lm.txt")}
    plain = train(TrainConfig(**settings), quiet=True)
    shard = train(TrainConfig(**settings, strategy="fsdp"), quiet=True)
    for a, b in zip(plain.history, shard.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
    groups = sharded.units(shard.model)
    assert len(groups) == 3 and all(len(group) > 1 for group in groups)  # 3 layers, several blocks each

    assert _block_forwards(settings, checkpoint_activations=False) == 1
    assert _block_forwards(settings, checkpoint_activations=True) == 2


def _block_forwards(settings: dict, **options) -> int:
    """How many times the first layer's first block runs in one training step (one batch)."""
    from blockgraph.trainer import loop

    calls, original = [], loop.initialise

    def counted(model):  # after the model is built, before it is sharded
        original(model)
        model.decoder[0].ln1.register_forward_pre_hook(lambda module, args: calls.append(1))

    loop.initialise = counted
    try:
        train(TrainConfig(**{**settings, "max_steps": 1}, strategy="fsdp", **options), quiet=True)
    finally:
        loop.initialise = original
    return len(calls)


def test_a_mixture_of_experts_trains_on_two_sharded_processes_as_on_one(tmp_path):
    """Mixtral's spec, small (4 experts, 2 per token): 2 FSDP processes give the one-process losses, the
    load-balancing loss included (its counts summed over the processes: the global batch's), and hold the
    expert weights `inspect --ranks 2 --strategy fsdp` counts."""
    lines = [" ".join(f"w{(i * 7 + j * 3) % 13}" for j in range(2 + i % 6)) for i in range(24)]
    (tmp_path / "lm.txt").write_text("\n".join(lines) + "\n")
    sizes = {"d_model": 16, "heads": 2, "kv_heads": 1, "d_ff": 16, "experts": 4, "top_k": 2, "layers": 2}
    settings = {
        "spec": str(SPECS / "mixtral.yaml"), "overrides": {**sizes, "aux_weight": 0.5}, "task": None,
        "data": str(tmp_path / "lm.txt"), "valid_fraction": 0.0, "batch_size": 8, "max_steps": 4, "seed": 1,
    }  # fmt: skip
    ranks = _spawn(tmp_path, {**settings, "strategy": "fsdp"})
    single = train(TrainConfig(**{**SETTINGS, **settings}), tmp_path / "one", quiet=True)
    assert single.history and all(h["train_loss_aux"] > 0.5 for h in single.history)  # about 1 per layer
    for fsdp, one in zip(ranks[0]["history"], single.history, strict=True):
        assert fsdp["train_loss"] == pytest.approx(one["train_loss"], abs=1e-5)
        assert fsdp["train_loss_aux"] == pytest.approx(one["train_loss_aux"], abs=1e-6)
    expected = sharding.per_rank(single.model, 2, "fsdp")
    assert (ranks[0]["params"], ranks[0]["state"]) == (expected.parameters, expected.optimizer)
    experts = [name for name, _ in single.model.named_parameters() if ".experts." in name]
    assert len(experts) == 2 * 4 * 3  # layers × experts × (w_1, w_3, w_2), each sharded on its own
