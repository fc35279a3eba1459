"""Running blockgraph on hostile input safely: every run has a timeout and a memory cap, and is measured.

`bounded(...)` runs the command line in this process with an alarm (a hang becomes a failure after `timeout`
seconds), an address-space cap (a runaway allocation becomes a MemoryError, not an OOM kill of the machine),
and the kernel's peak-RSS counter reset before the run, so that the memory a case took can be asserted.
`in_process(...)` does the same for a piece of Python. `spawn(...)` runs the real `blockgraph` program in a
child process under the same caps (for kills and for two processes at once).
Every outcome is recorded in `FIGURES`, and the test session prints the worst time and memory of the corpus.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from blockgraph import builder, cli

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 20.0  # seconds for one case
MEMORY = 200  # MiB of peak resident memory one case may add
ADDRESS_SPACE = 2 << 30  # bytes of address space a case may add to the process before allocations fail
FIGURES: list[tuple[str, float, float]] = []  # (case, seconds, peak MiB)
NOTES: list[str] = []  # what else a case found worth printing at the end of the session


@dataclass
class Outcome:
    case: str
    code: int
    stdout: str
    stderr: str
    exception: BaseException | None
    seconds: float
    peak_mib: float
    value: Any = None

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


class Hung(Exception):
    """The case ran past its timeout."""


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise LookupError(field)


@contextlib.contextmanager
def _caps(case: str, timeout: float) -> Iterator[dict[str, float]]:
    """Alarm, address-space cap and a fresh peak-RSS counter around one case; yields its figures when done."""
    figures: dict[str, float] = {}
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = _status("VmRSS")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _status("VmSize") + ADDRESS_SPACE
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))

    def expire(signum: int, frame: Any) -> None:
        raise Hung(f"{case} ran longer than {timeout} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    started = time.perf_counter()
    try:
        yield figures
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        figures["seconds"] = time.perf_counter() - started
        figures["peak_mib"] = max(0, _status("VmHWM") - base) / 2**20
        FIGURES.append((case, figures["seconds"], figures["peak_mib"]))


def bounded(case: str, *args: Any, env: dict[str, str] | None = None, stdin: str | None = None,
            timeout: float = TIMEOUT) -> Outcome:  # fmt: skip
    """`blockgraph ARGS` in this process, under the caps."""
    runner = CliRunner()
    with _caps(case, timeout) as figures:
        result = runner.invoke(cli.app, [str(a) for a in args], input=stdin, env={"COLUMNS": "200", **(env or {})})
    exception = None if isinstance(result.exception, SystemExit) else result.exception
    return Outcome(case, result.exit_code, result.stdout, result.stderr, exception, **figures)


def in_process(case: str, call: Callable[[], Any], timeout: float = TIMEOUT) -> Outcome:
    """`call()` under the caps; a BlockgraphError it raises is the outcome (code 1), anything else escapes."""
    from blockgraph.common.errors import BlockgraphError

    value, error, code = None, None, 0
    with _caps(case, timeout) as figures:
        try:
            value = call()
        except BlockgraphError as exc:
            error, code = exc, 1
    return Outcome(case, code, "", str(error or ""), None, **figures, value=value)


def assert_clean(outcome: Outcome, code: int, *fragments: str, absent: tuple[str, ...] = ()) -> None:
    """The case ended with `code`, said each fragment, leaked none of `absent`, and stayed in time and memory."""
    text = " ".join(outcome.output.split())
    assert outcome.exception is None, f"{outcome.case}: {type(outcome.exception).__name__}: {outcome.exception}"
    assert "Traceback" not in outcome.output, outcome.output
    assert outcome.code == code, f"{outcome.case}: exit {outcome.code}\n{outcome.output}"
    for fragment in fragments:
        assert fragment in text, f"{outcome.case}: {fragment!r} not in: {text}"
    for secret in absent:
        assert secret not in outcome.output, f"{outcome.case}: leaked {secret!r}: {outcome.output}"
    assert "\x1b" not in outcome.output and "\x9b" not in outcome.output, f"{outcome.case}: raw escape"
    assert outcome.seconds < TIMEOUT
    assert outcome.peak_mib < MEMORY, f"{outcome.case}: peak {outcome.peak_mib:.0f} MiB"


def spawn(*args: Any, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
    """The real `blockgraph ARGS` in a child process, with an address-space cap; read it with `finish`."""

    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))

    command = [sys.executable, "-c", "from blockgraph import cli; cli.main()", *map(str, args)]
    return subprocess.Popen(
        command,
        cwd=cwd or ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=limits,
    )


def finish(case: str, process: subprocess.Popen, timeout: float = 60.0) -> Outcome:
    """Wait for a spawned process (killing it after `timeout` s) and measure its time and peak memory."""
    started = time.perf_counter()
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        return Outcome(case, -9, stdout, stderr, Hung(f"{case} ran longer than {timeout} s"), timeout, 0.0)
    seconds = time.perf_counter() - started
    FIGURES.append((case, seconds, float("nan")))  # a whole process: its memory is torch's, not the case's
    return Outcome(case, process.returncode, stdout, stderr, None, seconds, 0.0)


# --- what the cases attack ---------------------------------------------------------------------------------------

TRANSFORMER = ROOT / "specs" / "transformer.yaml"
TINY_SETS = {"d_model": 16, "heads": 2, "enc_layers": 1, "dec_layers": 1, "d_ff": 32, "dropout": 0.0}
SECRET = "SECRET-CANARY-7f3a"  # written into files a hostile spec or checkpoint points at; must never be printed

SPEC = """name: tiny
vars: {vocab: 20, d_model: 8}
dims: {batch: 2, seq: 5}
inputs:
  tokens: {dtype: int64, shape: [batch, seq], high: "${vocab}"}
