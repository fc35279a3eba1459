"""Whether training (or consolidating a sharded checkpoint) fits this machine, checked before anything is
allocated: the weights, gradients and Adam's moments one process holds (builder.footprint), against what
its device has left (common.memory). Processes that share this machine's memory (`train --nproc N` on the
CPU) each count. And whether a batch of `translate`/`generate` fits, measured by decoding its first steps on
a meta copy of the model.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from blockgraph.builder import footprint, persist
from blockgraph.builder.compile import compile_graph
from blockgraph.builder.pipeline import typed_graph
from blockgraph.builder.shapes import TypedGraph
from blockgraph.common import memory
from blockgraph.common.errors import BlockgraphError
from blockgraph.trainer import checkpoint, decode
from blockgraph.trainer.config import TrainConfig
from blockgraph.trainer.distributed import Context


def check_training(typed: TypedGraph, config: TrainConfig, context: Context) -> None:
    """Refuse a training run of `typed` that would not fit in the memory left to this process."""
    if not footprint.checking(context.device):
        return
    need = footprint.training_need(
        typed, device=context.device, strategy=config.strategy, world=context.world, local=_local(),
        compute_dtype=config.compute_dtype,
    )  # fmt: skip
    footprint.check(need, hint=footprint.TRAIN_ADVICE)


def check_checkpoint(path: str | Path, context: Context, *, action: str = "resuming training") -> None:
    """Refuse to go on training (or to consolidate) the checkpoint at `path` where its model, gradients and Adam's
    moments would not fit. A checkpoint that cannot be read is left for its loading to report."""
    if not footprint.checking(context.device):
        return
    try:
        directory = checkpoint.locate(path)
        sharded = checkpoint.is_sharded(directory)
        spec = directory / (checkpoint.SHARDED_SPEC if sharded else f"{checkpoint.MODEL}/{persist.SPEC}")
        typed = typed_graph(persist.saved_spec(spec))
    except BlockgraphError:
        return
    strategy = "fsdp" if sharded else "ddp"
    need = footprint.training_need(
        typed, device=context.device, strategy=strategy, world=context.world, local=_local(), action=action
    )
    footprint.check(need, hint=footprint.TRAIN_ADVICE)


def _local() -> int:
    """The processes of this run on this machine (torchrun's LOCAL_WORLD_SIZE), this one included."""
    text = os.environ.get("LOCAL_WORLD_SIZE", "")
    return int(text) if text.isdigit() and int(text) >= 1 else 1


class DecodingGuard:
    """Refuses a batch of `translate`/`generate` whose decoding would not fit in the memory left on the decoder's
    device, measured by decoding its first two steps (where the caches reach their whole size) on a copy of
    the model on meta, built at the first batch checked. A model that cannot decode on meta goes unchecked."""

    def __init__(self, decoder: decode.Decoder):
        self.decoder = decoder
        self._meta: decode.Decoder | None = None
        self._fitted: list[tuple[int, int, int, int]] = []  # sizes that fitted: a batch no larger needs no new run

    def check(
        self, *, sentences: int, rows: int, src_len: int | None, prompt: int, most: int, features: tuple[int, ...] = ()
    ) -> None:
        """`rows` decode together (the sentences times the beam), sources of `src_len` tokens (padded), or of
        float `features` of this shape each (an utterance's mel × frames), or prompts of `prompt`, `most` new tokens
        at most."""
        device = self.decoder.device
        size = (rows, src_len or (math.prod(features) if features else 0), prompt, most)
        if any(all(a <= b for a, b in zip(size, fitted, strict=True)) for fitted in self._fitted):
            return  # the peak only grows with each of these
        if memory.skip_requested() or memory.available(device) is None:
            return
        try:
            meta = self._meta = self._meta or _on_meta(self.decoder)
            budget = 2 * footprint.op_budget(meta.model.typed_graph)
            with torch.no_grad(), footprint.MetaPeak(meta.model, budget=budget) as peak:
                sources = _ids(rows, src_len) if src_len is not None else None
                if features:
                    dtype = next(p.dtype for p in meta.model.parameters() if p.is_floating_point())
                    sources = torch.zeros(rows, *features, dtype=dtype, device="meta")
                masks = torch.zeros(rows, src_len, dtype=torch.bool, device="meta") if src_len is not None else None
                begin = _ids(rows, len(meta.specials.start) + prompt)  # the start tokens, then the prompt
                state = meta.start(sources, masks if meta.roles.src_pad is not None else None, begin.size(1) + most)
                totals = meta.next_log_probs(state, begin).double()  # beam search's totals, alive over a step
                meta.next_log_probs(state, _ids(rows, 1))
                del totals
        except Exception:  # a block that reads values (a packed recurrence): nothing measured, nothing refused
            return
        batch = f"a batch of {sentences} sentence{'s' if sentences != 1 else ''}"
        need = footprint.Need(f"decoding {batch}", {"decoding": peak.peak}, device)
        footprint.check(need, hint=f"decode fewer at once (--batch-size {max(1, sentences // 2)}) or a smaller --beam")
        self._fitted.append(size)


def _on_meta(decoder: decode.Decoder) -> decode.Decoder:
    """`decoder` with its model built again on meta, in its dtype."""
    model = decoder.model
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    layout = compile_graph(model.typed_graph, device="meta", dtype=dtype).eval()
    return decode.Decoder(layout, decoder.roles, specials=decoder.specials)


def _ids(rows: int, length: int) -> torch.Tensor:
    return torch.zeros(rows, length, dtype=torch.long, device="meta")
