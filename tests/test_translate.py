"""Decoding: greedy reproduces a trained copy model's input; beam search K=1 is greedy; beam K>1 returns the best
hypothesis it kept, and with a beam wide enough for every hypothesis, the best of all (checked by brute force)."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import SPECS
from torch import nn
from typer.testing import CliRunner

from blockgraph.builder import build
from blockgraph.cli import app
from blockgraph.trainer import checkpoint, decode
from blockgraph.trainer.roles import ModelIO, find_roles
from blockgraph.trainer.vocab import BOS_ID, EOS_ID, PAD_ID

torch.set_num_threads(1)

TRANSFORMER = SPECS / "transformer.yaml"


def _cli(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def copy_run(tmp_path_factory):
    """A 2+2-layer Transformer trained on the copy task through the command line (about 25 s on one core)."""
    out = tmp_path_factory.mktemp("copy")
    code, _, stderr = _cli(
        "train", TRANSFORMER, "--task", "copy", "--task-options", "symbols=10,min_len=3,max_len=8,train=2000,valid=50",
        "--set", "d_model=32", "--set", "heads=2", "--set", "enc_layers=2", "--set", "dec_layers=2",
        "--set", "d_ff=64", "--set", "dropout=0.0", "--label-smoothing", "0", "--batch-size", "32",
        "--lr", "5e-3", "--warmup", "50", "--max-steps", "600", "--epochs", "100", "--bleu-sentences", "50",
        "--out", out,
    )  # fmt: skip
    assert code == 0, stderr
    assert "BLEU" in stderr and "checkpoint:" in stderr
    return out


SENTENCES = ["3 1 4 1 5", "9 2 6 5 3 5", "2 7 1 8 2 8 1 8", "0 0 7"]


def test_greedy_translation_copies(copy_run):
    code, stdout, stderr = _cli("translate", copy_run, *SENTENCES)
    assert code == 0, stderr
    outputs = stdout.splitlines()
    assert len(outputs) == len(SENTENCES)
    # the model copies ~98% of held-out sequences exactly (see test_train): demand 3 of these 4, and the rest close
    assert sum(out == sentence for out, sentence in zip(outputs, SENTENCES, strict=True)) >= 3
    assert all(out.split()[:3] == sentence.split()[:3] for out, sentence in zip(outputs, SENTENCES, strict=True))


def test_beam_translation_copies_and_lists_hypotheses(copy_run):
    code, stdout, stderr = _cli("translate", copy_run, SENTENCES[0], "--beam", "3", "--n-best", "3")
    assert code == 0, stderr
    lines = [line.split("\t") for line in stdout.splitlines()]
    assert len(lines) == 3 and lines[0][1] == SENTENCES[0]
    scores = [float(score) for score, _ in lines]
    assert scores == sorted(scores, reverse=True)


def test_beam_of_one_is_greedy(copy_run):
    saved = checkpoint.load(copy_run)
    decoder = decode.Decoder(saved.model.eval(), find_roles(saved.model.typed_graph.graph))
    for sentence in [*SENTENCES, "5 5 5 5 5 5 5 5", "1 2"]:
        src = torch.tensor([[*saved.src_vocab.encode_text(sentence), EOS_ID]])
        (greedy,) = decode.greedy(decoder, src, max_len=12)
        best = decode.beam_search(decoder, src, beam=1, max_len=12)[0][0]
        assert best.tokens == greedy.tokens
        assert best.score == pytest.approx(greedy.score, abs=1e-9)


def test_unknown_checkpoint_is_a_clear_error(tmp_path):
    code, _, stderr = _cli("translate", tmp_path, "hello")
    assert code == 1 and "holds no model" in stderr


def _tiny_model(seed: int):
    """An untrained 1+1-layer Transformer over 3 tokens (+ pad, bos, eos, unk): peaked enough to make search matter."""
    torch.manual_seed(seed)
    overrides = {"src_vocab": 7, "tgt_vocab": 7, "d_model": 8, "heads": 2, "enc_layers": 1, "dec_layers": 1}
    model = build(TRANSFORMER, overrides={**overrides, "d_ff": 16, "dropout": 0.0}).eval()
    with torch.no_grad():
        model.generator.proj.weight.mul_(3.0)  # sharper distributions: greedy and the optimum differ more often
    return model, ModelIO(find_roles(model.typed_graph.graph))


def _all_hypotheses(vocab: int, max_len: int):
    """Every hypothesis the decoders can produce: ends with eos, or stops at max_len."""
    tokens = [t for t in range(vocab) if t not in (PAD_ID, BOS_ID)]
    for length in range(1, max_len + 1):
        for body in itertools.product([t for t in tokens if t != EOS_ID], repeat=length - 1):
            yield (*body, EOS_ID)
            if length == max_len:
                for last in tokens:
                    if last != EOS_ID:
                        yield (*body, last)


@pytest.mark.parametrize("seed", range(4))
def test_beam_returns_the_best_hypothesis_it_kept(seed):
    model, io = _tiny_model(seed)
    decoder = decode.Decoder(model, io.roles)
    src = torch.tensor([[4, 5, 6, 4, EOS_ID]])
    max_len = 3
    brute = {h: _score(model, io, src, h) for h in _all_hypotheses(7, max_len)}
    best_possible = max(brute.values())
    for beam in (2, 3):
        (kept,) = decode.beam_search(decoder, src, beam=beam, max_len=max_len)
        for hyp in kept:
            assert hyp.score == pytest.approx(brute[hyp.tokens], abs=1e-6)  # the beam's score is the model's
        assert kept[0].score == max(h.score for h in kept)
        assert kept[0].score <= best_possible + 1e-6  # float32: the same sum in another order differs by ~1e-7
    # a beam as wide as the search space keeps everything: it finds the very best hypothesis
    (exact,) = decode.beam_search(decoder, src, beam=4**max_len, max_len=max_len)
    assert exact[0].tokens == max(brute, key=brute.get)
    assert exact[0].score == pytest.approx(best_possible, abs=1e-6)
    (greedy,) = decode.greedy(decoder, src, max_len=max_len)
    assert greedy.score == pytest.approx(brute[greedy.tokens], abs=1e-6)
    assert greedy.score <= best_possible + 1e-6  # float32 sums in another order differ by ~1e-7


@torch.no_grad()
def _score(
    model: nn.Module,
    io: ModelIO,
    src: torch.Tensor | None,
    tokens: list[int] | tuple[int, ...],
    src_pad: torch.Tensor | None = None,
    prefix: list[int] | None = None,
) -> float:
    """Sum of the model's log-probabilities of `tokens` after bos (+ prefix), computed in one teacher-forced pass."""
    device = next(model.parameters()).device
    start = [BOS_ID, *(prefix or [])]
    ys = torch.tensor([[*start, *tokens[:-1]]] if tokens else [start], device=device)
    log_probs = io(model, ys, src, src_pad)[0, len(start) - 1 :].double()
    picked = log_probs.gather(1, torch.tensor(list(tokens), device=device)[:, None]) if tokens else log_probs[:0, :1]
    return float(picked.sum())


