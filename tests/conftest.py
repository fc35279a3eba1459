"""Shared test helpers: run the CLI in-process, write spec files, build specs from mappings."""

from __future__ import annotations

import contextlib
import functools
import resource
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

pytest.register_assert_rewrite("harness")  # the hostile corpus' helpers (tests/hostile/harness.py)

from blockgraph import cli  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str
    exception: BaseException | None


@pytest.fixture
def run_cli():
    """Invoke `blockgraph ARGS...` in-process; returns exit code, stdout and stderr separately."""
    runner = CliRunner()

    def run(*args: str, env: dict[str, str] | None = None) -> CliResult:
        result = runner.invoke(cli.app, [str(a) for a in args], env={"COLUMNS": "200", **(env or {})})
        exception = result.exception if not isinstance(result.exception, SystemExit) else None
        return CliResult(result.exit_code, result.stdout, result.stderr, exception)

    return run


@pytest.fixture
def write_spec(tmp_path: Path):
    """Write a spec (a mapping, dumped as YAML, or raw text) to a temporary file and return its path."""

    def write(content: dict | str, name: str = "spec.yaml") -> Path:
        path = tmp_path / name
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))
        return path

    return write


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def file_size_limit():
    """A real write failure: within the block, files of this process may not grow beyond N bytes (EFBIG)."""

    @contextlib.contextmanager
    def limit(n: int):
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, handler)

    return limit


def pytest_terminal_summary(terminalreporter) -> None:
    """The hostile corpus' figures: how many cases ran, and the slowest and the most memory-hungry."""
    harness = sys.modules.get("harness")
    figures = getattr(harness, "FIGURES", None)
    if not figures:
        return
    slowest = max(figures, key=lambda f: f[1])
    measured = [f for f in figures if f[2] == f[2]]
    hungriest = max(measured, key=lambda f: f[2]) if measured else None
    line = f"hostile corpus: {len(figures)} runs; slowest {slowest[1]:.2f} s ({slowest[0]})"
    if hungriest is not None:
        line += f"; most memory {hungriest[2]:.1f} MiB peak RSS added ({hungriest[0]})"
    terminalreporter.write_line(line)
    for note in harness.NOTES:
        terminalreporter.write_line(f"hostile corpus: {note}")


@functools.cache
def _meta_model(path: Path) -> torch.nn.Module:
    from blockgraph import builder

    return builder.build(path, device="meta")


def meta_model(path: Path) -> torch.nn.Module:
    """A shipped spec at its defaults built on meta, once per test session (DeepSeek-V3's 15,000 experts take
    seconds to lay out): read it, never change it."""
    return _meta_model(Path(path).resolve())


def redraw(model: torch.nn.Module, seed: int) -> None:
    """Every parameter and saved floating buffer drawn again: matrices and biases N(0, 0.05²), gains N(1, 0.1²).

    Buffers that are not saved (rotary frequencies, causal masks) are computed from the config: they stay.
    """
    generator = torch.Generator().manual_seed(seed)
    saved = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, tensor in saved.items():
            if not tensor.is_floating_point() or (isinstance(tensor, torch.nn.Parameter) and not tensor.requires_grad):
                continue  # a frozen table (Marian's sinusoidal positions) is computed, not learned
            values = torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
            gain = tensor.dim() == 1 and name.endswith("weight")
            tensor.copy_(1 + 0.1 * values if gain else 0.05 * values)


@pytest.fixture
def restored_registry():
    """Blocks registered during the test (plugins, test blocks) are gone after it."""
    from blockgraph.blocks import REGISTRY

    entries, plugins = dict(REGISTRY._entries), dict(REGISTRY.plugins)
    yield REGISTRY
    REGISTRY._entries, REGISTRY.plugins = entries, plugins


def assert_well_formed_dot(text: str):
    """Parse a Graphviz drawing with pydot and check that every edge joins drawn nodes; returns the graph."""
    import pydot

    (graph,) = pydot.graph_from_dot_data(text)
    names, pending = set(), [graph]
    while pending:
        sub = pending.pop()
        names |= {n.get_name().strip('"') for n in sub.get_nodes()}
        pending += sub.get_subgraphs()
    edges = [(e.get_source().strip('"'), e.get_destination().strip('"')) for e in graph.get_edges()]
    assert edges and all(s in names and d in names for s, d in edges)
    return graph


def tiny_reverse_config(**changes: object):
    """A 1+1-layer, 16-wide Transformer learning to reverse 6 symbols: a training run of a few seconds."""
    from blockgraph.trainer.config import TrainConfig

    settings = {
        "spec": str(SPECS / "transformer.yaml"),
        "overrides": {"d_model": 16, "heads": 2, "enc_layers": 1, "dec_layers": 1, "d_ff": 32, "dropout": 0.1},
        "task": "reverse",
        "task_options": {"symbols": 6, "min_len": 2, "max_len": 5, "train": 96, "valid": 16},
        "batch_size": 16,
        "lr": 2e-3,
        "warmup": 10,
        "seed": 3,
        "bleu_sentences": 8,
    }
    return TrainConfig(**{**settings, **changes})