nodes:
  embed: {type: token_embedding, params: {vocab: "${vocab}", dim: "${d_model}"PARAMS}, in: tokens}
  position: {type: sinusoidal_position, params: {dim: "${d_model}", max_len: 64}, in: embed}
  generator: {type: generator, params: {d_model: "${d_model}", vocab: "${vocab}"}, in: position}
outputs: generator
"""


def tiny_spec(
    folder: Path, name: str = "spec.yaml", embed_params: str = "", replace: dict[str, str] | None = None
) -> Path:
    """A small valid spec in `folder`; `embed_params` adds params to its embedding (`, pretrained: x.txt`),
    `replace` changes its text."""
    text = SPEC.replace("PARAMS", embed_params)
    for old, new in (replace or {}).items():
        text = text.replace(old, new)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def train_tiny(out: Path, **changes: Any) -> Path:
    """A two-step copy-task checkpoint of a 1+1-layer Transformer (a few seconds)."""
    from blockgraph.trainer.loop import TrainConfig, train

    settings = {
        "spec": str(TRANSFORMER),
        "overrides": TINY_SETS,
        "task": "copy",
        "task_options": {"symbols": 6, "min_len": 2, "max_len": 5, "train": 32, "valid": 8},
        "batch_size": 16,
        "max_steps": 2,
        "bleu_sentences": 0,
        **changes,
    }
    train(TrainConfig(**settings), out, quiet=True)
    return out


def canary_module(folder: Path, name: str = "evilmod") -> Path:
    """A module that, if anything ever imports it, leaves a marker file: code execution made visible."""
    marker = folder / f"{name}.ran"
    (folder / f"{name}.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n"
        "def run(text):\n    Path(__file__).with_suffix('.called').write_text(text)\n    return text.split()\n",
        encoding="utf-8",
    )
    return marker


# --- fixtures (imported by the case modules) -----------------------------------------------------------------


@pytest.fixture(scope="session")
def _trained(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return train_tiny(tmp_path_factory.mktemp("trained") / "run")


@pytest.fixture
def run_dir(_trained, tmp_path) -> Path:
    """A fresh copy of a small training run (RUN/checkpoint/...) for one case to tamper with."""
    return Path(shutil.copytree(_trained, tmp_path / "run"))


@pytest.fixture(scope="session")
def _saved(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("saved")
    return builder.save(builder.build(tiny_spec(folder)), folder / "model")


@pytest.fixture
def saved_model(_saved, tmp_path) -> Path:
    """A fresh copy of a small saved model (model.safetensors, spec.yaml, blockgraph.json)."""
    return Path(shutil.copytree(_saved, tmp_path / "model"))


@pytest.fixture
def canary(tmp_path, monkeypatch) -> Path:
    """An importable module `evilmod` whose import leaves `evilmod.ran`: the marker of code that ran."""
    folder = tmp_path / "pythonpath"
    folder.mkdir()
    marker = canary_module(folder)
    monkeypatch.syspath_prepend(str(folder))
    yield marker
    import sys

    sys.modules.pop("evilmod", None)
