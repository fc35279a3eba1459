"""safetensors files checked before they are opened: header size, JSON, dtypes, shapes and offsets.

A safetensors file is 8 bytes (little-endian header length), a JSON header (tensor name → dtype, shape, byte
range) and the tensor bytes. The library that reads them is safe (no code, no pickle), but a corrupt or hostile
file gives it messages that quote the header; checking the header here first turns every defect into a located
error that names the file and the tensor, and bounds what a header may make us read.
"""

from __future__ import annotations

import errno
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from blockgraph.common.errors import BlockgraphError, CheckpointError
from blockgraph.common.files import FileKind, MiB, created_mode, open_file, parse_json
from blockgraph.common.text import excerpt

MAX_HEADER = 100 * MiB  # the safetensors library's own bound

ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
FLOATS = {"F16", "BF16", "F32", "F64", "F8_E5M2", "F8_E4M3"}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors' name: F32, BF16, I64, BOOL, ...
    shape: tuple[int, ...]

    @property
    def floating(self) -> bool:
        return self.dtype in FLOATS


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def read_header(path: str, what: str = "weights file", error: type[BlockgraphError] = CheckpointError) -> Header:
    """The checked header of the safetensors file `path`; any defect is an `error` naming the file and field."""
    kind = FileKind(what, error, limit=MAX_HEADER)
    with open_file(path, kind) as handle:
        size = os.fstat(handle.fileno()).st_size
        head = handle.read(8)
        if len(head) < 8:
            raise kind.fail(path, f"the {what} is truncated ({size} bytes): not a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER or length > size - 8:
            raise kind.fail(path, f"the {what} is truncated or not a safetensors file (header of {length:,} bytes)")
        raw = handle.read(length)
    header = parse_json(raw, path, FileKind(f"{what}'s header", error, MAX_HEADER), "the file is corrupt")
    if not isinstance(header, dict):
        raise kind.fail(path, f"the {what}'s header is not a JSON object: the file is corrupt")
    data_bytes = size - 8 - length
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise kind.fail(path, f"the {what}'s __metadata__ is not a mapping of strings")
    tensors = {}
    for name, entry in header.items():
        tensors[name] = _tensor(name, entry, data_bytes, kind, path)
    return Header(tensors, metadata)


def _tensor(name: str, entry: object, data_bytes: int, kind: FileKind, path: str) -> TensorInfo:
    def bad(field: str, expected: str) -> BlockgraphError:
        return kind.fail(path, f"tensor {excerpt(name, 80)} of the {kind.what}: {field} is not {expected}")

    if not isinstance(entry, dict):
        raise bad("its entry", "a mapping of dtype, shape and data_offsets")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in ITEMSIZE:
        raise bad("dtype", f"a safetensors dtype ({', '.join(ITEMSIZE)})")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise bad("shape", "a list of sizes")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_bytes
    ):
        raise bad("data_offsets", f"a byte range within the file's {data_bytes:,} data bytes")
    if offsets[1] - offsets[0] != math.prod(shape) * ITEMSIZE[dtype]:
        raise bad("data_offsets", "as long as its shape and dtype need")
    return TensorInfo(dtype, tuple(shape))


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write tensors to `path`; a failure of the disk is an OSError, as from any other write (see common.atomic)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as exc:
        raise OSError(errno.EIO, str(exc).removeprefix("Error while serializing: ")) from None
    _settle(path)


def _settle(path: Path) -> None:
    """Make the file a function of its contents and its mode the user's default, as for every other file written.

    safetensors writes its metadata in hash-map order (it differs between runs) and creates files 0600: the
    header is rewritten in place with the metadata sorted (the same bytes, reordered: the length is unchanged),
    and the mode set from the umask.
    """
    with open(path, "r+b") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
        ordered = b""
        if "__metadata__" in header:
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
            ordered = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if 0 < len(ordered) <= size:  # the same text reordered: never longer (checked all the same)
            handle.seek(8)
            handle.write(ordered.ljust(size, b" "))
    os.chmod(path, created_mode(0o666))
