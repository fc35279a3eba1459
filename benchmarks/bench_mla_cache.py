"""Multi-head latent attention's decoding cache: the latent against expanded keys and values, bytes and time.

    python benchmarks/bench_mla_cache.py [--quick]

- **DeepSeek-V3 shapes** (its published config: 61 layers, 128 heads, kv_lora_rank 512, qk_nope 128, qk_rope 64,
  v 128): the cache's bytes per token, the latent with the rotary key (what `multi_head_latent_attention`
  caches) against every head's key and value, in bfloat16. Arithmetic, nothing runs.
- **A measured decode**: one attention layer at DeepSeek-V2-Lite's shapes (d_model 2048, 16 heads, no query
  latent, the same latent and head widths), batch 4, a prompt of 512 positions, then 32 single steps: the bytes
  our step cache holds, and those of a reference decoder with the same weights that caches the expanded keys
  and values (as `multi_head_attention` would); the median time of a step of each, and the largest difference
  of their outputs.
- **A long prompt**: the layer's forward over 2048 positions, expanding the keys and values (what `forward`
  picks for a whole sequence) against attending in the latent space.

Float32 on the CPU, one thread by default; steps timed alternately, the prompt in interleaved rounds
(benchmarks/timing.py). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/bench_mla_cache.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from benchmarks.timing import clock, compare
from blockgraph.blocks.latent_attention import MultiHeadLatentAttention
from blockgraph.blocks.stepping import StepCache

V3 = {
    "layers": 61,
    "heads": 128,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
}
LITE = {
    "d_model": 2048,
    "heads": 16,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "causal": True,
}
BATCH, PROMPT, STEPS, LONG = 4, 512, 32, 2048


def per_token(shapes: dict[str, int], bytes_per_value: int = 2) -> tuple[int, int]:
    """Cache bytes per token over all layers: (latent and rotary key, expanded keys and values)."""
    latent = shapes["kv_lora_rank"] + shapes["qk_rope_head_dim"]
    key = shapes["qk_nope_head_dim"] + shapes["qk_rope_head_dim"]
    expanded = shapes["heads"] * (key + shapes["v_head_dim"])
    return shapes["layers"] * latent * bytes_per_value, shapes["layers"] * expanded * bytes_per_value


class ExpandedDecoder:
    """The reference: the same layer decoding with every head's key and value cached (preallocated)."""

    def __init__(self, layer: MultiHeadLatentAttention, batch: int, capacity: int):
        self.layer, self.length = layer, 0
        heads, nope, rope, v = layer.heads, layer.nope, layer.rope, layer.v_dim
        self.keys = torch.empty(batch, heads, capacity, nope + rope)
        self.values = torch.empty(batch, heads, capacity, v)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        layer, start, t = self.layer, self.length, x.size(1)
        q_nope, q_rope, latent = layer.projected(start, x, None)
        c, k_rope = latent.split([layer.rank, layer.rope], dim=-1)
        kv = layer.kv_b_proj(c).view(x.size(0), t, layer.heads, -1).transpose(1, 2)
        k_nope, v = kv.split([layer.nope, layer.v_dim], dim=-1)
        self.keys[:, :, start : start + t] = torch.cat((k_nope, k_rope[:, None].expand(-1, layer.heads, -1, -1)), -1)
        self.values[:, :, start : start + t] = v
        self.length += t
        q = torch.cat((q_nope, q_rope), dim=-1)
        keys, values = self.keys[:, :, : self.length], self.values[:, :, : self.length]
        y = F.scaled_dot_product_attention(q, keys, values, is_causal=t > 1, scale=layer.scale)
        return layer.o_proj(y.transpose(1, 2).reshape(x.size(0), t, -1))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))


def measured(repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    layer = MultiHeadLatentAttention(MultiHeadLatentAttention.Params(**LITE)).eval()
    x = torch.randn(BATCH, PROMPT + STEPS, LITE["d_model"])
    capacity = PROMPT + STEPS
    ours, theirs = StepCache(capacity, {"x": True}), ExpandedDecoder(layer, BATCH, capacity)
    latent_steps, expanded_steps = [], []
    with torch.no_grad():
        difference = (layer.step(ours, x[:, :PROMPT]) - theirs.step(x[:, :PROMPT])).abs().max().item()
        for position in range(PROMPT, PROMPT + STEPS):  # each position once in each decoder, alternating first
            new = x[:, position : position + 1]
            timed = {}
            for name in ("latent", "expanded") if position % 2 else ("expanded", "latent"):
                start = clock()
                timed[name] = layer.step(ours, new) if name == "latent" else theirs.step(new)
                (latent_steps if name == "latent" else expanded_steps).append(clock() - start)
            difference = max(difference, (timed["latent"] - timed["expanded"]).abs().max().item())
        long = torch.randn(1, LONG, LITE["d_model"])
        absorbing = MultiHeadLatentAttention(MultiHeadLatentAttention.Params(**LITE)).eval()
        absorbing.load_state_dict(layer.state_dict())
        absorbing.absorbs = lambda p, queries, keys: True  # type: ignore[method-assign]  # this instance only
        prompt = compare(
            {"expanded": lambda: layer(long), "absorbed": lambda: absorbing(long)}, warmup=1, repeats=repeats
        )
    return {
        "difference": difference,
        "ours_bytes": ours.nbytes(),
        "expanded_bytes": theirs.nbytes(),
        "latent_step": statistics.median(latent_steps),
        "expanded_step": statistics.median(expanded_steps),
        "prompt_expanded": prompt["expanded"].median,
        "prompt_absorbed": prompt["absorbed"].median,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of the prompt instead of 5")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: steadier)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    latent, expanded = per_token(V3)
    f = measured(3 if args.quick else 5)
    table = Table(title="multi-head latent attention: latent vs expanded keys and values", header_style="bold")
    for column in ("measure", "latent", "expanded", "expanded / latent"):
        table.add_column(column)
    table.add_row("V3 cache per token, 61 layers, bf16", f"{latent / 1024:.1f} KiB", f"{expanded / 1024:.1f} KiB",
                  f"{expanded / latent:.1f}")  # fmt: skip
    table.add_row(
        f"V2-Lite layer cache, {BATCH} × {PROMPT + STEPS}",
        f"{f['ours_bytes'] / 2**20:.2f} MiB",
        f"{f['expanded_bytes'] / 2**20:.2f} MiB",
        f"{f['expanded_bytes'] / f['ours_bytes']:.1f}",
    )
    table.add_row(
        f"V2-Lite layer step after {PROMPT}",
        f"{f['latent_step'] * 1e3:.2f} ms",
        f"{f['expanded_step'] * 1e3:.2f} ms",
        f"{f['expanded_step'] / f['latent_step']:.2f}",
    )
    table.add_row(
        f"V2-Lite layer forward, {LONG} positions",
        f"{f['prompt_absorbed'] * 1e3:.0f} ms",
        f"{f['prompt_expanded'] * 1e3:.0f} ms (forward's way)",
        f"{f['prompt_expanded'] / f['prompt_absorbed']:.2f}",
    )
    Console(width=120).print(table)
    print(f"largest difference between the two decoders' outputs: {f['difference']:.2e} ({args.threads} thread(s))")


if __name__ == "__main__":
    main()
