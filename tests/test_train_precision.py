"""`train --precision`: bf16-mixed computes the forward in bfloat16 over float32 weights (one step is a hand-written
autocast step), checkpoints stay float32 and resume under another precision, 16-mixed scales its loss and is
refused off CUDA."""

from __future__ import annotations

import copy
import json

import torch
from conftest import SPECS, tiny_reverse_config
from rich.console import Console
from safetensors import safe_open
from torch.nn import functional

from blockgraph.trainer import batching, checkpoint, distributed, loop
from blockgraph.trainer.loop import TrainConfig, train

torch.set_num_threads(1)

TINY = [
    "--task", "reverse", "--task-options", "symbols=6,min_len=2,max_len=5,train=48,valid=8",
    "--set", "d_model=16", "--set", "heads=2", "--set", "enc_layers=1", "--set", "dec_layers=1", "--set", "d_ff=32",
    "--batch-size", "16", "--epochs", "10", "--lr", "2e-3", "--warmup", "4", "--bleu-sentences", "2",
]  # fmt: skip
# softmax ignores a shift shared by all keys: the key biases' gradients are rounding noise, which Adam's first
# step turns into ± the learning rate (see tests/test_ddp.py)
NOISE = "w_k.bias"


def _saved_dtypes(run) -> set[str]:
    """The dtypes of the floating tensors a checkpoint's files hold, as written (safetensors' names)."""
    found = set()
    for name in (f"{checkpoint.MODEL}/model.safetensors", checkpoint.STATE):
        with safe_open(run / checkpoint.NAME / name, "pt") as tensors:
            found |= {tensors.get_slice(key).get_dtype() for key in tensors.keys() if not key.startswith("rng.")}  # noqa: SIM118
    return found


def test_bf16_mixed_keeps_float32_weights_and_follows_the_float32_run(tmp_path):
    """6 steps (one epoch, dropout on, the same seed): the bf16-mixed run's training and held-out losses are within
    0.02 of the float32 run's (about 5e-4 measured), but not equal; its weights, Adam's moments and the saved
    tensors are float32."""
    full = train(tiny_reverse_config(epochs=1), tmp_path / "32", quiet=True)
    half = train(tiny_reverse_config(epochs=1, precision="bf16-mixed"), tmp_path / "bf16", quiet=True)
    assert half.step == full.step == 6
    for key in ("train_loss", "valid_loss"):
        assert abs(half.history[-1][key] - full.history[-1][key]) < 0.02, (half.history, full.history)
    assert half.history[-1]["train_loss"] != full.history[-1]["train_loss"]
    assert {p.dtype for p in half.model.parameters()} == {torch.float32}
    moments = [v for state in half.optimizer.state.values() for v in state.values() if v.is_floating_point()]
    assert moments and {v.dtype for v in moments} == {torch.float32}
    assert _saved_dtypes(tmp_path / "bf16") == _saved_dtypes(tmp_path / "32") == {"F32"}


def test_a_bf16_mixed_step_is_a_hand_written_autocast_step():
    """The loop's first step equals one written by hand on a copy of the same model: the forward under
    torch.autocast("cpu", bfloat16), the cross-entropy of the float32 log-probabilities, backward, Adam at the
    step's learning rate. The same step in float32 differs by far more than float32's rounding: autocast ran."""
    overrides = {"d_model": 16, "heads": 2, "enc_layers": 1, "dec_layers": 1, "d_ff": 32, "dropout": 0.0}
    config = tiny_reverse_config(precision="bf16-mixed", label_smoothing=0.0, overrides=overrides)
    run = loop.Run.start(config, distributed.Context(), None, loop.Voice(Console(), on=False))
    by_hand, in_float32 = copy.deepcopy(run.model), copy.deepcopy(run.model)
    indices = batching.plan(run.data.train, config.batch_size, seed=config.seed, epoch=0)[0]
    batch = batching.collate([run.data.train[i] for i in indices], run.data.specials)
    grads: dict[str, torch.Tensor] = {}
    step = run.optimizer.step

    def recording(*args, **kwargs):  # the loop's gradients, as its optimizer takes them
        grads.update({name: p.grad.clone() for name, p in run.model.named_parameters()})
        return step(*args, **kwargs)

    run.optimizer.step = recording
    run.model.train()
    figures = run.train_step(indices)
    lr = run.optimizer.param_groups[0]["lr"]

    def hand_step(model: torch.nn.Module, autocast: bool) -> tuple[float, dict[str, torch.Tensor]]:
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            log_probs = model(src=batch.src, tgt=batch.tgt_in, src_pad=batch.src_pad, tgt_pad=batch.tgt_pad)
        keep = ~batch.tgt_pad
        nll = functional.nll_loss(log_probs.float()[keep], batch.tgt_out[keep], reduction="sum")
        (nll / int(keep.sum())).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-9).step()
        return float(nll.detach()), grads

    loss, hand_grads = hand_step(by_hand, autocast=True)
    loss32, grads32 = hand_step(in_float32, autocast=False)

    def gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
        """The largest difference of a gradient, relative to the gradient's largest entry."""
        return max(float((a[n] - b[n]).abs().max() / b[n].abs().max()) for n in b if not n.endswith(NOISE))

    assert abs(figures.loss - loss) <= 1e-5 * loss
    assert gap(grads, hand_grads) < 1e-4
    assert abs(loss32 - loss) > 1e-4 * loss32 and gap(grads32, hand_grads) > 1e-3  # bfloat16 did compute
    updated, expected = run.model.state_dict(), by_hand.state_dict()
    for name, tensor in expected.items():
        if not name.endswith(NOISE):
            torch.testing.assert_close(updated[name], tensor, atol=1e-6, rtol=0, msg=name)
    assert {p.dtype for p in run.model.parameters()} == {torch.float32}


