"""`blockgraph train`: models learn the synthetic tasks, resuming is exact, bad data is reported by line."""

from __future__ import annotations

import json
import time

import pytest
import torch
import yaml
from conftest import SPECS, tiny_reverse_config
from typer.testing import CliRunner

from blockgraph.builder import persist
from blockgraph.cli import app
from blockgraph.common.errors import DataError, SpecError, UsageError
from blockgraph.trainer import checkpoint, data
from blockgraph.trainer.loop import TrainConfig, train

torch.set_num_threads(1)

TRANSFORMER = str(SPECS / "transformer.yaml")
RNN = str(SPECS / "rnn_seq2seq_attention.yaml")
SMALL_TRANSFORMER = {"d_model": 32, "heads": 2, "enc_layers": 2, "dec_layers": 2, "d_ff": 64, "dropout": 0.0}
TASK = {"symbols": 10, "min_len": 3, "max_len": 8, "train": 2000, "valid": 100}


def test_transformer_learns_to_copy():
    """A 2+2-layer Transformer (d_model 32) copies random sequences: ≥ 95% held-out token accuracy in 320 steps."""
    config = TrainConfig(
        spec=TRANSFORMER,
        overrides=SMALL_TRANSFORMER,
        task="copy",
        task_options=TASK,
        epochs=100,
        max_steps=320,
        batch_size=32,
        lr=5e-3,
        warmup=50,
        label_smoothing=0.0,
        bleu_sentences=0,
    )
    started = time.perf_counter()
    result = train(config, quiet=True)
    assert result.step == 320
    assert result.history[-1]["valid_acc"] >= 0.95, result.history
    assert time.perf_counter() - started < 120


