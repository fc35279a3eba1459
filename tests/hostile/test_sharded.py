"""A sharded checkpoint (--strategy fsdp) is read without running code: its pickled metadata builds DCP's own
records only, holds tensors only, and names shard files of the checkpoint within their sizes."""

from __future__ import annotations

import pickle
import shutil
import subprocess
import sys
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
