"""How much memory this process may still take, and from which limit: what a model's needs are held against.

On the CPU the least of three limits binds: the system's available memory (`MemAvailable` in /proc/meminfo:
free memory plus what the kernel can reclaim without swapping), the process's cgroup (its `memory.max`
less what the group already uses, v2, or `memory.limit_in_bytes` of v1; an ancestor's limit binds too) and
its address-space limit (`ulimit -v`, RLIMIT_AS, less the address space already mapped). Past the first
two the kernel's OOM killer ends the process without a message (exit 137); past the third every allocation
fails. On a CUDA device it is the device's free memory plus what this process's allocator holds unused.

builder.footprint compares what a model will hold with `available()` before allocating anything.
"""

from __future__ import annotations

import os
import resource
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blockgraph.common.files import size_text

#: set (to anything but 0, false or no) to go ahead without the memory check, as `--skip-memory-check` does
SKIP_ENV = "BLOCKGRAPH_SKIP_MEMORY_CHECK"
SKIP_FLAG = "--skip-memory-check"
SKIP_HELP = (
    "Allocate models without checking first that they fit in the memory available "
    f"(also ${SKIP_ENV}=1; check_memory=False in Python)."
)
#: how to go ahead anyway, for the hints of refusals
SKIP_HINT = f"if you know better: blockgraph {SKIP_FLAG} (or {SKIP_ENV}=1; check_memory=False in Python)"

_skipped: ContextVar[bool] = ContextVar("skip_memory_check", default=False)

_CGROUP = Path("/sys/fs/cgroup")
_NO_LIMIT_V1 = 1 << 62  # v1 writes "no limit" as the largest page-aligned 63-bit number


@dataclass(frozen=True)
class Available:
    """Bytes this process may still take on a device, and the limit that says so (for messages)."""

    bytes: int
    limit: str


def skip_checks(on: bool) -> None:
    """Turn the memory check off (the command line's `--skip-memory-check`) or back on, for this context."""
    _skipped.set(on)


def skip_requested() -> bool:
    """Whether the user asked to go ahead unchecked: `--skip-memory-check` or `$BLOCKGRAPH_SKIP_MEMORY_CHECK`."""
    return _skipped.get() or os.environ.get(SKIP_ENV, "").strip().lower() not in ("", "0", "false", "no")


def available(device: Any = "cpu") -> Available | None:
    """What `device` has left for this process; None where nothing is known (not Linux) or nothing is needed
    (the meta device)."""
    kind = str(getattr(device, "type", device)).partition(":")[0]
    if kind == "meta":
        return None
    if kind == "cuda":
        return cuda_free(device)
    if kind != "cpu":
        return None  # another accelerator: not measured
    found = [limit for limit in (system(), cgroup(), address_space()) if limit is not None]
    return min(found, key=lambda a: a.bytes) if found else None


def system(meminfo: Path = Path("/proc/meminfo")) -> Available | None:
    """The system's available memory (MemAvailable), None where /proc/meminfo has none."""
    fields = _kib_fields(meminfo)
    if "MemAvailable" not in fields:
        return None
    return Available(fields["MemAvailable"], "the system's available memory (MemAvailable in /proc/meminfo)")


def cgroup(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = _CGROUP) -> Available | None:
    """The tightest memory limit of this process's cgroup and its ancestors less what each group uses (its page
    cache that can be dropped not counted as used), v2 or else v1; None without a limit."""
    try:
        lines = proc_cgroup.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    found: list[Available] = []
    for line in lines:
        _, controllers, path = line.split(":", 2) if line.count(":") >= 2 else ("", "", "")
        if controllers == "" and (root / "cgroup.controllers").exists():  # v2, unified
            found += _limits(root, path, "memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):  # v1
            found += _limits(
                root / "memory", path, "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"
            )
    return min(found, key=lambda a: a.bytes) if found else None


def _limits(mount: Path, path: str, limit_file: str, usage_file: str, cache_key: str) -> list[Available]:
    """(limit − use) of the group at `path` under `mount` and of each of its ancestors that has a limit."""
    found = []
    group = mount / path.strip("/")
    while True:
        limit = _number(group / limit_file)
        usage = _number(group / usage_file)
        if limit is not None and usage is not None and limit < _NO_LIMIT_V1:
            cache = _kib_fields(group / "memory.stat").get(cache_key, 0)
            left = max(0, limit - max(0, usage - cache))
            where = "/" + group.relative_to(mount).as_posix() if group != mount else "/"
            found.append(
                Available(left, f"the limit of cgroup {where}, {limit_file} ({size_text(limit)}), less its use")
            )
        if group == mount or mount not in group.parents:
            return found
        group = group.parent


def address_space(status: Path = Path("/proc/self/status")) -> Available | None:
    """The address-space limit (RLIMIT_AS, `ulimit -v`) less the address space this process maps already."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    mapped = _kib_fields(status).get("VmSize", 0)
    return Available(
        max(0, soft - mapped),
        f"the address-space limit, ulimit -v ({size_text(soft)}), less {size_text(mapped)} in use",
    )


def cuda_free(device: Any) -> Available | None:
    """A CUDA device's free memory, plus what this process's caching allocator holds and does not use."""
    import torch

    if not torch.cuda.is_available():  # torch's own error says so when it allocates
        return None
    where = torch.device(device)
    free, _ = torch.cuda.mem_get_info(where)
    unused = torch.cuda.memory_reserved(where) - torch.cuda.memory_allocated(where)
    return Available(free + max(0, unused), f"free memory of {where}")


def _kib_fields(path: Path) -> dict[str, int]:
    """`Name: 123 kB` (or `name 123`) lines as name → bytes; unreadable → {}."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return {}
    fields = {}
    for line in text.splitlines():
        parts = line.replace(":", " ").split()
        if len(parts) >= 2 and parts[1].isdigit():
            fields[parts[0]] = int(parts[1]) * (1024 if parts[2:] == ["kB"] else 1)
    return fields


def _number(path: Path) -> int | None:
    """A cgroup file's number; None for `max` (no limit) or an unreadable file."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
