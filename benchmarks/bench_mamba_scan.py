"""Mamba's selective scan: the `mamba` block's parallel scan against transformers' sequential one, in one run.

    python benchmarks/bench_mamba_scan.py [--quick] [--batch 1 4] [--seq 1024] [--device cpu|cuda]

At mamba-130m's layer shapes (d_model 768, d_inner 1536, d_state 16, d_conv 4, Δ rank 48), forward only, no
gradients, the same weights on both sides (transformers' MambaMixer as it initialises itself, copied into ours):

- **the scan**: Δ = softplus(δ + b), h_t = exp(Δ_t A) h_{t−1} + Δ_t B_t u_t, y_t = C_t·h_t + D u_t, gated by
  SiLU(z): transformers' `mamba_selective_scan`, a loop over the positions (its path without the CUDA kernels of
  `mamba_ssm`), against ours, `linear_scan` over chunks of positions (`Mamba.scanned`: on a CPU, as many as keep
  its tensors near 2¹⁹ values per row, 21 positions here);
- **the layer**: `MambaMixer.forward` (that loop, with its projections and convolution) against the `mamba`
  block's forward.

Each pair is checked to compute the same outputs first; times are medians of interleaved rounds
(benchmarks/timing.py), the ratio transformers / ours per round (≥ 1: ours is faster). Float32, one CPU
thread and the process's CPU time by default. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/bench_mamba_scan.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
import transformers
from rich.console import Console
from rich.table import Table
from transformers.models.mamba import modeling_mamba

from benchmarks.timing import compare, paired_ratios, use_clock
from blockgraph.blocks.state_space import Mamba

D_MODEL, D_STATE, D_CONV, EXPAND = 768, 16, 4, 2


def layers(device: str) -> tuple[Mamba, torch.nn.Module]:
    """Our block and transformers' mixer, with the mixer's weights."""
    config = transformers.MambaConfig(
        hidden_size=D_MODEL, state_size=D_STATE, conv_kernel=D_CONV, expand=EXPAND, num_hidden_layers=1
    )
    torch.manual_seed(0)
    reference = modeling_mamba.MambaMixer(config, layer_idx=0).to(device).eval()
    ours = Mamba(Mamba.Params(d_model=D_MODEL, d_state=D_STATE, d_conv=D_CONV, expand=EXPAND)).to(device).eval()
    ours.load_state_dict(reference.state_dict())
    return ours, reference


def scans(ours: Mamba, batch: int, seq: int, device: str) -> dict[str, Callable[[], torch.Tensor]]:
    """The selective scan alone on the same inputs, each side in its own layout: [batch, seq, d_inner] for ours,
    [batch, d_inner, seq] for transformers'."""
    generator = torch.Generator(device).manual_seed(1)
    d_inner = EXPAND * D_MODEL

    def drawn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device)

    u, delta, z = drawn(batch, seq, d_inner), drawn(batch, seq, d_inner) - 3, drawn(batch, seq, d_inner)
    b, c = drawn(batch, seq, D_STATE), drawn(batch, seq, D_STATE)
    a = -torch.exp(ours.A_log.float())
    bias, d = ours.dt_proj.bias, ours.D

    def theirs() -> torch.Tensor:
        y = modeling_mamba.mamba_selective_scan(
            u.transpose(1, 2), delta.transpose(1, 2), a, b.transpose(1, 2), c.transpose(1, 2), D=d,
            z=z.transpose(1, 2), delta_bias=bias, delta_softplus=True,
        )  # fmt: skip
        return y.transpose(1, 2)

    def mine() -> torch.Tensor:
        y, _ = ours.scanned(u, F.softplus(delta + bias), b, c, None)
        return (y + u * d) * F.silu(z)

    return {"transformers": theirs, "blockgraph": mine}


def timed(calls: dict[str, Callable[[], torch.Tensor]], repeats: int, device: str) -> dict[str, float]:
    """Medians of interleaved rounds and the median of the per-round ratios, after checking the outputs agree."""
    with torch.no_grad():
        difference = (calls["transformers"]() - calls["blockgraph"]()).abs().max().item()
        if difference > 1e-4:
            raise AssertionError(f"the two sides differ by {difference:.2e}: the timing would mean nothing")

        def synced(call: Callable[[], torch.Tensor]) -> Callable[[], None]:
            def run() -> None:
                call()
                if device == "cuda":
                    torch.cuda.synchronize()

            return run

        times = compare({name: synced(call) for name, call in calls.items()}, warmup=1, repeats=repeats)
    ratios = paired_ratios(times["transformers"], times["blockgraph"])
    return {
        "theirs": times["transformers"].median,
        "ours": times["blockgraph"].median,
        "ratio": statistics.median(ratios),
        "low": min(ratios),
        "high": max(ratios),
        "difference": difference,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds instead of 5")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="batch sizes (default 1 4)")
    parser.add_argument("--seq", type=int, default=1024, help="positions (default 1024)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: steadier)")
    parser.add_argument(
        "--clock", choices=["cpu", "wall"], default="cpu", help="cpu (default): process time, which time spent "
        "preempted by other processes does not inflate (with one thread); wall: needed for cuda"
    )  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    use_clock("wall" if args.device == "cuda" else args.clock)
    warnings.filterwarnings("ignore")  # transformers says, once per kernel, that it runs its PyTorch path
    modeling_mamba.logger.setLevel("ERROR")
    ours, reference = layers(args.device)
    table = Table(title=f"Mamba selective scan, seq {args.seq}, {args.device}", header_style="bold")
    for column in ("what", "batch", "transformers", "blockgraph", "transformers / blockgraph", "max |Δ|"):
        table.add_column(column)
    for batch in args.batch:
        x = torch.randn(batch, args.seq, D_MODEL, device=args.device)
        layer = {"transformers": lambda x=x: reference(x), "blockgraph": lambda x=x: ours(x)}
        for what, calls in (("scan", scans(ours, batch, args.seq, args.device)), ("layer forward", layer)):
            f = timed(calls, 3 if args.quick else 5, args.device)
            table.add_row(
                what, str(batch), f"{f['theirs'] * 1e3:.1f} ms", f"{f['ours'] * 1e3:.1f} ms",
                f"{f['ratio']:.2f} ({f['low']:.2f}–{f['high']:.2f})", f"{f['difference']:.1e}",
            )  # fmt: skip
    Console(width=120).print(table)
    sizes = f"d_model {D_MODEL}, d_inner {EXPAND * D_MODEL}, d_state {D_STATE}"
    print(f"{args.threads} thread(s), {args.clock} clock; {sizes}")


if __name__ == "__main__":
    main()
