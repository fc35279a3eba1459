"""Fine-tuning an imported model with `train`: it starts from the import's weights, reads the data with the
import's tokenizer and frames targets as the original does, so its loss on every example is transformers' own
(labels with eos; decoder inputs shifted right from the decoder start, or a language model's next tokens); an
edited spec keeps what still fits; the checkpoint carries the tokenizer to `translate` and `--resume`."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hf_dirs import gpt2, marian, sentences

from blockgraph.builder import persist
from blockgraph.trainer import losses, pretrained

torch.set_num_threads(1)


def _pairs(tokenizer, count: int, skip: int = 0) -> list[tuple[str, str]]:
    """Shipped zh→en pairs short enough for the 32 positions of the small Marian models."""
    found = []
    for zh, en in list(zip(sentences(0), sentences(1), strict=True))[skip:]:
        encoded = tokenizer(zh, text_target=en)
        if len(encoded.input_ids) <= 24 and len(encoded.labels) <= 24:
            found.append((zh, en))
        if len(found) == count:
            return found
    raise AssertionError("too few short pairs")


def _write(path, pairs) -> None:
    path.write_text("".join(f"{a}\t{b}\n" for a, b in pairs), encoding="utf-8")


def _marian_loss(reference, tokenizer, pairs) -> float:
    """transformers' cross-entropy per target token over the pairs, as its own training computes it."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for zh, en in pairs:
            batch = tokenizer(zh, text_target=en, return_tensors="pt")
            logits = reference(input_ids=batch.input_ids, labels=batch.labels).logits
            total += float(F.cross_entropy(logits[0], batch.labels[0], reduction="sum"))
            tokens += batch.labels.shape[1]
    return total / tokens


