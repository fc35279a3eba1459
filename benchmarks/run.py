"""`python -m benchmarks [--quick] [--only encoder,lstm] [--dtype bfloat16] [--profile encoder]`

Runs the cases of `cases.py`, prints a Rich table and writes `benchmarks/RESULTS.md`. Every figure is a
ratio reference time / blockgraph time measured in the same run (after a warm-up, rounds in which every
contender runs once; the median of the round-by-round ratios), so ≥ 1 means blockgraph is as fast or
faster. Text below the analysis marker in an existing RESULTS.md is kept: the hand-written explanation of
where the time goes.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from rich.console import Console
from rich.table import Table

from benchmarks import cases
from benchmarks.cases import Config, Row, profile_case
from benchmarks.ctranslate2_case import ctranslate2_case
from benchmarks.decoding import decoding_case
from benchmarks.mixed_precision import mixed_precision_case
from benchmarks.timing import use_clock
from benchmarks.vision import vit_case

CASES = {
    **cases.CASES,
    "bf16-mixed": mixed_precision_case,
    "decoding": decoding_case,
    "ctranslate2": ctranslate2_case,
    "vit": vit_case,
}
RESULTS = Path(__file__).parent / "RESULTS.md"
SCRATCH = Path(__file__).parent / "RESULTS-quick.md"  # quick or partial runs: untracked (.gitignore)
MARKER = "<!-- analysis: hand-written, kept when the tables above are regenerated -->"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[1])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (same sizes): about half the time")
    parser.add_argument("--repeats", type=int, default=None, help="rounds of the heavy cases (default 5, quick 3)")
    parser.add_argument("--only", default="", help=f"comma-separated cases: {', '.join(CASES)}")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="weights and activations")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall (default) or cpu: process CPU time, steadier on a busy machine; use it with --threads 1",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="markdown results file (default: RESULTS.md for a full run, RESULTS-quick.md with --quick or --only)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument(
        "--profile", metavar="CASE", help="print torch.profiler tables instead (encoder, encoder-inference, ...)"
    )
    args = parser.parse_args(argv)
    if args.out is None:  # the tracked figures come from full runs only
        args.out = SCRATCH if args.quick or args.only else RESULTS
    return args


def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "machine": f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": f"{torch.__version__} (MKL {torch.backends.mkl.is_available()}, "
        f"oneDNN {torch.backends.mkldnn.is_available()})",
        "threads": f"{torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op",
    }


def load() -> str:
    try:
        return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "n/a"


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def verdict(r: Row) -> str:
    return {True: "met", False: "MISSED", None: "—"}[r.met] if not r.skipped else "skipped"


def cells(r: Row) -> list[str]:
    ratio = "—" if r.ratio is None else f"{r.ratio:.3f}"
    spread = "—" if r.spread is None else f"{r.spread[0]:.2f}–{r.spread[1]:.2f}"
    note = r.skipped or r.note
    return [
        r.case,
        r.reference or "—",
        r.ours,
        fmt_time(r.ref_s),
        fmt_time(r.ours_s),
        ratio,
        spread,
        r.target_text,
        verdict(r),
        note,
    ]


HEADERS = ["case", "reference", "blockgraph", "ref time", "bg time", "ratio", "rounds", "target", "", "note"]


def rich_table(rows: list[Row], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for header in HEADERS:
        table.add_column(header, justify="right" if header in ("ref time", "bg time", "ratio", "rounds") else "left")
    for r in rows:
        style = {True: "green", False: "red"}.get(r.met, "")
        table.add_row(*cells(r), style=style)
    return table


def markdown(rows: list[Row], info: dict[str, str], cfg: Config, command: str, extra: str) -> str:
    lines = [
        "# Benchmark results",
        "",
        f"Generated by `{command}`; do not edit above the analysis "
        "marker. **ratio = reference time / blockgraph time**, measured in the same run (rounds interleaved, "
        f"median of {cfg.repeats} rounds for the heavy cases, {cfg.light_repeats}+ for the light ones, after a "
        "warm-up; each round runs every contender once, in rotating order): ≥ 1 means blockgraph is as fast or "
        "faster. *ratio* is the median of the round-by-round ratios, *rounds* their range (a measure of how noisy "
        "the machine was); the times are the medians of each contender.",
        "",
    ]
    lines += [f"- **{k}**: {v}" for k, v in info.items()]
    lines += [f"- **{k} dims**: {v}" for k, v in cfg.dims().items()]
    lines += ["", "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for r in rows:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells(r)) + " |")
    lines += ["", MARKER, extra.strip(), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    use_clock(args.clock)
    cfg = Config(quick=args.quick, dtype=DTYPES[args.dtype], rounds=args.repeats)
    console = Console(width=None if sys.stdout.isatty() else 220)
    if args.profile:
        for profiled in profile_case(cfg, args.profile):
            console.rule(profiled.name)
            console.print(profiled.table, markup=False, highlight=False)
        return 0
    wanted = [c.strip() for c in args.only.split(",") if c.strip()] or list(CASES)
    unknown = [c for c in wanted if c not in CASES]
    if unknown:
        console.print(f"[red]unknown case(s) {', '.join(unknown)}[/]; choose from {', '.join(CASES)}")
        return 2
    info = machine()
    info["dtype"] = args.dtype
    info["clock"] = {"wall": "wall time (perf_counter)", "cpu": "process CPU time"}[args.clock]
    info["date"] = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    load_before = load()
    started = time.perf_counter()
    rows: list[Row] = []
    for name in wanted:
        with console.status(f"running {name} …"):
            case_start = time.perf_counter()
            new = CASES[name](cfg)
        console.print(f"{name}: {time.perf_counter() - case_start:.0f} s")
        rows += new
    info["load average (1, 5, 15 min)"] = f"{load_before} before, {load()} after"
    info["wall time"] = f"{time.perf_counter() - started:.0f} s"
    for k, v in info.items():
        console.print(f"[bold]{k}[/]: {v}")
    console.print(rich_table(rows, "reference / blockgraph (≥ 1: blockgraph as fast or faster)"))
    if not args.no_write:
        previous = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
        extra = previous.split(MARKER, 1)[1] if MARKER in previous else ""
        args.out.write_text(
            markdown(
                rows, info, cfg, " ".join(["python -m benchmarks", *(sys.argv[1:] if argv is None else argv)]), extra
            ),
            encoding="utf-8",
        )
        console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
