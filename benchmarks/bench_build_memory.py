"""Peak memory of building specs/transformer.yaml vs the same model from torch.nn, each in a fresh process.

The figure is the peak RSS during construction minus the RSS just before it (the kernel's peak counter is
reset after imports), so library imports do not count. Both models hold the same weights and the same two
sinusoidal position tables. Run: `python benchmarks/bench_build_memory.py`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "specs" / "transformer.yaml"

MEASURE = """
import gc, json, math, re, sys
import torch
from torch import nn

def rss_kib(field):
    return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

def sinusoids(max_len, dim):
    pe = torch.zeros(max_len, dim)
    position = torch.arange(max_len).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, dim, 2) * -(math.log(10000.0) / dim))
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    return pe

which = sys.argv[1]
if which == "blockgraph":
    from blockgraph import builder
    typed = builder.typed_graph(sys.argv[2])
gc.collect()
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
before = rss_kib("VmRSS")
if which == "blockgraph":
    model = builder.compile_graph(typed)
else:
    v = json.loads(sys.argv[2])
    model = nn.ModuleDict({
        "core": nn.Transformer(v["d_model"], v["heads"], v["enc_layers"], v["dec_layers"], v["d_ff"], batch_first=True),
        "src": nn.Embedding(v["src_vocab"], v["d_model"]),
        "tgt": nn.Embedding(v["tgt_vocab"], v["d_model"]),
        "gen": nn.Linear(v["d_model"], v["tgt_vocab"]),
    })
    model.register_buffer("src_pe", sinusoids(5000, v["d_model"]), persistent=False)
    model.register_buffer("tgt_pe", sinusoids(5000, v["d_model"]), persistent=False)
peak = rss_kib("VmHWM")
params = sum(p.numel() for p in model.parameters())
print(json.dumps({"kib": peak - before, "params": params}))
"""


def measure(which: str, arg: str) -> dict:
    result = subprocess.run([sys.executable, "-c", MEASURE, which, arg], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    from blockgraph import builder

    config = builder.load_spec(SPEC).spec.vars
    runs = [(measure("torch.nn", json.dumps(config)), measure("blockgraph", str(SPEC))) for _ in range(3)]
    reference = min(r[0]["kib"] for r in runs)
    ours = min(r[1]["kib"] for r in runs)
    table = Table(title="build peak memory: specs/transformer.yaml (6+6, d_model 512) vs torch.nn")
    for column in ("contender", "parameters", "peak RSS growth", "ratio to torch.nn"):
        table.add_column(column)
    table.add_row("torch.nn", f"{runs[0][0]['params']:,}", f"{reference / 1024:.1f} MiB", "1.000")
    table.add_row("blockgraph", f"{runs[0][1]['params']:,}", f"{ours / 1024:.1f} MiB", f"{ours / reference:.3f}")
    Console().print(table)
    Console().print("target: within 5% (ratio ≤ 1.05); best of 3 fresh processes each")


if __name__ == "__main__":
    main()
