"""A sharded checkpoint (--strategy fsdp) is read without running code: its pickled metadata builds DCP's own
records only, holds tensors only, and names shard files of the checkpoint within their sizes."""

from __future__ import annotations

import contextlib
import importlib
import pathlib
import pickle
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import assert_clean, bounded, train_tiny

pytest_plugins = ("harness",)

METADATA = Path("checkpoint") / "sharded" / ".metadata"


@pytest.fixture(scope="module")
def _sharded(tmp_path_factory) -> Path:
    return train_tiny(tmp_path_factory.mktemp("sharded") / "run", strategy="fsdp")


@pytest.fixture
def sharded_run(_sharded, tmp_path) -> Path:
    return Path(shutil.copytree(_sharded, tmp_path / "run"))


def _rewrite(run: Path, change) -> None:
    """Change the metadata as a hostile writer would (the file is ours here, so reading it with pickle is safe)."""
    metadata = pickle.loads((run / METADATA).read_bytes())
    (run / METADATA).write_bytes(pickle.dumps(change(metadata)))


class _Import:
    def __init__(self, module: str):
        self.module = module

    def __reduce__(self):
        return (__import__, (self.module,))


def test_the_sharded_checkpoint_consolidates(sharded_run, tmp_path):
    outcome = bounded("sharded-ok", "consolidate", sharded_run, "--out", tmp_path / "merged")
    assert_clean(outcome, 0, "wrote")


def test_metadata_that_would_import_a_module_imports_nothing(sharded_run, canary, tmp_path):
    (sharded_run / METADATA).write_bytes(pickle.dumps(_Import("evilmod")))
    outcome = bounded("sharded-pickle", "consolidate", sharded_run, "--out", tmp_path / "merged")
    assert_clean(outcome, 1, "builtins.__import__, which is not DCP's metadata")
    assert not canary.exists() and "evilmod" not in sys.modules
    assert not (tmp_path / "merged").exists()


def _bytes_entry(metadata):
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata.state_dict_metadata["model.extra"] = BytesStorageMetadata()
    return metadata


def _outside(metadata):
    for info in metadata.storage_data.values():
        info.relative_path = "../../../etc/passwd"
    return metadata


def _beyond(metadata):
    for info in metadata.storage_data.values():
        info.length = 1 << 40
    return metadata


def _first_tensor(metadata):
    return next(meta for name, meta in metadata.state_dict_metadata.items() if name.startswith("model."))


def _no_properties(metadata):
    _first_tensor(metadata).properties = None
    return metadata


def _negative_size(metadata):
    import torch

    _first_tensor(metadata).size = torch.Size([-4])
    return metadata


def _entries_list(metadata):
    metadata.state_dict_metadata = list(metadata.state_dict_metadata)
    return metadata


def _text_offset(metadata):
    for info in metadata.storage_data.values():
        info.offset = "0"
    return metadata


def _compressed(metadata):
    for info in metadata.storage_data.values():
        info.transform_descriptors = ["stream.zstd/1"]
    return metadata


def _huge_generator_state(metadata):
    import torch

    name = next(name for name in metadata.state_dict_metadata if name.startswith("rng."))
    metadata.state_dict_metadata[name].size = torch.Size([1 << 42])
    return metadata


def test_a_generator_state_of_another_size_is_ignored_not_allocated(sharded_run, tmp_path):
    _rewrite(sharded_run, _huge_generator_state)
    outcome = bounded("sharded-rng", "consolidate", sharded_run, "--out", tmp_path / "merged")
    assert_clean(outcome, 0, "wrote")