def _history(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def marian_import(tmp_path_factory):
    root = tmp_path_factory.mktemp("marian")
    reference, tokenizer, hf = marian(root)
    pretrained.import_pretrained(hf, root / "out")
    return reference, tokenizer, root / "out"


def test_fine_tuning_marian_starts_from_the_import_with_transformers_loss(marian_import, tmp_path, run_cli):
    reference, tokenizer, imported = marian_import
    train, valid = _pairs(tokenizer, 12), _pairs(tokenizer, 5, skip=200)
    _write(tmp_path / "train.tsv", train)
    _write(tmp_path / "valid.tsv", valid)
    result = run_cli(
        "train", imported, "--data", tmp_path / "train.tsv", "--valid", tmp_path / "valid.tsv", "--epochs", "1",
        "--lr", "0", "--batch-size", "5", "--label-smoothing", "0", "--bleu-sentences", "3", "--out", tmp_path / "run",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    assert "the imported model's tokenizer" in result.stderr
    total = len(persist.unique_tensors(persist.load(imported / "model"))[0])
    (line,) = [line for line in result.stderr.splitlines() if "weights:" in line]
    assert line.endswith(f"weights: {total} of {total} tensors from the imported model"), line
    (record,) = _history(tmp_path / "run")
    assert record["train_loss"] == pytest.approx(_marian_loss(reference, tokenizer, train), rel=1e-5)
    assert record["valid_loss"] == pytest.approx(_marian_loss(reference, tokenizer, valid), rel=1e-5)
    assert "bleu" in record

    # a learning rate of 0 leaves the weights as imported; translating from the run is translating with the import
    tuned = persist.load(tmp_path / "run" / "checkpoint" / "model").state_dict()
    for name, tensor in persist.load(imported / "model").state_dict().items():
        assert torch.equal(tuned[name], tensor), name
    sentence = "我们今天去公园。"
    ours = run_cli("translate", tmp_path / "run", sentence, "--max-len", "8")
    assert ours.code == 0, ours.stderr
    assert ours.stdout == run_cli("translate", imported, sentence, "--max-len", "8").stdout


def test_fine_tuning_a_language_model_predicts_the_next_tokens_as_transformers(tmp_path, run_cli):
    reference, tokenizer, hf = gpt2(tmp_path, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    assert run_cli("import", hf, "--out", tmp_path / "out").code == 0
    lines = [s for s in sentences(1) if len(s.split()) < 12][:20]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = run_cli(
        "train", tmp_path / "out", "--data", tmp_path / "train.txt", "--valid-fraction", "0", "--epochs", "1",
        "--lr", "0", "--label-smoothing", "0", "--out", tmp_path / "run",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    eos = reference.config.eos_token_id
    total, tokens = 0.0, 0
    with torch.no_grad():
        for line in lines:
            ids = torch.tensor([[*tokenizer.encode(line).ids, eos]])
            loss = reference(input_ids=ids, labels=ids).loss  # transformers shifts: each token predicts the next
            total, tokens = total + float(loss) * (ids.shape[1] - 1), tokens + ids.shape[1] - 1
    (record,) = _history(tmp_path / "run")
    assert record["train_loss"] == pytest.approx(total / tokens, rel=1e-5)


def test_fine_tuning_trains_resumes_exactly_and_keeps_what_an_edit_leaves(marian_import, tmp_path, run_cli):
    _, tokenizer, imported = marian_import
    _write(tmp_path / "train.tsv", _pairs(tokenizer, 16))
    common = ("--data", tmp_path / "train.tsv", "--valid-fraction", "0", "--lr", "1e-3", "--warmup", "1",
              "--batch-size", "4", "--bleu-sentences", "0")  # fmt: skip
    assert run_cli("train", imported, *common, "--max-steps", "3", "--out", tmp_path / "whole").code == 0
    assert run_cli("train", imported, *common, "--max-steps", "2", "--out", tmp_path / "part").code == 0
    resumed = run_cli("train", "--resume", tmp_path / "part", "--max-steps", "3")
    assert resumed.code == 0, resumed.stderr
    whole = persist.load(tmp_path / "whole" / "checkpoint" / "model").state_dict()
    part = persist.load(tmp_path / "part" / "checkpoint" / "model").state_dict()
    start = persist.load(imported / "model").state_dict()
    assert all(torch.equal(whole[name], part[name]) for name in whole)
    assert not all(torch.equal(whole[name], start[name]) for name in whole)  # it did train

    edited = run_cli("train", imported, *common, "--max-steps", "1", "--set", "dec_layers=1", "--out", tmp_path / "e")
    assert edited.code == 0, edited.stderr
    shallow = persist.load(tmp_path / "e" / "checkpoint" / "model").state_dict()
    left = set(start) - set(shallow)
    assert left and all(".1." in name or "_1" in name for name in left)
    assert f"{len(left)} left out" in edited.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--tokenizer", "words"), "leave out --tokenizer"),
        (("--subword-vocab", "100"), "leave out --subword-vocab"),
        (("--max-vocab", "100"), "leave out --max-vocab"),
        (("--task", "copy"), "leave out --task"),
    ],
)
def test_an_imported_model_keeps_its_own_tokenizer(marian_import, tmp_path, run_cli, flags, message):
    _, tokenizer, imported = marian_import
    _write(tmp_path / "train.tsv", _pairs(tokenizer, 4))
    data = () if "--task" in flags else ("--data", tmp_path / "train.tsv")
    result = run_cli("train", imported, *data, *flags, "--out", tmp_path / "run")
    assert result.code != 0 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run" / "checkpoint").exists()


@pytest.mark.parametrize("pad", [None, 3])
def test_label_smoothing_is_cross_entropy_against_the_smoothed_distribution(pad):
    """The closed form against cross-entropy with the target distribution written out: 1 - ε on the gold
    token, ε spread evenly over the others except the padding token."""
    torch.manual_seed(0)
    log_probs = torch.log_softmax(torch.randn(2, 5, 7), dim=-1)
    target = torch.randint(0, 7, (2, 5))
    target[target == 3] = 4
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[1, 3:] = False
    epsilon = 0.2
    others = 7 - 1 - (pad is not None)
    distribution = torch.full((2, 5, 7), epsilon / others)
    if pad is not None:
        distribution[..., pad] = 0.0
    distribution.scatter_(-1, target.unsqueeze(-1), 1 - epsilon)
    expected = -(distribution * log_probs).sum(-1)[keep].sum()
    got = losses.smoothed_nll(log_probs, target, keep, epsilon, pad)
    assert float(got) == pytest.approx(float(expected), rel=1e-6)
