"""Interleaved timing: every contender runs once per round, so load changes hit all of them alike."""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


@dataclass
class Timing:
    """Seconds per call of one contender, one value per round."""

    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def use_clock(name: str) -> None:
    """`wall` (default) or `cpu`: process CPU time, which time spent preempted by other processes does not
    inflate; meaningful with one thread (`--threads 1`), since waiting threads may spin."""
    global clock
    clock = CLOCKS[name]


@contextlib.contextmanager
def using_clock(name: str) -> Iterator[None]:
    """`name`'s clock for a while: a case whose work runs in other processes needs the wall clock."""
    global clock
    before, clock = clock, CLOCKS[name]
    try:
        yield
    finally:
        clock = before


def compare(
    contenders: dict[str, Callable[[], object]], *, warmup: int, repeats: int, inner: int = 1
) -> dict[str, Timing]:
    """Median-ready timings of each callable: `warmup` untimed calls each, then `repeats` rounds.

    In a round every contender runs `inner` times back to back (the sample is the mean of those); the
    order of the contenders rotates from round to round so none is always first after a collection.
    """
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    timings = {name: Timing() for name in names}
    for round_ in range(repeats):
        gc.collect()
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            fn = contenders[name]
            start = clock()
            for _ in range(inner):
                fn()
            timings[name].samples.append((clock() - start) / inner)
    return timings


def paired_ratios(reference: Timing, ours: Timing) -> list[float]:
    """reference / ours round by round: their spread shows how noisy the machine was."""
    return [r / o for r, o in zip(reference.samples, ours.samples, strict=True)]