def test_a_corrupt_shard_is_a_located_error(sharded_run, tmp_path):
    shard = next((sharded_run / "checkpoint" / "sharded").glob("__*.distcp"))
    shard.write_bytes(bytes(shard.stat().st_size))
    for command in (("consolidate", sharded_run, "--out", tmp_path / "merged"), ("train", "--resume", sharded_run)):
        outcome = bounded(f"sharded-zeroed-{command[0]}", *command)
        assert_clean(outcome, 1, "the sharded checkpoint does not fit this model", absent=("weights_only=False",))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_no_properties, "is not a tensor's"),
        (_negative_size, "is not a tensor's"),
        (_entries_list, "the metadata's entries are not a mapping of names"),
        (_text_offset, "is not a range"),
        (_compressed, "the metadata transforms what it reads from"),
        (_bytes_entry, "model.extra is a pickled object; a checkpoint holds tensors only"),
        (_outside, "the metadata names a shard file that is not the checkpoint's"),
        (_beyond, "the metadata reads beyond the end of"),
        (lambda metadata: {"not": "metadata"}, "not a sharded checkpoint's metadata"),
    ],
)
def test_metadata_that_reaches_beyond_the_checkpoint_is_refused(sharded_run, tmp_path, change, message):
    _rewrite(sharded_run, change)
    for command in (("consolidate", sharded_run, "--out", tmp_path / "merged"), ("train", "--resume", sharded_run)):
        outcome = bounded(f"sharded-{command[0]}", *command)
        assert_clean(outcome, 1, message)


