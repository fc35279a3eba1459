"""The processes of the CTranslate2 comparison (`ctranslate2_case.py`): a one-off conversion, and one decoding
worker per engine, so that CTranslate2's OpenMP runtime and torch's never share a process (two runtimes in one
process were measured slowing torch about tenfold).

    python -m benchmarks.ctranslate2_worker convert FOLDER
    python -m benchmarks.ctranslate2_worker serve {ctranslate2|blockgraph} FOLDER THREADS

FOLDER holds `marian/` (the Hugging Face checkpoint) and `setup.json` (token names, sources, steps). A worker
answers one JSON line when it is ready ({"ready": [precisions]}), then one per order it reads on stdin
({"precision", "beam", "batch", "tokens"}): the generated ids per sentence when `tokens` is true, else {}.
Top-level imports are the standard library's only: the CTranslate2 worker must not load torch.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

Run = Callable[[str, int, int], list[list[int]]]  # (precision, beam, batch) → ids per sentence
CT2_PRECISIONS = ("float32", "int8")
OUR_PRECISIONS = ("float32", "bfloat16", "int8")


def token_names(vocab: int, specials: dict[int, str]) -> list[str]:
    """A string per id, as CTranslate2 reads tokens: the specials' names, `t<id>` for the rest."""
    return [specials.get(i, f"t{i}") for i in range(vocab)]


def setup(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "setup.json").read_text(encoding="utf-8"))


@dataclass
class VocabularyTokenizer:
    """What CTranslate2's Marian loader reads of a tokenizer (its vocabulary and special tokens), without one to
    load: its converter would otherwise look for a SentencePiece tokenizer, which a random model has none of."""

    vocab: list[str]
    eos_token: str = "</s>"
    unk_token: str = "<unk>"

    def get_vocab(self) -> dict[str, int]:
        return {token: i for i, token in enumerate(self.vocab)}


def convert(folder: Path) -> None:
    """The checkpoint in CTranslate2's format, once per precision, by its own converter."""
    from ctranslate2.converters import TransformersConverter

    tokenizer = VocabularyTokenizer(setup(folder)["vocab"])

    class Converter(TransformersConverter):
        def load_tokenizer(self, tokenizer_class: Any, model_name_or_path: str, **kwargs: Any) -> Any:
            return tokenizer

    for precision in CT2_PRECISIONS:
        Converter(str(folder / "marian")).convert(str(folder / f"ctranslate2-{precision}"), quantization=precision)


def ctranslate2_engine(folder: Path, threads: int) -> tuple[Run, list[str]]:
    import ctranslate2

    settings = setup(folder)
    vocab: list[str] = settings["vocab"]
    ids = {token: i for i, token in enumerate(vocab)}
    sources = [[vocab[i] for i in sentence] for sentence in settings["sources"]]
    translators = {
        p: ctranslate2.Translator(
            str(folder / f"ctranslate2-{p}"), device="cpu", compute_type=p, intra_threads=threads, inter_threads=1
        )
        for p in CT2_PRECISIONS
    }
    steps = settings["steps"]

    def run(precision: str, beam: int, batch: int) -> list[list[int]]:
        results = translators[precision].translate_batch(
            sources[:batch], beam_size=beam, length_penalty=0.0, max_decoding_length=steps,
            min_decoding_length=steps, max_batch_size=0,
        )  # fmt: skip
        return [[ids[token] for token in result.hypotheses[0]] for result in results]

    return run, list(translators)


def blockgraph_engine(folder: Path, threads: int) -> tuple[Run, list[str]]:
    import torch
    import transformers

    from benchmarks.decoding import our_decoder, ours_call

    torch.set_num_threads(threads)
    reference = transformers.MarianMTModel.from_pretrained(folder / "marian").eval()
    decoders = {p: our_decoder("Marian", reference, p) for p in OUR_PRECISIONS}
    del reference
    sources = torch.tensor(setup(folder)["sources"])

    def run(precision: str, beam: int, batch: int) -> list[list[int]]:
        return [list(tokens) for tokens in ours_call(decoders[precision], beam, {"src": sources[:batch]})()]

    return run, list(decoders)


ENGINES = {"ctranslate2": ctranslate2_engine, "blockgraph": blockgraph_engine}


def serve(run: Run, precisions: list[str], answers: IO[str]) -> None:
    """Decode on every order read from stdin until it closes."""

    def answer(value: dict[str, Any]) -> None:
        answers.write(json.dumps(value) + "\n")
        answers.flush()

    answer({"ready": precisions})
    for line in sys.stdin:
        order = json.loads(line)
        tokens = run(order["precision"], order["beam"], order["batch"])
        answer({"tokens": tokens} if order["tokens"] else {})


def main(argv: list[str]) -> None:
    if argv[0] == "convert":
        convert(Path(argv[1]))
        return
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # what the libraries print goes to the log (stderr), never into the answers
    kind, folder, threads = argv[1:]
    serve(*ENGINES[kind](Path(folder), int(threads)), answers)


if __name__ == "__main__":
    main(sys.argv[1:])
