"""Subword tokenizers: SentencePiece learned from the training data (`--subword-vocab`) or given as a file
(`--tokenizer FILE.model`), carried by the checkpoint, tokenizing exactly as sentencepiece itself does."""

from __future__ import annotations

import json

import pytest
import sentencepiece
from conftest import SPECS

from blockgraph.common.errors import CheckpointError, DataError
from blockgraph.trainer import checkpoint, subword
from blockgraph.trainer.loop import TrainConfig, train

SMALL = {"d_model": 32, "heads": 2, "enc_layers": 1, "dec_layers": 1, "d_ff": 64, "dropout": 0.0}
SENTENCES = ["我们今天去公园。", "他在看书。"]


def _config(**settings) -> TrainConfig:
    base = {"spec": str(SPECS / "transformer.yaml"), "data": str(SPECS / "data" / "zh_en.tsv"), "overrides": SMALL}
    return TrainConfig(**{**base, "epochs": 1, "batch_size": 32, "warmup": 10, "bleu_sentences": 4, **settings})


def _forget() -> None:
    """A fresh process knows no model: what a checkpoint gives it back must be enough."""
    subword._models.clear()
    subword._bytes.clear()


@pytest.fixture(scope="module")
def subword_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("subword") / "run"
    result = train(_config(subword_vocab=1000, subword_model="bpe"), out, quiet=True)
    return out, result


def test_training_learns_a_subword_model_per_side_and_the_checkpoint_carries_it(subword_run):
    out, result = subword_run
    src, tgt = result.corpus.src_vocab, result.corpus.tgt_vocab
    assert subword.is_subword(src.tokenizer) and subword.is_subword(tgt.tokenizer) and src.tokenizer != tgt.tokenizer
    assert "bleu" in result.history[-1] and "chrf" in result.history[-1]
    record = json.loads((out / "checkpoint" / "vocab.json").read_text(encoding="utf-8"))
    model = subword.deserialized(record["src"]["subword"])
    _forget()
    saved = checkpoint.load(out)
    reference = sentencepiece.SentencePieceProcessor(model_proto=model)
    for sentence in SENTENCES:
        pieces = reference.encode(sentence, out_type=str)
        assert saved.src_vocab.encode_text(sentence) == saved.src_vocab.encode(pieces)
        assert subword.pieces(sentence, saved.src_vocab.tokenizer) == pieces


def test_a_subword_checkpoint_translates_and_resumes(subword_run, run_cli, tmp_path):
    out, result = subword_run
    _forget()
    translated = run_cli("translate", out, *SENTENCES)
    assert translated.code == 0, translated.stderr
    assert len(translated.stdout.splitlines()) == 2
    _forget()
    resumed = train(_config(subword_vocab=1000, subword_model="bpe", epochs=2), out, resume=out, quiet=True)
    assert resumed.corpus.src_vocab.tokenizer == result.corpus.src_vocab.tokenizer
    assert resumed.history[-1]["epoch"] == 2


def test_a_sentencepiece_file_is_a_tokenizer(tmp_path):
    text = tmp_path / "en.txt"
    lines = [line.split("\t")[1] for line in (SPECS / "data" / "zh_en.tsv").read_text(encoding="utf-8").splitlines()]
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(tmp_path / "en"), vocab_size=300, hard_vocab_limit=False, minloglevel=2
    )
    model = tmp_path / "en.model"
    config = _config(spec=str(SPECS / "lstm_lm.yaml"), data=str(text), tokenizer=str(model),
                     overrides={"emb": 16, "hidden": 16, "layers": 1, "dropout": 0.0})  # fmt: skip
    result = train(config, tmp_path / "lm", quiet=True)
    assert result.corpus.tgt_vocab.tokenizer == subword.kind_of(model.read_bytes())
    reference = sentencepiece.SentencePieceProcessor(model_file=str(model))
    assert subword.pieces("I want to drink tea.", result.corpus.tgt_vocab.tokenizer) == reference.encode(
        "I want to drink tea.", out_type=str
    )


def test_a_checkpoint_whose_model_is_not_the_one_it_names_is_refused(subword_run, tmp_path):
    import shutil

    out, _ = subword_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    path = copy / "checkpoint" / "vocab.json"
    record = json.loads(path.read_text(encoding="utf-8"))
    record["src"]["subword"], record["tgt"]["subword"] = record["tgt"]["subword"], record["src"]["subword"]
    path.write_text(json.dumps(record), encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"field src\.subword is not the model src\.tokenizer names"):
        checkpoint.load(copy)
    record["src"]["subword"] = "not base64!"
    path.write_text(json.dumps(record), encoding="utf-8")
    with pytest.raises(CheckpointError, match="not base64"):
        checkpoint.load(copy)


def test_subword_mistakes_are_clear(tmp_path):
    with pytest.raises(DataError, match=r"--subword-vocab 50 is fewer pieces than the text has characters"):
        train(_config(subword_vocab=50), tmp_path / "a", quiet=True)
    with pytest.raises(DataError, match="leave out --task copy"):
        train(_config(subword_vocab=100, task="copy", data=None), tmp_path / "b", quiet=True)
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\x00not a model")
    with pytest.raises(DataError, match="is not a SentencePiece model"):
        train(_config(tokenizer=str(bad)), tmp_path / "c", quiet=True)
