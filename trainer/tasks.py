"""Synthetic sequence-to-sequence tasks that need no data: copy and reverse random token sequences.

Sequences are drawn from `symbols` tokens named `0`, `1`, ... with lengths uniform in [min_len, max_len],
from a generator seeded with `seed`, so the same options always give the same examples. The pairs are
written as space-separated text, and read with the `space` tokenizer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from common.errors import DataError, Problem

TASKS = ("copy", "reverse")


@dataclass(frozen=True)
class TaskOptions:
    symbols: int = 10
    min_len: int = 3
    max_len: int = 8
    train: int = 2000
    valid: int = 200

    def to_json(self) -> dict[str, int]:
        return asdict(self)


def parse_options(text: str | None) -> TaskOptions:
    """`symbols=8,max_len=6` → TaskOptions; unknown names and bad values are user errors."""
    values: dict[str, int] = {}
    known = TaskOptions.__dataclass_fields__
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or name not in known:
            raise DataError(
                Problem(f"--task-options: cannot use {item!r}", hint=f"NAME=VALUE with NAME one of {', '.join(known)}")
            )
        try:
            values[name] = int(raw)
        except ValueError:
            raise DataError(Problem(f"--task-options {name}: {raw!r} is not an integer")) from None
    options = TaskOptions(**values)
    if options.symbols < 2 or not 1 <= options.min_len <= options.max_len or options.train < 1 or options.valid < 0:
        raise DataError(
            Problem(
                f"--task-options: inconsistent values {options.to_json()}",
                hint="symbols ≥ 2, 1 ≤ min_len ≤ max_len, train ≥ 1, valid ≥ 0",
            )
        )
    return options


def make_pairs(task: str, options: TaskOptions, seed: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Training and held-out (source, target) text pairs of the task."""
    if task not in TASKS:
        raise DataError(Problem(f"unknown task {task!r}", hint=f"use one of {', '.join(TASKS)}"))
    generator = torch.Generator().manual_seed(seed)

    def draw(count: int) -> list[tuple[str, str]]:
        pairs = []
        for _ in range(count):
            length = int(torch.randint(options.min_len, options.max_len + 1, (1,), generator=generator))
            tokens = [str(t) for t in torch.randint(0, options.symbols, (length,), generator=generator).tolist()]
            target = tokens if task == "copy" else tokens[::-1]
            pairs.append((" ".join(tokens), " ".join(target)))
        return pairs

    return draw(options.train), draw(options.valid)


def symbols(options: TaskOptions) -> list[str]:
    """The task's tokens in id order (after the special tokens)."""
    return [str(i) for i in range(options.symbols)]
