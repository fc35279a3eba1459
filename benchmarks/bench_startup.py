"""How long the command line takes to answer, each command a fresh process, against importing torch alone.

    python benchmarks/bench_startup.py [--runs 5]

`--help`, `--version` and shell completion load neither torch nor the blocks (the trainer and builder are
imported by the commands that use them); `validate` and `inspect` must load torch, so their yardstick is
`python -c "import torch"` measured in the same run: a ratio near 1 says the command costs little beyond
torch's own import. Each figure is the median wall time of `--runs` runs after one warm-up. Not part of the
test suite.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-c", "from blockgraph import cli; cli.app()"]
CASES = {
    "blockgraph --help": [*CLI, "--help"],
    "blockgraph --version": [*CLI, "--version"],
    "blockgraph train --help": [*CLI, "train", "--help"],
    "blockgraph validate specs/transformer.yaml": [*CLI, "validate", "specs/transformer.yaml"],
    "blockgraph inspect specs/transformer.yaml": [*CLI, "inspect", "specs/transformer.yaml"],
}
TORCH = [sys.executable, "-c", "import torch"]


def median_wall(command: list[str], runs: int) -> float:
    """The median wall time of `runs` runs of `command` (after a warm-up), in seconds."""
    times = []
    for index in range(runs + 1):
        started = time.perf_counter()
        subprocess.run(command, cwd=ROOT, capture_output=True, check=True, timeout=600)
        if index:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    torch_s = median_wall(TORCH, args.runs)
    table = Table(title=f"start-up, median of {args.runs} runs", header_style="bold")
    for column in ("command", "wall s", "vs import torch"):
        table.add_column(column, justify="left" if column == "command" else "right")
    table.add_row("python -c 'import torch'", f"{torch_s:.2f}", "1.00")
    for name, command in CASES.items():
        seconds = median_wall(command, args.runs)
        table.add_row(name, f"{seconds:.2f}", f"{seconds / torch_s:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