def test_a_run_resumes_under_another_precision(tmp_path, run_cli):
    """32 for 3 steps, resumed in bf16-mixed to 6, then in 32 to 9: the steps go on, the console says the precision
    once, the weights stay float32. A checkpoint from before --precision (FSDP's `dtype`) resumes in its
    precision; 16-mixed on the CPU is refused, resumed or not."""
    run = tmp_path / "run"
    first = run_cli("train", SPECS / "transformer.yaml", *TINY, "--max-steps", "3", "--out", run)
    assert first.code == 0, first.stderr
    assert first.stderr.count("precision 32") == 1
    for precision, steps in (("bf16-mixed", 6), ("32", 9)):
        resumed = run_cli("train", "--resume", run, "--precision", precision, "--max-steps", steps)
        assert resumed.code == 0, resumed.stderr
        assert "resuming" in resumed.stderr and resumed.stderr.count(f"precision {precision}") == 1
        assert "keeps the checkpoint's" not in resumed.stderr
        saved = checkpoint.load(run)
        assert saved.info["step"] == steps and saved.info["config"]["precision"] == precision
        assert {p.dtype for p in saved.model.parameters()} == {torch.float32}
        assert _saved_dtypes(run) == {"F32"}

    record = run / checkpoint.NAME / checkpoint.TRAINER
    info = json.loads(record.read_text())
    del info["config"]["precision"]
    info["config"]["dtype"] = "bfloat16"
    record.write_text(json.dumps(info))
    legacy = run_cli("train", "--resume", run, "--max-steps", "10")
    assert legacy.code == 0 and "precision bf16-mixed" in legacy.stderr, legacy.stderr
    assert checkpoint.load(run).info["config"]["precision"] == "bf16-mixed"

    for args in (("--resume", run), (SPECS / "transformer.yaml", *TINY, "--out", tmp_path / "fresh")):
        refused = run_cli("train", *args, "--precision", "16-mixed", "--max-steps", "12")
        assert refused.code == 1 and "Traceback" not in refused.stderr, refused.stderr
        assert "--precision 16-mixed needs a CUDA device" in refused.stderr and "bf16-mixed" in refused.stderr
    assert checkpoint.load(run).info["step"] == 10 and not (tmp_path / "fresh" / checkpoint.NAME).exists()
    launched = run_cli("train", SPECS / "transformer.yaml", *TINY, "--out", tmp_path / "two", "--nproc", "2",
                       "--precision", "16-mixed")  # fmt: skip
    assert launched.code == 1 and launched.stderr.count("needs a CUDA device") == 1, launched.stderr
    assert "launching" not in launched.stderr  # refused before any worker started


def test_16_mixed_scales_the_loss_and_resumes_its_scale(tmp_path, monkeypatch):
    """The loss-scaling path, run on the CPU with the CUDA check lifted (CPU autocast has float16 too): the scale is
    saved with the checkpoint and restored, so 3 steps + resume + 3 equal 6 steps bit for bit, scale included;
    the weights stay float32. Under fsdp (one process), FSDP's float16 policy and the scaler on its sharded
    gradients follow the same losses."""
    monkeypatch.setattr(loop, "check_precision", lambda config, context: None)
    settings = {"precision": "16-mixed", "epochs": 2, "save_every": 3, "bleu_sentences": 0}
    full = train(tiny_reverse_config(**settings, max_steps=6), tmp_path / "full", quiet=True)
    train(tiny_reverse_config(**settings, max_steps=3), tmp_path / "part", quiet=True)
    resumed = train(TrainConfig(max_steps=6), resume=tmp_path / "part", quiet=True)
    assert resumed.step == full.step == 6
    scaled = [checkpoint.load(tmp_path / name).info["grad_scaler"] for name in ("full", "part")]
    assert scaled[0] == scaled[1] and 0 < scaled[0]["scale"] <= 2.0**16
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert {p.dtype for p in full.model.parameters()} == {torch.float32}
    shards = train(tiny_reverse_config(**settings, max_steps=6, strategy="fsdp"), quiet=True)
    assert abs(shards.history[-1]["train_loss"] - full.history[-1]["train_loss"]) < 0.02
