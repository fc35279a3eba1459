"""Class 10: what `blockgraph import` reads that it did not write, a Hugging Face-format directory (config.json,
safetensors and their index, tokenizer.json, Marian's SentencePiece models and vocab.json), and what `generate`
then does with it. The native libraries behind these files (tokenizers, safetensors) are handed only what was
checked: no crash of the process, no allocation beyond bounds, no panic reaching the user; the work of an import
is what the model needs, not what a file claims; numbers the model cannot hold, and tensors it would have to
cast, are refused by name."""

from __future__ import annotations

import base64
import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hf_dirs
import pytest
import torch
from harness import SECRET, assert_clean, bounded, finish, spawn
from safetensors.torch import load_file, save_file

pytest_plugins = ("harness",)

WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def _gpt2(tmp_path_factory) -> Path:
    return hf_dirs.gpt2(tmp_path_factory.mktemp("gpt2"))[2]


@pytest.fixture(scope="module")
def _marian(tmp_path_factory) -> Path:
    return hf_dirs.marian(tmp_path_factory.mktemp("marian"))[2]


@pytest.fixture
def gpt2_dir(_gpt2, tmp_path) -> Path:
    """A fresh copy of a small GPT-2 directory (config.json, model.safetensors, a word-level tokenizer.json)."""
    return Path(shutil.copytree(_gpt2, tmp_path / "hf"))


@pytest.fixture
def marian_dir(_marian, tmp_path) -> Path:
    return Path(shutil.copytree(_marian, tmp_path / "hf"))


def _edit_json(path: Path, change: Callable[[Any], Any]) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps(change(data) or data), encoding="utf-8")


def _import(case: str, hf: Path, out: Path):
    return bounded(case, "import", hf, "--out", out)


def test_the_directory_imports_and_generates(gpt2_dir, tmp_path):
    assert_clean(_import("hf-ok", gpt2_dir, tmp_path / "out"), 0, "imported gpt2")
    assert_clean(bounded("hf-generate", "generate", tmp_path / "out", "I like", "--max-new", "3"), 0)


# --- native libraries: checked before they read, bounded, their panics located -------------------------------


def _processor(single: list, specials: dict) -> dict:
    pair = [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}]
    return {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials}


def _special(name: str, ids: int) -> dict:
    return {name: {"id": name, "ids": [0] * ids, "tokens": [name] * ids}}


