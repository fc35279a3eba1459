"""How long `inspect` takes, and how much memory, on models far larger than the machine.

    python benchmarks/bench_inspect.py             # the figures, as a table
    python benchmarks/bench_inspect.py --profile   # plus cProfile's hot spots of each case

Cases, each in a fresh Python process (so imports and one-time costs count, as they do for the CLI):

- `inspect gpt3_175b (FORMAT)`: load, validate, infer shapes, compile on `meta`, count FLOPs and memory, and
  render specs/gpt3_175b.yaml. Targets: under 5 s and under 1 GB.
- `validate+compile 1000 nodes`: a generated 1,000-node spec (linear, layer_norm and residual add nodes)
  through `typed_graph` and `compile_graph(device="meta")`. Target: under 1 s.

Time is measured twice: the whole process (what a user waits for, torch's import included) and the work
itself after the imports ("in-process", wall and CPU time), which is what the targets are about. FLOP
counting imports torch._dynamo the first time (torch wraps every dispatch mode's handler in a lazily
imported `torch._dynamo.disable`), which is part of "analyse". Memory: tracemalloc's peak
of Python allocations during the work (a separate run, since tracing slows it down) and the process's peak
resident set size (getrusage maxrss, torch's libraries included). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPT3 = ROOT / "specs" / "gpt3_175b.yaml"
TARGET_INSPECT_S, TARGET_MEMORY = 5.0, 1 << 30
TARGET_COMPILE_S = 1.0


def generated_spec(n: int = 1000, width: int = 32) -> dict:
    """A chain of `n` nodes: linear → layer_norm → add (residual around the pair), repeated."""
    nodes: dict[str, dict] = {}
    prev = "x"
    i = 0
    while len(nodes) < n:
        lin, norm, add = f"lin{i}", f"norm{i}", f"add{i}"
        nodes[lin] = {"type": "linear", "params": {"in_features": width, "out_features": width}, "in": prev}
        nodes[norm] = {"type": "layer_norm", "params": {"dim": width}, "in": lin}
        nodes[add] = {"type": "add", "in": [prev, norm]}
        prev, i = add, i + 1
    while len(nodes) > n:  # trim to exactly n without leaving a dangling node
        nodes.popitem()
    last = list(nodes)[-1]
    return {"name": f"generated-{n}", "inputs": {"x": {"shape": ["batch", width]}}, "nodes": nodes, "outputs": last}


def work(case: str, fmt: str) -> tuple[dict[str, float], int]:
    """Run one case after the imports; (seconds per stage, blocks)."""
    from rich.console import Console

    from blockgraph.builder import pipeline, views

    stages: dict[str, float] = {}
    start = time.perf_counter()
    typed = pipeline.typed_graph(GPT3 if case == "inspect" else generated_spec())
    stages["validate"] = time.perf_counter() - start
    start = time.perf_counter()
    model = pipeline.compile_graph(typed, device="meta")
    stages["compile"] = time.perf_counter() - start
    if case == "inspect":
        start = time.perf_counter()
        report = views.inspect_report(typed, model, fmt=fmt)
        stages["analyse"] = time.perf_counter() - start
        start = time.perf_counter()
        if not isinstance(report, str):
            Console(file=io.StringIO(), width=150).print(report)
        stages["print"] = time.perf_counter() - start
    return stages, len(typed.graph.nodes)


def child(case: str, fmt: str, trace: bool) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    started = time.perf_counter()
    import torch  # noqa: F401 - the import is part of what a user waits for

    import blockgraph.builder.views  # noqa: F401

    imported = time.perf_counter() - started
    if trace:
        tracemalloc.start()
    begin, cpu = time.perf_counter(), time.process_time()
    stages, blocks = work(case, fmt)
    seconds, cpu = time.perf_counter() - begin, time.process_time() - cpu
    peak = tracemalloc.get_traced_memory()[1] if trace else None
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(
        json.dumps(
            {
                "import": imported,
                "seconds": seconds,
                "cpu": cpu,
                "stages": stages,
                "peak": peak,
                "maxrss": maxrss,
                "blocks": blocks,
            }
        )
    )


def run_child(case: str, fmt: str, trace: bool) -> dict:
    command = [sys.executable, __file__, "--child", case, "--format", fmt] + (["--trace"] if trace else [])
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall"] = time.perf_counter() - started
    return result


def profile(case: str, fmt: str) -> None:
    profiler = cProfile.Profile()
    import blockgraph.builder.views  # noqa: F401 - imports outside the profile

    profiler.enable()
    work(case, fmt)
    profiler.disable()
    for order in ("cumulative", "tottime"):
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).strip_dirs().sort_stats(order).print_stats(18)
        print(f"--- {case} ({fmt}), by {order} ---")
        print("\n".join(line for line in out.getvalue().splitlines() if line.strip())[:6000])


def mib(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**20:,.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", choices=["inspect", "compile"], help=argparse.SUPPRESS)
    parser.add_argument("--format", default="tree", help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--formats", default="tree,table,json", help="inspect formats to time (comma-separated)")
    parser.add_argument("--profile", action="store_true", help="also print cProfile's hot spots of each case")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.format, args.trace)
        return

    import torch
    from rich.console import Console
    from rich.table import Table

    cases = [("inspect", fmt) for fmt in args.formats.split(",")] + [("compile", "-")]
    table = Table(title="blockgraph inspect benchmark", header_style="bold")
    columns = ("case", "process", "import", "in-process", "CPU", "stages", "target", "peak (tracemalloc)", "maxrss", "")
    for column in columns:
        table.add_column(column, justify="left" if column in ("case", "stages") else "right")
    for case, fmt in cases:
        timed = run_child(case, fmt, trace=False)
        traced = run_child(case, fmt, trace=True)
        target = TARGET_INSPECT_S if case == "inspect" else TARGET_COMPILE_S
        ok = timed["seconds"] < target and (case != "inspect" or timed["maxrss"] < TARGET_MEMORY)
        name = f"inspect gpt3_175b ({fmt})" if case == "inspect" else f"validate+compile {timed['blocks']:,} nodes"
        table.add_row(
            name,
            f"{timed['wall']:.2f} s",
            f"{timed['import']:.2f} s",
            f"{timed['seconds']:.2f} s",
            f"{timed['cpu']:.2f} s",
            ", ".join(f"{k} {v:.2f}" for k, v in timed["stages"].items()),
            f"< {target:g} s" + (", < 1 GB" if case == "inspect" else ""),
            mib(traced["peak"]),
            mib(timed["maxrss"]),
            "[green]ok[/]" if ok else "[red]missed[/]",
        )
    console = Console()
    console.print(table)
    console.print(
        f"torch {torch.__version__}, Python {sys.version.split()[0]}; "
        "'process' includes starting Python and importing torch; targets apply to 'in-process' (wall time); "
        f"'CPU' is that work's CPU time, less sensitive to other load (load average now {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} CPUs)."
    )
    if args.profile:
        for case, fmt in cases:
            profile(case, fmt)


if __name__ == "__main__":
    main()