def test_lstm_with_attention_learns_to_reverse():
    """The LSTM encoder–decoder with global attention reverses sequences of 10 symbols.

    Chance is 10% per token; a decoder that ignored the source could at best learn where eos goes (about one
    token in seven), about 23% in all. 80% held-out token accuracy after 200 steps needs the attention to
    read the source right to left (it reaches about 97%).
    """
    config = TrainConfig(
        spec=RNN,
        overrides={"emb": 32, "hidden": 64, "layers": 1, "dropout": 0.0},
        task="reverse",
        task_options=TASK,
        epochs=100,
        max_steps=200,
        batch_size=32,
        lr=5e-3,
        warmup=50,
        label_smoothing=0.0,
        bleu_sentences=0,
    )
    result = train(config, quiet=True)
    assert result.history[-1]["valid_acc"] >= 0.8, result.history


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_continues_exactly(tmp_path):
    """2 epochs == 1 epoch + resume + 1 epoch, and == 3 steps + resume (mid-epoch) to 2 epochs, bit for bit.

    Dropout is on, so the random-number state must travel with the checkpoint too.
    """
    full = train(tiny_reverse_config(epochs=2), tmp_path / "full", quiet=True)
    train(tiny_reverse_config(epochs=1), tmp_path / "half", quiet=True)
    resumed = train(TrainConfig(epochs=2), resume=tmp_path / "half", quiet=True)
    assert resumed.step == full.step == 12
    assert _same_weights(full.model, resumed.model)

    train(tiny_reverse_config(epochs=2, max_steps=3), tmp_path / "part", quiet=True)
    assert checkpoint.load(tmp_path / "part").info["batch"] == 3
    mid = train(TrainConfig(epochs=2, max_steps=None), resume=tmp_path / "part", quiet=True)  # the run had max 3
    assert _same_weights(full.model, mid.model)
    # the epoch resumed midway reports all its batches (its sums before the resume came with the checkpoint)
    figures = [(h["epoch"], h["train_loss"], h["train_acc"]) for h in full.history]
    assert [(h["epoch"], h["train_loss"], h["train_acc"]) for h in mid.history[1:]] == figures
    logged = [json.loads(line) for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [(h["epoch"], h["train_loss"], h["train_acc"]) for h in logged[1:]] == figures

    # the checkpoints on disk agree too: weights, and Adam's moments
    a, b = checkpoint.load(tmp_path / "full"), checkpoint.load(tmp_path / "half")
    assert _same_weights(a.model, b.model)
    moments = [k for k in a.tensors if k.startswith("optimizer.")]
    assert moments and all(torch.equal(a.tensors[k], b.tensors[k]) for k in moments)
    assert [h["valid_loss"] for h in a.info["history"]] == [h["valid_loss"] for h in b.info["history"]]
    # the model inside is an ordinary saved model
    assert _same_weights(persist.load(a.path / checkpoint.MODEL), full.model)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """An interrupted checkpoint write leaves the previous checkpoint whole."""
    train(tiny_reverse_config(epochs=1), tmp_path / "run", quiet=True)
    before = checkpoint.load(tmp_path / "run")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(epochs=2), resume=tmp_path / "run", quiet=True)
    after = checkpoint.load(tmp_path / "run")
    assert after.info["step"] == before.info["step"]
    assert _same_weights(before.model, after.model)
    assert [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")] == [".lock"]  # no temporaries


BAD = "你好\tHello\nno tab here\n再见\t\n".encode() + b"\xff\xfe\tbad bytes\n" + "谢谢\tThanks\n\n".encode()


def test_bad_lines_are_located(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_bytes(BAD)
    with pytest.raises(DataError) as caught:
        data.read_pairs(path)
    problems = caught.value.problems
    assert [(p.location.file, p.location.line) for p in problems] == [(str(path), 2), (str(path), 3), (str(path), 4)]
    assert "no tab" in problems[0].message
    assert "empty target" in problems[1].message
    assert "not UTF-8" in problems[2].message and "0xff" in problems[2].message
    assert "--skip-bad-lines" in (problems[-1].hint or "")
    kept = data.read_pairs(path, skip_bad=True)
    assert kept.records == [("你好", "Hello"), ("谢谢", "Thanks")]
    assert len(kept.bad) == 3 and "skipped 3 bad line(s)" in kept.summary()


def _cli(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    return result.exit_code, result.stdout, result.stderr


SMALL_SET = ["--set", "d_model=16", "--set", "heads=2", "--set", "enc_layers=1", "--set", "dec_layers=1"]


def test_cli_bad_data(tmp_path):
    code, _, stderr = _cli("train", TRANSFORMER, "--data", tmp_path / "missing.tsv", "--out", tmp_path / "run")
    assert code == 1 and "does not exist" in stderr and "Traceback" not in stderr

    path = tmp_path / "pairs.tsv"
    path.write_bytes(BAD)
    code, _, stderr = _cli("train", TRANSFORMER, "--data", path, "--out", tmp_path / "run")
    assert code == 1
    assert f"{path}:2" in stderr and "line 2: no tab" in stderr
    assert "line 3: empty target" in stderr and "line 4: not UTF-8" in stderr

    code, _, stderr = _cli(
        "train", TRANSFORMER, "--data", path, "--skip-bad-lines", *SMALL_SET,
        "--max-steps", "1", "--valid-fraction", "0", "--out", tmp_path / "run",
    )  # fmt: skip
    assert code == 0, stderr
    assert "skipped 3 bad line(s)" in stderr
    assert (tmp_path / "run" / "checkpoint" / "model" / "model.safetensors").is_file()


def test_vocab_sizes_come_from_the_data(tmp_path):
    """The spec's src_vocab/tgt_vocab are set from the built vocabularies; a spec without them must be big enough."""
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("我们去公园。\tWe go to the park.\n你好。\tHello.\n谢谢你。\tThank you.\n", encoding="utf-8")
    settings = {"overrides": SMALL_TRANSFORMER, "data": str(pairs), "max_steps": 1, "valid_fraction": 0.0}
    result = train(TrainConfig(spec=TRANSFORMER, **settings), quiet=True)
    src, tgt = result.corpus.src_vocab, result.corpus.tgt_vocab
    assert src.tokenizer == "chars" and tgt.tokenizer == "words"
    assert "园" in src.index and "park" in tgt.index
    assert result.model.src_embed.lut.weight.shape[0] == len(src) == 4 + 9  # 我们去公园。你好谢
    assert result.model.generator.proj.weight.shape[0] == len(tgt) == 4 + 9  # We go to the park . Hello Thank you

    fixed = (SPECS / "transformer.yaml").read_text(encoding="utf-8").replace('"${src_vocab}"', "8")
    fixed = fixed.replace("src_vocab: 32000", "other: 1")
    spec = tmp_path / "fixed.yaml"
    spec.write_text(fixed, encoding="utf-8")
    with pytest.raises(SpecError, match="source embedding has 8 rows, the data's vocabulary 13 tokens"):
        train(TrainConfig(spec=str(spec), **settings), quiet=True)


def test_language_model_on_a_text_file(tmp_path):
    """A decoder-only spec (one token input) trains on a text file, one sentence per line."""
    lines = [line.split("\t")[1] for line in (SPECS / "data" / "zh_en.tsv").read_text(encoding="utf-8").splitlines()]
    text = tmp_path / "en.txt"
    text.write_text("\n".join(lines[:120]) + "\n", encoding="utf-8")
    config = TrainConfig(
        spec=str(SPECS / "lstm_lm.yaml"),
        overrides={"emb": 16, "hidden": 32, "layers": 1, "dropout": 0.0},
        data=str(text),
        epochs=4,
        batch_size=16,
        lr=1e-2,
        warmup=10,
        valid_fraction=0.1,
    )
    result = train(config, tmp_path / "lm", quiet=True)
    assert result.roles.kind == "lm" and result.roles.tgt == "tokens" and result.roles.tgt_pad == "pad"
    assert result.history[-1]["valid_loss"] < result.history[0]["valid_loss"]
    assert "bleu" not in result.history[-1]
    code, stdout, stderr = _cli("translate", tmp_path / "lm", "I", "--max-len", "5")
    assert code == 0, stderr
    assert stdout.startswith("I")


def _renamed_spec() -> dict:
    """A 1+1-layer encoder–decoder whose inputs and outputs follow no naming convention."""
    layer = {"d_model": 8, "heads": 2, "d_ff": 16}
    return {
        "name": "renamed",
        "vars": {"v": 12},
        "inputs": {
            "words": {"dtype": "int64", "shape": ["batch", "n"]},
            "prev": {"dtype": "int64", "shape": ["batch", "m"]},
            "hide_a": {"dtype": "bool", "shape": ["batch", "n"], "optional": True},
            "hide_b": {"dtype": "bool", "shape": ["batch", "m"], "optional": True},
        },
        "nodes": {
            "e1": {"type": "token_embedding", "params": {"vocab": "${v}", "dim": 8}, "in": "words"},
            "enc": {"type": "encoder_layer", "params": layer, "in": {"x": "e1", "src_key_padding_mask": "hide_a"}},
            "e2": {"type": "token_embedding", "params": {"vocab": "${v}", "dim": 8}, "in": "prev"},
            "dec": {
                "type": "decoder_layer",
                "params": layer,
                "in": {
                    "x": "e2",
                    "memory": "enc",
                    "tgt_key_padding_mask": "hide_b",
                    "memory_key_padding_mask": "hide_a",
                },
            },
            "gen": {"type": "generator", "params": {"d_model": 8, "vocab": "${v}", "output": "logits"}, "in": "dec"},
        },
        "outputs": {"scores": "gen", "memory": "enc"},
    }


def test_input_roles_by_convention_and_by_name(tmp_path):
    from blockgraph.builder.pipeline import typed_graph
    from blockgraph.trainer.roles import find_roles, parse_roles

    roles = find_roles(typed_graph(TRANSFORMER, SMALL_TRANSFORMER).graph)
    assert (roles.kind, roles.src, roles.tgt, roles.src_pad, roles.tgt_pad) == (
        "seq2seq",
        "src",
        "tgt",
        "src_pad",
        "tgt_pad",
    )
    assert roles.output is None and roles.output_mode == "log_softmax"

    graph = typed_graph(_renamed_spec()).graph
    assert find_roles(graph).output == "scores"  # the output a generator produces
    unclear = {**_renamed_spec(), "outputs": {"a": "enc", "b": "dec"}}
    with pytest.raises(SpecError, match="which output holds the token scores"):
        find_roles(typed_graph(unclear).graph)
    roles = find_roles(graph, parse_roles("src=words,target=prev,src_pad=hide_a,tgt_pad=hide_b,output=scores"))
    assert (roles.src, roles.tgt, roles.src_pad, roles.tgt_pad, roles.output) == (
        "words",
        "prev",
        "hide_a",
        "hide_b",
        "scores",
    )
    assert roles.output_mode == "logits"
    # two int inputs: the first is the source; the masks are found by shape ([batch, n] is the source's)
    roles = find_roles(graph)
    assert (roles.src, roles.tgt, roles.src_pad, roles.tgt_pad) == ("words", "prev", "hide_a", "hide_b")
    with pytest.raises(UsageError, match="no input 'nope'"):
        find_roles(graph, parse_roles("src=nope"))
    with pytest.raises(UsageError, match="--input-roles: cannot use"):
        parse_roles("source")

    # it trains: no vocabulary variable, but its 12 rows hold the task's 4 + 6 tokens
    spec = tmp_path / "renamed.yaml"
    spec.write_text(yaml.safe_dump(_renamed_spec()), encoding="utf-8")
    config = TrainConfig(
        spec=str(spec),
        task="copy",
        task_options={"symbols": 6, "train": 32, "valid": 4},
        max_steps=2,
        warmup=2,
    )
    result = train(config, tmp_path / "run", quiet=True)
    assert result.step == 2 and result.history[-1]["valid_loss"] > 0
