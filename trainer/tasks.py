"""Synthetic sequence-to-sequence tasks that need no data: copy and reverse random token sequences.

Sequences are drawn from `symbols` tokens named `0`, `1`, ... with lengths uniform in [min_len, max_len],
from a generator seeded with `seed`, so the same options always give the same examples. The pairs are
written as space-separated text, and read with the `space` tokenizer.

A language model learns a task as one sequence, the source as a prompt, then `SEPARATOR`, then the target; only
the target (and eos) is scored. The separator is a token of the task's vocabulary rather than eos, so that a
prompt typed with it (`3 1 4 <sep>`) continues into the target where text decodes up to the first eos.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

from blockgraph.common.errors import Problem, UsageError
from blockgraph.common.text import excerpt

TASKS = ("copy", "reverse")
SEPARATOR = "<sep>"  # between a language model's prompt (the source) and its target


LIMITS = {"symbols": (2, 100_000), "min_len": (1, 10_000), "max_len": (1, 10_000), "train": (1, 10_000_000),
          "valid": (0, 1_000_000)}  # fmt: skip


@dataclass(frozen=True)
class TaskOptions:
    symbols: int = 10
    min_len: int = 3
    max_len: int = 8
    train: int = 2000
    valid: int = 200

    def to_json(self) -> dict[str, int]:
        return asdict(self)


def task_options(values: Mapping[str, object], origin: str = "--task-options") -> TaskOptions:
    """Options from names and values (the command line's, or a checkpoint's), each checked against its range."""
    for name, value in values.items():
        if name not in LIMITS:
            raise UsageError(
                Problem(f"{origin}: no option {excerpt(str(name), 40)}", hint=f"options: {', '.join(LIMITS)}")
            )
        low, high = LIMITS[name]
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise UsageError(Problem(f"{origin} {name}: expected an integer from {low:,} to {high:,}"))
    options = TaskOptions(**values)  # type: ignore[arg-type]
    if options.min_len > options.max_len:
        raise UsageError(Problem(f"{origin}: min_len {options.min_len} is above max_len {options.max_len}"))
    return options


def parse_options(text: str | None) -> TaskOptions:
    """`symbols=8,max_len=6` → TaskOptions; unknown names and bad values are user errors."""
    values: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or name not in LIMITS:
            raise UsageError(
                Problem(
                    f"--task-options: cannot use {excerpt(item, 40)}",
                    hint=f"NAME=VALUE with NAME one of {', '.join(LIMITS)}",
                )
            )
        raw = raw.strip()
        values[name] = int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 12 else raw
    return task_options(values)


def make_pairs(task: str, options: TaskOptions, seed: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Training and held-out (source, target) text pairs of the task."""
    import torch  # here, not at the top: the command line reads TaskOptions without waiting for torch

    if task not in TASKS:
        raise UsageError(Problem(f"unknown task {task!r}", hint=f"use one of {', '.join(TASKS)}"))
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


def symbols(options: TaskOptions, *, separator: bool = False) -> list[str]:
    """The task's tokens in id order (after the special tokens); `separator`: a language model's, the separator last."""
    return [str(i) for i in range(options.symbols)] + ([SEPARATOR] if separator else [])
