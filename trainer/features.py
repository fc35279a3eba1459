"""Float features a model decodes into text (a Whisper model's log-mel spectrograms), read from files that hold
data only: NumPy's .npy, read with allow_pickle=False (an object array, which only a pickle can hold, is refused
unread), or safetensors (its header checked first, common.tensorfile); either header is held against the data the
file holds and the 1 GiB limit before anything is allocated. Each file is held against the model's
source input before anything runs: floating-point values, the sizes the input fixes (80 mel bins), and the
limits its blocks put on the named sizes (3000 frames: Whisper's 1500 positions after the stride-2 convolution),
every defect a located error naming the file."""

from __future__ import annotations

import io
import math
from pathlib import Path

import torch

from blockgraph.builder.shapes import TypedGraph, check_bounds
from blockgraph.builder.spec import InputSpec
from blockgraph.common.errors import DataError, SpecError
from blockgraph.common.files import FileKind, GiB, read_bytes, size_text
from blockgraph.common.tensorfile import ITEMSIZE, read_header
from blockgraph.common.text import excerpt

FEATURES_FILE = FileKind("features file", DataError, limit=1 * GiB)
NAMES = ("features", "input_features")  # the tensor a safetensors file of several holds them in


def read_features(path: str | Path, typed: TypedGraph, source: str) -> torch.Tensor:
    """The features of `path` as a batch for the model's input `source` ([utterances, …] in float32): a file
    holding one utterance (the input's shape without its batch dimension) or several (with it)."""
    path = Path(path)
    values = _safetensors(path) if path.suffix == ".safetensors" else _npy(path)
    spec = typed.graph.inputs[source]
    return _checked(values, path, spec, source, typed)


def _npy(path: Path) -> torch.Tensor:
    import numpy

    data = read_bytes(path, FEATURES_FILE)
    hint = "save the features as a float32 array: numpy.save(path, features), or as safetensors"
    if not data.startswith(b"\x93NUMPY"):
        raise FEATURES_FILE.fail(path, "the features file is not a NumPy .npy array (nor .safetensors)", hint)
    stream = io.BytesIO(data)
    try:  # the header first: numpy.load allocates the size it claims before reading a byte of data
        version = numpy.lib.format.read_magic(stream)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"format version {version[0]}.{version[1]}")
        read = numpy.lib.format.read_array_header_1_0 if version == (1, 0) else numpy.lib.format.read_array_header_2_0
        shape, _, dtype = read(stream)
    except ValueError as exc:
        raise FEATURES_FILE.fail(
            path, f"the features file is not a readable .npy array ({excerpt(str(exc), 80)})", hint
        ) from None
    if dtype.hasobject:  # Python objects, which only a pickle holds
        raise FEATURES_FILE.fail(
            path, "the features file holds Python objects (a pickle), which are never loaded", hint
        )
    if dtype.kind != "f":
        raise FEATURES_FILE.fail(path, *_not_floats(str(dtype)))
    if math.prod(shape) * dtype.itemsize != len(data) - stream.tell():
        raise FEATURES_FILE.fail(
            path,
            f"the features file's header says {list(shape)} {dtype} values, which its "
            f"{len(data) - stream.tell():,} bytes of data do not hold: the file is truncated or corrupt",
            hint,
        )
    array = numpy.load(io.BytesIO(data), allow_pickle=False)  # as long as the file: bounded by its limit
    return torch.from_numpy(array.astype(numpy.float32, copy=True))


def _safetensors(path: Path) -> torch.Tensor:
    from safetensors import safe_open

    header = read_header(str(path), "features file", DataError)
    names = list(header.tensors)
    name = names[0] if len(names) == 1 else next((n for n in NAMES if n in header.tensors), None)
    if name is None:
        found = ", ".join(excerpt(n, 40) for n in names[:6]) or "none"
        raise FEATURES_FILE.fail(
            path,
            f"the features file holds {len(names)} tensors ({found})",
            hint=f"keep them alone in the file, or name them {NAMES[0]!r}",
        )
    info = header.tensors[name]
    if not info.floating:
        raise FEATURES_FILE.fail(path, *_not_floats(info.dtype))
    stored = math.prod(info.shape) * ITEMSIZE[info.dtype]  # a sparse file may claim any size its header checks
    if stored > FEATURES_FILE.limit:
        raise FEATURES_FILE.fail(
            path,
            f"the features tensor {excerpt(name, 40)} holds {size_text(stored)}: the limit is "
            f"{size_text(FEATURES_FILE.limit)}",
            hint="decode fewer utterances at a time",
        )
    with safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor(name).float()


def _not_floats(dtype: str) -> tuple[str, str]:
    return (
        f"the features file holds {dtype} values: features are floating-point numbers",
        "save them as float32 (float16 and float64 are read too)",
    )


def _checked(values: torch.Tensor, path: Path, spec: InputSpec, source: str, typed: TypedGraph) -> torch.Tensor:
    """`values` as a batch of the input `spec`, or the error that says why not."""
    expected = spec.shape[1:]  # each utterance's sizes: ints the input fixes, names it leaves free
    given = list(values.shape)
    if values.dim() == len(expected):  # one utterance
        values = values.unsqueeze(0)
    shape = tuple(values.shape)
    fits = len(shape) == len(expected) + 1 and all(
        size == n if isinstance(size, int) else n > 0 for size, n in zip(expected, shape[1:], strict=True)
    )
    if not fits or shape[0] == 0:
        wanted = ", ".join(str(d) for d in expected)
        raise FEATURES_FILE.fail(
            path,
            f"the features have shape {given}; the model's {source!r} input takes [{wanted}] per utterance",
            hint=f"one utterance is [{wanted}], several are [utterances, {wanted}]"
            + (f"; {source}: {spec.doc}" if spec.doc else ""),
        )
    if not bool(torch.isfinite(values).all()):
        raise FEATURES_FILE.fail(path, "the features hold NaN or infinite values")
    sizes = {str(size): n for size, n in zip(spec.shape, shape, strict=True) if isinstance(size, str)}
    try:
        check_bounds(typed, sizes)
    except SpecError as error:
        raise FEATURES_FILE.fail(
            path,
            f"the features are too long for the model: {error.problems[0].message}",
            hint="cut them to the length the model reads (Whisper's: 3000 frames, 30 s of audio)",
        ) from None
    return values