def test_a_file_translates_line_by_line_in_order(copy_run, tmp_path):
    """Sentences of every length share batches (the model masks source padding); the output keeps their order."""
    sentences = [*SENTENCES, "5 5 5 5 5 5 5 5", "1 2", "8 6 4"]
    given = tmp_path / "in.txt"
    given.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    code, by_args, stderr = _cli("translate", copy_run, *sentences)
    assert code == 0, stderr
    for batch in ("1", "3", "32"):
        code, by_file, stderr = _cli("translate", copy_run, "--file", given, "--batch-size", batch)
        assert code == 0, stderr
        assert by_file == by_args and len(by_file.splitlines()) == len(sentences)
    beams = [_cli("translate", copy_run, s, "--beam", "3")[1] for s in sentences]
    code, by_file, stderr = _cli("translate", copy_run, "-f", given, "--beam", "3", "--batch-size", "4")
    assert code == 0, stderr
    assert by_file == "".join(beams)


def test_file_mistakes_are_clear(copy_run, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"1 2 3\n4 \xff 5\n")
    code, _, stderr = _cli("translate", copy_run, "--file", bad)
    assert code == 1 and "bad.txt:2" in stderr and "not UTF-8" in stderr and "Traceback" not in stderr
    code, _, stderr = _cli("translate", copy_run, "1 2", "--file", bad)
    assert code == 1 and "--file" in stderr
    code, _, stderr = _cli("translate", copy_run)
    assert code == 1 and "no sentences" in stderr
    code, _, stderr = _cli("generate", copy_run, "1 2")
    assert code == 1 and "encoder–decoder" in stderr


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A one-layer LSTM language model trained a few epochs on the shipped English sentences (seconds)."""
    from blockgraph.trainer.loop import TrainConfig, train

    out = tmp_path_factory.mktemp("lm")
    lines = [line.split("\t")[1] for line in (SPECS / "data" / "zh_en.tsv").read_text(encoding="utf-8").splitlines()]
    text = out / "en.txt"
    text.write_text("\n".join(lines[:200]) + "\n", encoding="utf-8")
    config = TrainConfig(
        spec=str(SPECS / "lstm_lm.yaml"), overrides={"emb": 16, "hidden": 32, "layers": 1, "dropout": 0.0},
        data=str(text), epochs=4, batch_size=16, lr=1e-2, warmup=10, valid_fraction=0.1,
    )  # fmt: skip
    train(config, out / "run", quiet=True)
    return out / "run"


PROMPTS = ["I", "We are going", "The", "I want to"]


def test_generate_continues_prompts_in_order(lm_run, tmp_path):
    code, stdout, stderr = _cli("generate", lm_run, *PROMPTS, "--max-new", "6")
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert len(lines) == len(PROMPTS)
    assert all(line.startswith(prompt) for line, prompt in zip(lines, PROMPTS, strict=True))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    code, by_file, stderr = _cli("generate", lm_run, "--file", prompts, "--max-new", "6", "--batch-size", "3")
    assert code == 0, stderr
    assert by_file == stdout  # greedy: prompts of each length decode together, each as it would alone
    alone = "".join(_cli("generate", lm_run, prompt, "--max-new", "6")[1] for prompt in PROMPTS)
    assert by_file == alone


def test_generate_samples_reproducibly_and_searches_beams(lm_run):
    sample = ("generate", lm_run, *PROMPTS, "--max-new", "8", "--temperature", "1.5", "--top-k", "20")
    first = _cli(*sample, "--seed", "7")
    assert first[0] == 0, first[2]
    assert _cli(*sample, "--seed", "7")[1] == first[1]
    assert any(_cli(*sample, "--seed", str(seed))[1] != first[1] for seed in range(8, 12))
    code, stdout, stderr = _cli("generate", lm_run, "I want", "--beam", "3", "--n-best", "2", "--max-new", "5")
    assert code == 0, stderr
    lines = [line.split("\t") for line in stdout.splitlines()]
    assert len(lines) == 2 and all(text.startswith("I want") for _, text in lines)
    assert float(lines[0][0]) >= float(lines[1][0])
    code, _, stderr = _cli("generate", lm_run, "I", "--beam", "2", "--temperature", "0.7")
    assert code == 1 and "not both" in stderr


def test_translator_api_yields_each_sentence_in_order(lm_run):
    from blockgraph.trainer.generation import Translator

    notes: list[str] = []
    translator = Translator.load(lm_run, note=notes.append)
    results = list(translator.generate(PROMPTS, max_new=4, batch_size=2))
    assert [len(r) for r in results] == [1] * len(PROMPTS)
    assert all(r[0].text.startswith(p) for r, p in zip(results, PROMPTS, strict=True))
    assert translator.decoder.reason is None and notes == []


def test_blank_lines_give_blank_lines_and_bad_settings_are_clear(copy_run, lm_run, tmp_path):
    given = tmp_path / "in.txt"
    given.write_text("3 1 4\n\n   \n9 2 6\n", encoding="utf-8")
    code, stdout, stderr = _cli("translate", copy_run, "--file", given, "--batch-size", "3")
    assert code == 0, stderr
    lines = stdout.split("\n")
    assert len(lines) == 5 and lines[1] == lines[2] == "" and lines[0] and lines[3]
    for bad, message in (
        (("--top-p", "0"), "top_p must be above 0"),
        (("--n-best", "3", "--beam", "2"), "--n-best 3 needs a beam"),
        (("--n-best", "2"), "--n-best 2 needs a beam"),
    ):
        code, _, stderr = _cli("generate", lm_run, "I", *bad)
        assert code == 1 and message in stderr and "Traceback" not in stderr


def test_sampling_draws_one_stream_across_batches(lm_run):
    """The same prompt twice in one run gets two draws (not the same one per batch); the seed fixes the run."""
    from blockgraph.trainer.generation import Translator

    translator = Translator.load(lm_run)
    runs = [
        [o[0].text for o in translator.generate(["I"] * 6, max_new=8, temperature=1.5, seed=5, batch_size=1)]
        for _ in range(2)
    ]
    assert runs[0] == runs[1] and len(set(runs[0])) > 1


@pytest.fixture(scope="module")
def copy_sentences():
    """Held-out copy-task sentences of 3 to 8 symbols."""
    generator = torch.Generator().manual_seed(7)
    lengths = torch.randint(3, 9, (48,), generator=generator).tolist()
    return [" ".join(map(str, torch.randint(0, 10, (n,), generator=generator).tolist())) for n in lengths]


@pytest.mark.parametrize("which", ["bfloat16", "int8"])
def test_reduced_precision_translates_as_float32_does(copy_run, copy_sentences, which):
    """On a trained model, bfloat16 and int8 give float32's tokens for at least 90 % of the sentences, greedy and
    with a beam, and a BLEU at most 3 points below float32's (on 48 short sentences one sentence moves it by 1–2)."""
    from blockgraph.trainer.bleu import corpus_scores
    from blockgraph.trainer.generation import Translator

    exact, reduced = Translator.load(copy_run), Translator.load(copy_run, precision=which)
    for beam in (1, 4):
        ours = [found[0].text for found in reduced.translate(copy_sentences, beam=beam, batch_size=16)]
        theirs = [found[0].text for found in exact.translate(copy_sentences, beam=beam, batch_size=16)]
        assert sum(a == b for a, b in zip(ours, theirs, strict=True)) >= 0.9 * len(copy_sentences)
        bleu = corpus_scores(ours, copy_sentences)["bleu"], corpus_scores(theirs, copy_sentences)["bleu"]
        assert bleu[0] >= bleu[1] - 3.0