_CLS, _SEQ = {"SpecialToken": {"id": "<cls>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}
_CHARSMAP_OUTSIDE = base64.b64encode(struct.pack("<I", 8) + bytes(28)).decode()  # a root that points past the trie


@pytest.mark.parametrize(
    ("component", "value", "message"),
    [
        ("post_processor", _processor([_CLS, _SEQ], _special("<cls>", 1_000_000)), "is not 1 to 16 ids"),
        ("post_processor", _processor([_CLS, _SEQ], {}), "template single names a piece it does not define"),
        ("post_processor", _processor([{"Sequence": {"id": "B", "type_id": 0}}], {}), "names a piece it does not"),
        ("normalizer", {"type": "Precompiled", "precompiled_charsmap": _CHARSMAP_OUTSIDE}, "leads outside itself"),
        ("normalizer", {"type": "Replace", "pattern": {"String": "a"}, "content": "x" * 10_000}, "at most 256"),
        ("normalizer", {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": SECRET * 100}]}, "256"),
        ("normalizer", {"type": "Sequence", "normalizers": [{"type": "Lowercase"}] * 100_000}, "at most 64"),
    ],
)
def test_what_a_tokenizer_json_inserts_is_bounded_before_the_library_reads_it(
    gpt2_dir, tmp_path, component, value, message
):
    _edit_json(gpt2_dir / "tokenizer.json", lambda data: data.__setitem__(component, value))
    outcome = _import(f"tokenizer-{component}", gpt2_dir, tmp_path / "out")
    assert_clean(outcome, 1, "tokenizer.json is not a tokenizer blockgraph reads", message, absent=(SECRET,))
    assert not (tmp_path / "out").exists()


def test_a_charsmap_of_a_4_gib_trie_never_reaches_the_library(gpt2_dir, tmp_path):
    """The library would ask for 8 GB at once and abort the process: a process of its own, so that a regression
    is a failed case, not a crashed session."""
    charsmap = base64.b64encode(b"\xff\xff\xff\xff" + bytes(28)).decode()
    normalizer = {"type": "Precompiled", "precompiled_charsmap": charsmap}
    _edit_json(gpt2_dir / "tokenizer.json", lambda data: data.__setitem__("normalizer", normalizer))
    outcome = finish("tokenizer-charsmap-4gib", spawn("import", gpt2_dir, "--out", tmp_path / "out"))
    assert_clean(outcome, 1, "precompiled_charsmap declares a trie its bytes do not hold")
    assert "memory allocation" not in outcome.stderr and "panicked" not in outcome.stderr


def test_a_valid_charsmap_is_read(gpt2_dir, tmp_path, _marian):
    """SentencePiece's own normalization rules (the charsmap of a model trained here) pass every check."""
    model = (_marian / "source.spm").read_bytes()
    charsmap = _charsmap_of(model)
    normalizer = {"type": "Precompiled", "precompiled_charsmap": base64.b64encode(charsmap).decode()}
    _edit_json(gpt2_dir / "tokenizer.json", lambda data: data.__setitem__("normalizer", normalizer))
    assert_clean(_import("tokenizer-charsmap-ok", gpt2_dir, tmp_path / "out"), 0)
    assert_clean(bounded("tokenizer-charsmap-encode", "generate", tmp_path / "out", "Ｉ ｌｉｋｅ", "--max-new", "2"), 0)


def _charsmap_of(model: bytes) -> bytes:
    """normalizer_spec.precompiled_charsmap (fields 3, then 2) of a serialized SentencePiece model."""

    def fields(data: bytes):
        i = 0
        while i < len(data):
            key, i = _varint(data, i)
            if key & 7 == 2:
                size, i = _varint(data, i)
                yield key >> 3, data[i : i + size]
                i += size
            elif key & 7 == 0:
                _, i = _varint(data, i)
            else:
                i += 4 if key & 7 == 5 else 8

    normalizer = next(value for number, value in fields(model) if number == 3)
    return next(value for number, value in fields(normalizer) if number == 2)


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


@pytest.mark.parametrize(
    ("component", "value"),
    [
        ("pre_tokenizer", {"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated", "invert": False}),
        ("pre_tokenizer", {"type": "FixedLength", "length": 0}),
    ],
)
def test_a_panic_of_the_library_on_a_text_is_a_located_error(gpt2_dir, tmp_path, capfd, component, value):
    """A backtracking regex passes Oniguruma's retry limit, a zero length divides: the library panics (a
    BaseException), and its panic hook writes to descriptor 2, which is muted meanwhile."""
    _edit_json(gpt2_dir / "tokenizer.json", lambda data: data.__setitem__(component, value))
    assert_clean(_import(f"tokenizer-{value['type']}", gpt2_dir, tmp_path / "out"), 0)
    outcome = bounded(f"tokenizer-panic-{value['type']}", "generate", tmp_path / "out", "a" * 40 + "b")
    assert_clean(outcome, 1, "tokenizer.json cannot encode a text: a panic in the tokenizers library")
    assert str(tmp_path / "out" / "tokenizer" / "tokenizer.json") in " ".join(outcome.output.split())
    assert "panicked" not in capfd.readouterr().err


# --- work: names and sizes first, from the headers; nothing read that is not used ---------------------------


def _rewrite_header(path: Path, change: Callable[[dict, int], None], sparse: int = 0) -> None:
    """Change the safetensors header of `path` (`change(header, data_bytes)`); `sparse` bytes of zeros, never
    written, follow the data."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + length]), raw[8 + length :]
    change(header, len(data))
    text = json.dumps(header).encode("utf-8")
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text + data)
        handle.truncate(8 + len(text) + len(data) + sparse)


GB3 = 3 << 30


def _tensor_beyond(name: str, shape: list[int]) -> Callable[[dict, int], None]:
    def change(header: dict, end: int) -> None:
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [end, end + 4 * shape[0] * shape[1]]}

    return change


@pytest.mark.parametrize(
    ("name", "shape", "message"),
    [
        ("lm_head.bias.extra", [GB3 // 4, 1], "1 tensor(s) of the checkpoint map to nothing: lm_head.bias.extra"),
        ("transformer.wte.weight", [GB3 // 96, 24], "transformer.wte.weight (33554432, 24): not the size of its"),
        ("transformer.h.7.ln_1.weight", [GB3 // 4, 1], "have no place in the spec: h.7.ln_1.norm.weight"),
    ],
)
def test_a_tensor_the_model_cannot_take_is_refused_unread(gpt2_dir, tmp_path, name, shape, message):
    """3 GiB of a tensor (a sparse file) that no rule maps, that is larger than its place, or that is of a layer
    the spec does not have: refused from the header in moments, nothing of it read (nor mapped)."""
    _rewrite_header(gpt2_dir / WEIGHTS, _tensor_beyond(name, shape), sparse=GB3)
    outcome = _import(f"weights-unread-{name}", gpt2_dir, tmp_path / "out")
    assert_clean(outcome, 1, message)
    assert outcome.seconds < 5 and outcome.peak_mib < 50


def test_a_key_twice_is_refused_in_every_json_file(gpt2_dir, tmp_path):
    config = gpt2_dir / "config.json"
    config.write_text(config.read_text().replace('"n_embd": 24,', '"n_embd": 24, "n_embd": 48,'))
    assert_clean(_import("json-twice-config", gpt2_dir, tmp_path / "out"), 1, "holds a key twice in one object")
    config.write_text(config.read_text().replace('"n_embd": 24, "n_embd": 48,', '"n_embd": 24,'))
    raw = (gpt2_dir / WEIGHTS).read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    text = raw[8 : 8 + length].decode()
    first = next(iter(json.loads(text)))
    twice = text.replace(f'"{first}":', f'"{first}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}},"{first}":', 1)
    (gpt2_dir / WEIGHTS).write_bytes(struct.pack("<Q", len(twice)) + twice.encode() + raw[8 + length :])
    outcome = _import("json-twice-header", gpt2_dir, tmp_path / "out")
    assert_clean(outcome, 1, "weights file's header holds a key twice in one object")


def test_a_sharded_index_that_names_a_tensor_twice_is_refused(gpt2_dir, tmp_path):
    (gpt2_dir / WEIGHTS).rename(gpt2_dir / "model-00001-of-00001.safetensors")
    index = '{"weight_map": {"transformer.wte.weight": "model-00001-of-00001.safetensors", ' \
            '"transformer.wte.weight": "model-00001-of-00001.safetensors"}}'  # fmt: skip
    (gpt2_dir / "model.safetensors.index.json").write_text(index)
    outcome = _import("index-twice", gpt2_dir, tmp_path / "out")
    assert_clean(outcome, 1, "weights index holds a key twice in one object")


# --- numbers Python holds and the model cannot; JSON read one bounded way -----------------------------------

DIGITS_401 = "9" * 401


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ('{"model_type": "gpt2", "n_embd": 1e400}', "holds a number beyond the range of a float"),
        ('{"model_type": "gpt2", "n_embd": NaN}', "holds NaN, which is not JSON"),
        ('{"model_type": "llama", "rope_theta": ' + DIGITS_401 + "}", "cannot read the spec's rope_theta"),
        ('{"model_type": "llama", "rms_norm_eps": ' + DIGITS_401 + "}", "not a finite number ≥ 0"),
        ('{"model_type": "llama", "head_dim": 8, "num_attention_heads": ' + DIGITS_401 + "}", "not a size from 1"),
        ('{"model_type": "llama", "head_dim": 8, "num_attention_heads": 1e400}', "beyond the range of a float"),
        ('{"model_type": "llama", "rope_scaling": [1, 2]}', "rope_scaling is not a mapping of options"),
        ('{"model_type": "mistral", "rope_parameters": "yarn"}', "rope_parameters is not a mapping of options"),
        ('{"model_type": "gpt2", "n_inner": 1, "n_embd": ' + DIGITS_401 + "}", "n_inner is"),
    ],
)
def test_numbers_the_model_cannot_hold_are_located_errors(tmp_path, config, message):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(config)
    assert_clean(_import("config-number", tmp_path / "hf", tmp_path / "out"), 1, "config.json", message)


@pytest.mark.parametrize(
    ("vocab", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"<unk>": 1' + "0" * 5000 + "}", "holds a value that cannot be read"),
        ('{"<unk>": 1, "<unk>": 2}', "holds a key twice"),
        ('{"<unk>": 1e400}', "beyond the range of a float"),
        ('{"<unk>": -1}', "vocab.json: expected a mapping of piece → id"),
    ],
)
def test_marians_vocab_json_is_read_as_every_json_file_is(marian_dir, tmp_path, vocab, message):
    (marian_dir / "vocab.json").write_text(vocab)
    outcome = _import("marian-vocab", marian_dir, tmp_path / "out")
    assert_clean(outcome, 1, message)
    assert not (tmp_path / "out").exists()


def test_a_sentencepiece_model_that_is_not_one_is_a_located_error(marian_dir, tmp_path, capfd):
    (marian_dir / "source.spm").write_bytes(SECRET.encode() * 100)
    outcome = _import("marian-spm", marian_dir, tmp_path / "out")
    assert_clean(outcome, 1, "source.spm is not a SentencePiece model", absent=(SECRET,))
    assert SECRET not in capfd.readouterr().err


def test_a_fine_tuned_imports_changed_tokenizer_is_checked_as_the_import_was(gpt2_dir, tmp_path):
    """The imported directory is read again by translate, generate and train: its tokenizer.json is checked there
    too, whatever was changed after the import."""
    assert_clean(_import("hf-for-change", gpt2_dir, tmp_path / "out"), 0)
    tokenizer = tmp_path / "out" / "tokenizer" / "tokenizer.json"
    _edit_json(tokenizer, lambda data: data.__setitem__("post_processor", _processor([_CLS, _SEQ], {})))
    outcome = bounded("hf-changed-tokenizer", "generate", tmp_path / "out", "I like")
    assert_clean(outcome, 1, "tokenizer.json is not a tokenizer blockgraph reads", str(tokenizer))
    (tmp_path / "text.txt").write_text("I like tea\n" * 8, encoding="utf-8")
    tune = ("train", tmp_path / "out", "--data", tmp_path / "text.txt", "--max-steps", "1", "--quiet")
    outcome = bounded("hf-changed-tokenizer-train", *tune, "--out", tmp_path / "tuned")
    assert_clean(outcome, 1, "tokenizer.json is not a tokenizer blockgraph reads", str(tokenizer))


def test_a_long_prompt_is_refused_within_bounds(gpt2_dir, tmp_path):
    """A third of the 1 MiB a line may hold (the library's own bookkeeping takes about 180 bytes a character)."""
    assert_clean(_import("hf-for-prompt", gpt2_dir, tmp_path / "out"), 0)
    prompt = "I like tea " * 30_000  # 330 KB on one line: 90,000 tokens for a model of 32 positions
    outcome = bounded("hf-long-prompt", "generate", tmp_path / "out", "-", stdin=prompt + "\n")
    assert_clean(outcome, 1, "the prompt fills all 32 positions of the model")


# --- silent acceptance: a tensor of the right shape in a dtype the spec's parameters do not have ------------


@pytest.mark.parametrize("kind", ["I64", "BOOL"])
def test_integer_and_boolean_weights_are_refused_not_cast(gpt2_dir, tmp_path, kind):
    tensors = load_file(gpt2_dir / WEIGHTS)
    name = "transformer.h.0.ln_1.bias"
    tensors[name] = tensors[name].long() if kind == "I64" else tensors[name] > 0
    save_file(tensors, gpt2_dir / WEIGHTS, metadata={"format": "pt"})
    outcome = _import(f"weights-{kind}", gpt2_dir, tmp_path / "out")
    assert_clean(outcome, 1, f"tensor '{name}' is {kind}: weights in {kind} cannot be imported")
    assert torch.get_default_dtype() == torch.float32
