"""Decoding speed against CTranslate2 on the same Marian model (decoding.py's: 6 + 6 layers, d_model 512, random
weights): its own converter reads the Hugging Face checkpoint that ours is loaded from, in float32 and in int8.

CTranslate2 is a benchmark-only dependency (`pip install -e '.[bench]'`); without it, or when its conversion or
a worker fails, the case gives one skipped row that says why. Each engine decodes in its own worker process
(ctranslate2_worker.py), timed from here as it answers each order, so the rounds interleave as elsewhere (always
on the wall clock: this process only waits). Both use this process' intra-op thread count.

What makes the three engines compute the same function, offline:
- CTranslate2's Marian loader starts the decoder from a zero embedding (opus-mt's <pad>) where ours and Hugging
  Face's read bos: bos's embedding row is zeroed. The loader also drops the last vocabulary row, which it takes
  for <pad>: the last id is named <pad> and kept out of reach by the output bias (−10⁴) on every side;
- the converter asks a tokenizer only for the vocabulary and the special tokens' names: it gets them from the
  token names of setup.json, nothing is trained or downloaded; sources go in as those names, outputs come back
  as ids through them;
- eos is out of reach (output bias) and CTranslate2 gets min_decoding_length = max_decoding_length = 40 and no
  length penalty, so every engine runs all 40 steps.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch

from benchmarks.cases import Config, Row
from benchmarks.ctranslate2_worker import token_names
from benchmarks.decoding import NEW, SOURCE, VOCAB, Tokens, marian_reference, precision_rows
from benchmarks.timing import compare, using_clock
from blockgraph.trainer.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID

ROOT = Path(__file__).resolve().parent.parent
BATCHES = (8, 32)
SPECIALS = {PAD_ID: "<blank>", BOS_ID: "<s>", EOS_ID: "</s>", UNK_ID: "<unk>", VOCAB - 1: "<pad>"}


class EngineError(Exception):
    """A conversion or a worker failed; the message says how."""


def what(search: str, batch: int | str) -> str:
    return f"decoding Marian {search} vs CTranslate2 (6+6, d_model 512, batch {batch}, source {SOURCE}, {NEW} new)"


def skipped(reason: str) -> list[Row]:
    return [
        Row(what("greedy and beam 4", " and ".join(map(str, BATCHES))), "CTranslate2", "blockgraph", skipped=reason)
    ]


def offline() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no output"


def prepare(folder: Path) -> None:
    """The checkpoint both engines load (Marian's, adjusted as the module says) and the sources they decode."""
    reference = marian_reference()
    with torch.no_grad():
        reference.model.shared.weight[BOS_ID] = 0.0
        reference.final_logits_bias[0, VOCAB - 1] = -1e4
    with contextlib.redirect_stderr(io.StringIO()):  # its progress bar
        reference.save_pretrained(folder / "marian")
    sources = torch.randint(4, VOCAB - 1, (max(BATCHES), SOURCE), generator=torch.Generator().manual_seed(1))
    settings = {"vocab": token_names(VOCAB, SPECIALS), "sources": sources.tolist(), "steps": NEW}
    (folder / "setup.json").write_text(json.dumps(settings), encoding="utf-8")


def convert(folder: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.ctranslate2_worker", "convert", str(folder)],
        cwd=ROOT, env=offline(), capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    if done.returncode:
        raise EngineError(f"CTranslate2's conversion failed: {last_line(done.stderr)}")


class Engine:
    """A decoding worker process: `call` is the timed order, `tokens` the untimed one that also warms it up."""

    def __init__(self, kind: str, folder: Path, threads: int):
        self.kind, self.log = kind, folder / f"{kind}.log"
        command = [sys.executable, "-m", "benchmarks.ctranslate2_worker", "serve", kind, str(folder), str(threads)]
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=offline(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True
            )
        self.precisions: list[str] = self._answer()["ready"]

    def _answer(self) -> dict[str, Any]:
        line = self.process.stdout.readline() if self.process.stdout else ""
        if not line:
            self.process.wait(timeout=60)
            raise EngineError(f"the {self.kind} worker stopped: {last_line(self.log.read_text(errors='replace'))}")
        return json.loads(line)

    def order(self, precision: str, beam: int, batch: int, tokens: bool = False) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"precision": precision, "beam": beam, "batch": batch, "tokens": tokens}))
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        return self._answer()

    def call(self, precision: str, beam: int, batch: int) -> Callable[[], object]:
        return lambda: self.order(precision, beam, batch)

    def tokens(self, precision: str, beam: int, batch: int) -> Tokens:
        return [tuple(t) for t in self.order(precision, beam, batch, tokens=True)["tokens"]]

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def ctranslate2_case(cfg: Config) -> list[Row]:
    """CTranslate2's and our tokens per second on the same batches, greedy and beam 4, float32 and each side's
    lower precisions (CTranslate2: int8; ours: bfloat16 and int8)."""
    if find_spec("ctranslate2") is None:  # found, not imported: its OpenMP runtime stays out of this process
        return skipped("skipped: ctranslate2 is not installed (pip install -e '.[bench]')")
    with tempfile.TemporaryDirectory(prefix="bench-ctranslate2-") as tmp, using_clock("wall"):
        folder = Path(tmp)
        prepare(folder)
        try:
            convert(folder)
            with contextlib.ExitStack() as stack:
                engines = []
                for kind in ("ctranslate2", "blockgraph"):
                    engines.append(Engine(kind, folder, torch.get_num_threads()))
                    stack.callback(engines[-1].close)
                return _measure(*engines, repeats=2 if cfg.quick else 3)
        except (EngineError, subprocess.TimeoutExpired) as exc:
            return skipped(f"skipped: {exc}")


def _measure(theirs: Engine, ours: Engine, repeats: int) -> list[Row]:
    rows = []
    note = f"; {torch.get_num_threads()} threads each, one process per engine; {repeats} rounds"
    for batch in BATCHES:
        for beam in (1, 4):
            engines = {"CTranslate2": theirs, "blockgraph": ours}
            calls = {f"{n} {p}": e.call(p, beam, batch) for n, e in engines.items() for p in e.precisions}
            tokens = {f"{n} {p}": e.tokens(p, beam, batch) for n, e in engines.items() for p in e.precisions}
            times = compare(calls, warmup=0, repeats=repeats)
            search = "greedy" if beam == 1 else f"beam {beam}"
            rows += precision_rows(what(search, batch), "CTranslate2", times, tokens, 1.0, note)
    return rows