def test_translate_says_its_precision_once_and_refuses_what_the_cpu_cannot_run(copy_run):
    code, stdout, stderr = _cli("translate", copy_run, *SENTENCES, "--precision", "int8")
    assert code == 0, stderr
    assert stderr.count("decoding in int8") == 1 and len(stdout.splitlines()) == len(SENTENCES)
    code, _, stderr = _cli("translate", copy_run, "1 2", "--precision", "float16")
    assert code == 1 and "float16 decoding is for GPUs" in stderr and "Traceback" not in stderr
    code, _, stderr = _cli("translate", copy_run, "1 2", "--precision", "half")
    assert code != 0 and "float32, bfloat16, float16, int8" in stderr


def test_a_window_of_sentences_decodes_sorted_by_length(copy_run, copy_sentences, monkeypatch):
    """Batches read ahead are decoded by length (each batch's sources of nearly one length), and the output
    comes back in input order, the same as sentence by sentence."""
    from blockgraph.trainer.generation import Translator

    translator = Translator.load(copy_run)
    widths: list[tuple[int, int]] = []
    real = decode.greedy

    def greedy(decoder, src=None, src_pad=None, **options):
        lengths = (~src_pad).sum(1)
        widths.append((int(lengths.min()), int(lengths.max())))
        return real(decoder, src, src_pad, **options)

    monkeypatch.setattr(decode, "greedy", greedy)
    together = [found[0].text for found in translator.translate(copy_sentences, batch_size=8, window=6)]
    assert len(widths) == 6 and all(after[0] >= before[1] for before, after in itertools.pairwise(widths))
    alone = [found[0].text for found in translator.translate(copy_sentences, batch_size=1)]
    assert together == alone


def test_generate_in_bfloat16_continues_as_float32_does(lm_run):
    code, exact, stderr = _cli("generate", lm_run, "the", "a man", "--max-new", "8")
    assert code == 0, stderr
    code, reduced, stderr = _cli("generate", lm_run, "the", "a man", "--max-new", "8", "--precision", "bfloat16")
    assert code == 0 and stderr.count("decoding in bfloat16") == 1, stderr
    assert len(reduced.splitlines()) == 2 and reduced.splitlines()[0].startswith("the")
    assert sum(a == b for a, b in zip(exact.splitlines(), reduced.splitlines(), strict=True)) >= 1