def test_naming_a_torch_module_in_the_metadata_imports_nothing():
    """`torch.onnx` named by a two-opcode pickle: refused before torch would import it on attribute access."""
    code = (
        "import io, sys\n"
        "from blockgraph.trainer import sharded\n"
        "data = b'\\x80\\x04\\x8c\\x05torch\\x94\\x8c\\x04onnx\\x94\\x93\\x94.'\n"
        "try:\n"
        "    sharded._MetadataUnpickler(io.BytesIO(data)).load()\n"
        "except Exception as error:\n"
        "    print(type(error).__name__)\n"
        "print('torch.onnx' in sys.modules)\n"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["CheckpointError", "False"], done.stdout + done.stderr


# --- the unpickler builds DCP's records only: nothing in the file reaches a class, function or module ---------


def _unicode(text: str) -> bytes:
    return b"X" + struct.pack("<I", len(text)) + text.encode()


def _give_state(module: str, name: str, state: bytes) -> bytes:
    """Pickle opcodes that push `module.name` itself (a class or function), BUILD it with `state`, and drop it."""
    return f"c{module}\n{name}\n".encode() + state + b"b0"


def _slot(attribute: str, value: bytes) -> bytes:
    """(None, {attribute: value}): BUILD then sets the attribute with setattr, on whatever it is given."""
    return b"N}" + _unicode(attribute) + value + b"s\x86"


def _prefixed(run: Path, prefix: bytes) -> None:
    """The run's metadata, still as blockgraph wrote it, with `prefix` run before it (protocol 2: the memo
    indices stay as they are). Never call it on a file it has prefixed: loading that here would run the prefix."""
    body = pickle.dumps(pickle.loads((run / METADATA).read_bytes()), protocol=2)
    (run / METADATA).write_bytes(body[:2] + prefix + body[2:])


@contextlib.contextmanager
def _untouched(target: object, attribute: str) -> Iterator[None]:
    """Assert that `target` (a class or function) has its own `attribute` as before the block; should the state
    have landed, take it back, so that the rest of the session does not run with it."""
    before = vars(target).get(attribute)
    try:
        yield
        assert vars(target).get(attribute) is before, f"{attribute} of {target} was set"
    finally:
        if vars(target).get(attribute) is not before:
            setattr(target, attribute, before) if before is not None else delattr(target, attribute)


def test_metadata_that_replaces_a_method_of_path_cannot_read_a_shard_outside(sharded_run, tmp_path):
    """`PosixPath.is_symlink = torch.Size` (whose call gives an empty, false size) would let a shard that links
    to a file outside the run pass as the checkpoint's own; the file's content must never be read."""
    shard = next((sharded_run / "checkpoint" / "sharded").glob("__*.distcp"))
    outside = tmp_path / "outside.distcp"
    shutil.move(shard, outside)
    shard.symlink_to(outside)
    outcome = bounded("sharded-link-outside", "consolidate", sharded_run, "--out", tmp_path / "merged")
    assert_clean(outcome, 1, "the metadata names a shard file that is not the checkpoint's")
    _prefixed(sharded_run, _give_state("pathlib", "PosixPath", _slot("is_symlink", b"ctorch\nSize\n")))
    with _untouched(pathlib.PosixPath, "is_symlink"):
        outcome = bounded("sharded-class-state", "consolidate", sharded_run, "--out", tmp_path / "merged")
    assert_clean(outcome, 1, "not a sharded checkpoint's metadata")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize(
    ("module", "name", "state", "attribute"),
    [
        ("torch.distributed.checkpoint.metadata", "Metadata", _slot("planted", b"K\x01"), "planted"),
        ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING", _slot("planted", b"K\x01"), "planted"),
        ("torch.serialization", "_get_layout", b"}" + _unicode("planted") + b"K\x01s", "planted"),
        ("torch", "Size", _slot("__len__", b"ctorch\nSize\n"), "__len__"),
    ],
)
def test_no_state_reaches_a_class_or_function_the_metadata_names(sharded_run, tmp_path, module, name, state,
                                                                  attribute):  # fmt: skip
    _prefixed(sharded_run, _give_state(module, name, state))
    with _untouched(getattr(importlib.import_module(module), name), attribute):
        outcome = bounded(f"sharded-state-{name}", "consolidate", sharded_run, "--out", tmp_path / "merged")
    assert_clean(outcome, 1, "not a sharded checkpoint's metadata")


# --- work is the model's and the shards', not what the metadata claims ---------------------------------------


def _million_chunks(metadata):
    meta = _first_tensor(metadata)
    meta.chunks = meta.chunks * 1_000_000  # one chunk, listed a million times: a few MB of pickle
    return metadata


def _overlapping(metadata):
    first = next(iter(metadata.storage_data.values()))
    for info in metadata.storage_data.values():
        info.offset, info.length = first.offset, first.length
    return metadata


def _no_bytes(metadata):
    metadata.storage_data.pop(next(iter(metadata.storage_data)))
    return metadata


def _chunk_beyond(metadata):
    import torch

    chunk = _first_tensor(metadata).chunks[0]
    chunk.sizes = torch.Size([d + 1 for d in chunk.sizes])
    return metadata


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_million_chunks, "the metadata lists a chunk of model."),
        (_overlapping, "the metadata reads overlapping bytes of __0_0.distcp"),
        (_no_bytes, "the metadata's storage has no bytes for 1 chunk(s)"),
        (_chunk_beyond, "is not a tensor's"),
    ],
)
def test_metadata_that_claims_more_work_than_the_files_hold_is_refused(sharded_run, tmp_path, change, message):
    _rewrite(sharded_run, change)
    outcome = bounded(f"sharded-work-{change.__name__}", "consolidate", sharded_run, "--out", tmp_path / "merged")
    assert_clean(outcome, 1, message)
    assert outcome.seconds < 5


def _empty_shards(metadata):
    """Two ranks that held no rows of a tensor: DCP lists an empty chunk for each, at the same offsets."""
    import torch
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    meta = _first_tensor(metadata)
    end = torch.Size([meta.size[0], *[0] * (len(meta.size) - 1)])  # where DCP puts a shard of no rows
    meta.chunks += [ChunkStorageMetadata(end, torch.Size([0] * len(meta.size))) for _ in range(2)]
    return metadata


def test_empty_shards_listed_by_every_rank_that_held_none_are_read_as_nothing(sharded_run, tmp_path):
    _rewrite(sharded_run, _empty_shards)
    outcome = bounded("sharded-empty-shards", "consolidate", sharded_run, "--out", tmp_path / "merged")
    assert_clean(outcome, 0, "wrote")
