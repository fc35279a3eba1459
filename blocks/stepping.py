"""Decoding one step at a time: what a block keeps between steps, and how it says it can step at all.

A decoder generates a sequence position by position. Re-running the whole model on the growing prefix is
exact but repeats all earlier work; instead, every block on the path from the growing input (the target
tokens) declares, next to its shape rule, how it handles only the new positions (`Block.stepping`):

- `"positions"`: the outputs at a position depend only on the inputs at that position (embeddings, norms,
  feed-forwards, the generator): a step runs `forward` on the new positions alone;
- `"state"`: the block keeps what it needs in a `StepCache` and implements `step(cache, ...)` with the ports
  of `forward`, where each growing port holds only the new positions and every other port its whole tensor:
  causal self-attention keeps its keys and values, cross-attention the memory's, a position table its offset,
  a recurrence its state;
- `None`: it cannot (bidirectional self-attention over the target, pooling over positions): the model is
  re-run at every step instead.

A block says each thing once: `forward` and `step` call one body, which takes as arguments what a step
changes (the position of the first new query, the keys or the state so far); `forward` passes what a whole
sequence starts from (position 0, its own keys, the initial state), and `step` what its cache holds, so that
a step is the cache's bookkeeping and nothing else (`DecoderLayer.layer`, `PositionTable.added`).

A step may bring several positions at once (a prompt), then one at a time. Every tensor a cache holds is
batch-first, so that beam search can reorder the rows of all caches with one index.

Beam search decodes `width` hypotheses of every source side by side: the rows of a step are sources × width,
source-major. What a block computed once from a fixed input (`once`: the memory's keys and values) has one row
per source and is shared by its hypotheses, never copied or reordered per step; a block that says it reads
fixed inputs per source (`Block.shares_fixed`) attends with its rows grouped by source (`grouped`,
`ungrouped`). The decoder reorders the growing state by hypothesis and the fixed state only when a source
leaves the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

import torch

Stepping = Literal["positions", "state"]


class StepCache:
    """What one block keeps from one decoding step to the next, for every row of the batch.

    `ports` maps each connected input port to whether it grows (holds new positions each step) or is fixed
    (the encoder's memory, a source mask). `capacity` is the most positions the decoding will reach: buffers
    that grow (keys, values) are allocated once at that size. `length` counts the positions seen so far; the
    block advances it.
    """

    def __init__(self, capacity: int, ports: Mapping[str, bool]):
        self.capacity = capacity
        self.ports = dict(ports)
        self.length = 0
        self.tensors: dict[str, torch.Tensor] = {}
        self.filled: dict[str, tuple[int, int]] = {}  # name → (dim, positions written) of a growing buffer
        self.fixed: set[str] = set()  # tensors computed once from fixed inputs: one row per source
        self.width = 1  # hypotheses per source: the rows of the growing tensors are sources × width
        self.children: dict[str, StepCache] = {}

    def advance(self, positions: int) -> int:
        """Count `positions` new positions as seen; the first one's index (what `forward` calls 0)."""
        start = self.length
        self.length += positions
        return start

    def once(self, name: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The tensor `name`, computed at the first step and kept for the later ones (a fixed input's projection)."""
        if name not in self.tensors:
            self.tensors[name] = compute()
            self.fixed.add(name)
        return self.tensors[name]

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        """[sources × width, length, …] → [sources, width × length, …]: each source's hypotheses as one row, to
        attend the source's fixed tensors once."""
        if self.width == 1:
            return x
        return x.reshape(x.size(0) // self.width, self.width * x.size(1), *x.shape[2:])

    def ungrouped(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of `grouped`."""
        if self.width == 1:
            return x
        return x.reshape(x.size(0) * self.width, x.size(1) // self.width, *x.shape[2:])

    def grows(self, port: str) -> bool:
        """Whether `port` is connected and brings new positions at every step."""
        return self.ports.get(port, False)

    def child(self, name: str, ports: Mapping[str, bool]) -> StepCache:
        """The cache of a sub-module (a layer's attention), created at the first step."""
        if name not in self.children:
            self.children[name] = StepCache(self.capacity, ports)
            self.children[name].width = self.width
        return self.children[name]

    def extend(self, name: str, new: torch.Tensor, dim: int) -> torch.Tensor:
        """Append `new` to the buffer `name` along `dim`; the part written so far, new positions included.

        The buffer is allocated at `capacity` positions the first time (twice as many if a step goes beyond).
        """
        buffer = self.tensors.get(name)
        written = self.filled[name][1] if buffer is not None else 0
        total = written + new.size(dim)
        if buffer is None or total > buffer.size(dim):
            shape = list(new.shape)
            shape[dim] = max(self.capacity, 2 * total if buffer is not None else total)
            grown = new.new_empty(shape)
            if buffer is not None:
                grown.narrow(dim, 0, written).copy_(buffer.narrow(dim, 0, written))
            buffer = self.tensors[name] = grown
        buffer.narrow(dim, written, new.size(dim)).copy_(new)
        self.filled[name] = (dim, total)
        return buffer.narrow(dim, 0, total)

    def ring(self, name: str, new: torch.Tensor, dim: int, size: int, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A sliding window's keys: only the last `size` positions are kept, position p in slot p % size, so the
        memory stops growing at the window. Returns what the new positions (`start`, start + 1, …) attend, and
        the position of each of its entries along `dim` (`UNWRITTEN` for a slot not yet written): one new
        position attends the slots after it is written into them; several attend the slots as they were,
        followed by themselves, and then the last `size` of them are written."""
        buffer = self.tensors.get(name)
        if buffer is None:
            shape = list(new.shape)
            shape[dim] = size
            buffer = self.tensors[name] = new.new_zeros(shape)
        count = new.size(dim)
        if count == 1:
            buffer.narrow(dim, start % size, 1).copy_(new)
            return buffer, slot_positions(start + 1, size, new.device)
        seen = torch.cat((buffer, new), dim=dim)
        positions = torch.cat(
            (slot_positions(start, size, new.device), torch.arange(start, start + count, device=new.device))
        )
        kept = min(count, size)
        slots = torch.arange(start + count - kept, start + count, device=new.device) % size
        buffer.index_copy_(dim, slots, new.narrow(dim, count - kept, kept))
        return seen, positions

    def reorder(self, index: torch.Tensor, sources: torch.Tensor | None = None, width: int = 1) -> None:
        """Keep rows `index` (in that order, repeats allowed) of every growing tensor, here and in the children,
        and rows `sources` of the fixed ones (None: the same sources); `width` hypotheses per source follow."""
        for name, tensor in self.tensors.items():
            if name in self.fixed:
                if sources is not None:
                    self.tensors[name] = tensor.index_select(0, sources)
            elif name in self.filled:  # only the written part of a growing buffer is moved, once, into a new one
                dim, written = self.filled[name]
                fresh = tensor.new_empty((len(index), *tensor.shape[1:]))
                torch.index_select(tensor.narrow(dim, 0, written), 0, index, out=fresh.narrow(dim, 0, written))
                self.tensors[name] = fresh
            else:
                self.tensors[name] = tensor.index_select(0, index)
        self.width = width
        for child in self.children.values():
            child.reorder(index, sources, width)

    def nbytes(self) -> int:
        """Bytes held by this cache and its children (allocated buffers, not just their written part)."""
        own = sum(t.numel() * t.element_size() for t in self.tensors.values())
        return own + sum(child.nbytes() for child in self.children.values())


UNWRITTEN = torch.iinfo(torch.int64).min // 2  # the position of a ring slot not yet written: outside every window


def slot_positions(length: int, size: int, device: torch.device) -> torch.Tensor:
    """The position held by each of a ring's `size` slots after `length` positions were written into it."""
    slot = torch.arange(size, device=device)
    held = slot + size * torch.div(length - 1 - slot, size, rounding_mode="floor")
    return torch.where(slot < length, held, UNWRITTEN)


@classmethod  # type: ignore[misc]
def by_position(cls: type, params: object, ports: Mapping[str, bool]) -> Stepping:
    """Each position's outputs depend on that position's inputs alone. A block says `stepping = by_position`."""
    return "positions"
