"""Whisper: a transformers WhisperForConditionalGeneration from a small config (weights redrawn, its stored sinusoid
table perturbed; nothing downloaded) imports into specs/whisper.yaml with its tokenizer.json; its logits on random
features and padded decoder inputs are the original's to 1e-5; greedy decoding of the features is `generate`'s
token for token; `export --format hf` goes back out to a directory transformers loads; `translate --features`
writes the text of a .npy or safetensors file (never a pickle), and every wrong file is a located error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy
import pytest
import torch
import transformers
from conftest import SPECS, redraw
from safetensors.torch import save_file

from blockgraph import builder
from blockgraph.builder import persist
from blockgraph.builder.analysis import analyse
from blockgraph.common.errors import SpecError
from blockgraph.trainer import decode, pretrained
from blockgraph.trainer.roles import find_roles

torch.set_num_threads(1)
VOCAB, EOS, START, MEL, FRAMES = 40, 38, 39, 8, 32  # eos is also pad, as in Whisper's checkpoints
WORDS = [f"w{i}" for i in range(1, EOS)]


def _config() -> transformers.WhisperConfig:
    return transformers.WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=MEL, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24, max_source_positions=FRAMES // 2,
        max_target_positions=24, pad_token_id=EOS, bos_token_id=EOS, eos_token_id=EOS, decoder_start_token_id=START,
        begin_suppress_tokens=None,
    )  # fmt: skip


GREEDY = transformers.GenerationConfig(  # the special ids, nothing Whisper-specific: plain greedy decoding
    decoder_start_token_id=START,
    eos_token_id=EOS,
    pad_token_id=EOS,
    bos_token_id=EOS,
    max_new_tokens=8,
    do_sample=False,
    num_beams=1,
)


def _features(rows: int, seed: int, frames: int = FRAMES) -> torch.Tensor:
    return torch.randn(rows, MEL, frames, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def whisper(tmp_path_factory) -> tuple[transformers.WhisperForConditionalGeneration, Path, Any]:
    """(the reference, the import's directory, its tokenizers.Tokenizer): saved with a word-level tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    root = tmp_path_factory.mktemp("whisper")
    torch.manual_seed(0)
    reference = transformers.WhisperForConditionalGeneration(_config()).eval()
    redraw(reference, seed=1)
    with torch.no_grad():  # larger weights, so that the features rather than the start token choose the words
        for name, parameter in reference.named_parameters():
            if parameter.dim() > 1 and parameter.requires_grad and "embed" not in name:
                parameter.mul_(8 if "encoder_attn" in name else 4)
        table = reference.model.encoder.embed_positions.weight  # frozen, left as is by redraw: the import copies it
        table.add_(0.01 * torch.randn(table.shape, generator=torch.Generator().manual_seed(2)))
    reference.save_pretrained(root / "hf")
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", *WORDS])}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(["<|endoftext|>", "<|startoftranscript|>"])  # ids 38 and 39
    tokenizer.save(str(root / "hf" / "tokenizer.json"))
    pretrained.import_pretrained(root / "hf", root / "out")
    return reference, root / "out", tokenizer


def test_the_import_computes_whispers_logits(whisper):
    reference, out, _ = whisper
    ours = persist.load(out / "model").eval()
    features = _features(3, seed=3)
    tgt = torch.randint(0, EOS, (3, 7), generator=torch.Generator().manual_seed(4))
    tgt_pad = torch.zeros(3, 7, dtype=torch.bool)
    tgt_pad[1, 5:], tgt_pad[2, 3:] = True, True
    with torch.no_grad():
        want = reference(input_features=features, decoder_input_ids=tgt, decoder_attention_mask=(~tgt_pad).long())
        got = ours(features=features, tgt=tgt, tgt_pad=tgt_pad)
    assert (got - want.logits).abs()[~tgt_pad].max().item() <= 1e-5
    assert torch.equal(ours.encoder_positions.pe.weight, reference.model.encoder.embed_positions.weight)
    assert not ours.encoder_positions.pe.weight.requires_grad
    variables = builder.load_spec(out / "spec.yaml").spec.vars
    assert (variables["mel"], variables["source_positions"], variables["max_len"]) == (MEL, FRAMES // 2, 24)


def test_greedy_decoding_of_features_is_generates_token_for_token(whisper):
    """Matched: Whisper's own `generate` and GenerationMixin's plain greedy search, with no language or task
    tokens, no timestamps, no suppressed tokens (the generation config holds only the special ids): from the
    decoder start token, the most likely token each step until eos. Whisper's `generate` leaves out the start
    token and the final eos, and pads with eos; GenerationMixin's keeps both."""
    reference, out, _ = whisper
    loaded = pretrained.load_model(out)
    decoder = decode.Decoder(loaded.model, loaded.roles, specials=loaded.specials)
    assert decoder.reason is None  # the convolutions sit on the fixed side: each step runs the decoder alone
    features = _features(6, seed=5)
    ours = [h.tokens for h in decode.greedy(decoder, features, max_len=8)]
    with torch.no_grad():
        plain = transformers.GenerationMixin.generate(reference, input_features=features, generation_config=GREEDY)
        whispers = reference.generate(input_features=features, generation_config=GREEDY).tolist()
    plain = plain.tolist()
    assert [tuple(row[1 : row.index(EOS, 1) + 1] if EOS in row[1:] else row[1:]) for row in plain] == ours
    ended = [list(tokens[:-1] if tokens[-1:] == (EOS,) else tokens) for tokens in ours]
    assert [_unpadded(row) for row in whispers] == ended
    assert len(set(ours)) > 1 and any(EOS in tokens for tokens in ours)  # the features choose; some rows end


def _unpadded(row: list[int]) -> list[int]:
    """A row of Whisper's `generate` without the eos it pads with."""
    while row and row[-1] == EOS:
        row = row[:-1]
    return row


def test_each_step_equals_a_full_rerun_with_the_features_encoded_once(whisper):
    """The rows reordered between steps as beam search reorders them (kept, swapped, duplicated, dropped)."""
    from test_incremental import _reorders, _stepped

    loaded = pretrained.load_model(whisper[1])
    decoder = decode.Decoder(loaded.model, loaded.roles, specials=loaded.specials)
    features = _features(4, seed=6)
    tgt = torch.cat((torch.full((4, 1), START), torch.randint(0, EOS, (4, 6))), dim=1)
    with torch.no_grad():
        full = loaded.model(features=features, tgt=tgt).log_softmax(-1)
    steps = _stepped(decoder, tgt, features, None, first=2, order=_reorders(4))
    torch.testing.assert_close(steps[0][1], full[:, 1], atol=1e-5, rtol=0)
    for position, (rows, log_probs) in enumerate(steps[1:], start=2):
        torch.testing.assert_close(log_probs, full[rows, position], atol=1e-5, rtol=0)


def test_export_goes_back_out_as_transformers_loads_it(whisper, tmp_path, run_cli):
    """HF's tensor names (the encoder's stored table among them, the tied output layer left out) and its logits."""
    from safetensors import safe_open

    reference, out, _ = whisper
    result = run_cli("export", out, "--format", "hf", "--out", tmp_path / "back")
    assert result.code == 0, result.stderr
    back = tmp_path / "back"
    assert {p.name for p in back.iterdir()} == {
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json"
    }  # fmt: skip
    names = [safe_open(str(d / "model.safetensors"), "pt").keys() for d in (back, out.parent / "hf")]
    assert set(names[0]) == set(names[1])
    loaded = transformers.AutoModelForSpeechSeq2Seq.from_pretrained(back).eval()
    assert type(loaded) is type(reference)
    features, tgt = _features(2, seed=7), torch.randint(0, EOS, (2, 5), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        got = loaded(input_features=features, decoder_input_ids=tgt).logits
        want = reference(input_features=features, decoder_input_ids=tgt).logits
    assert (got - want).abs().max().item() <= 1e-5
    assert torch.equal(loaded.model.encoder.embed_positions.weight, reference.model.encoder.embed_positions.weight)


def test_translate_writes_the_text_of_a_features_file(whisper, tmp_path, run_cli):
    """Two utterances in a .npy, one in a safetensors file: each line is the tokenizer's decoding of `generate`."""
    reference, out, tokenizer = whisper
    features = _features(3, seed=9)
    with torch.no_grad():
        generated = transformers.GenerationMixin.generate(
            reference, input_features=features, generation_config=GREEDY
        ).tolist()
    texts = [tokenizer.decode(row, skip_special_tokens=True) for row in generated]
    assert len(set(texts)) > 1
    numpy.save(tmp_path / "two.npy", features[:2].numpy())
    save_file({"features": features[2].clone()}, str(tmp_path / "one.safetensors"))
    for name, expected in (("two.npy", texts[:2]), ("one.safetensors", texts[2:])):
        result = run_cli("translate", out, "--features", tmp_path / name, "--max-len", "8")
        assert result.code == 0, result.stderr
        assert result.stdout.splitlines() == expected


class _Planted:
    """Unpickling this creates the marker file: proof that a pickle was opened."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_wrong_features_file_is_a_located_error_and_a_pickle_is_never_opened(whisper, tmp_path, run_cli):
    _, out, _ = whisper
    marker = tmp_path / "ran"
    numpy.save(tmp_path / "pickled.npy", numpy.array([_Planted(marker)], dtype=object), allow_pickle=True)
    numpy.save(tmp_path / "wide.npy", numpy.zeros((MEL + 1, FRAMES), dtype=numpy.float32))
    numpy.save(tmp_path / "ints.npy", numpy.zeros((MEL, FRAMES), dtype=numpy.int64))
    numpy.save(tmp_path / "long.npy", numpy.zeros((MEL, FRAMES + 2), dtype=numpy.float32))
    numpy.save(tmp_path / "nan.npy", numpy.full((MEL, FRAMES), numpy.nan, dtype=numpy.float32))
    (tmp_path / "text.npy").write_text("not an array")
    save_file({"a": torch.zeros(MEL, FRAMES), "b": torch.zeros(1)}, str(tmp_path / "two.safetensors"))
    cases = {
        "pickled.npy": "holds Python objects (a pickle), which are never loaded",
        "wide.npy": f"have shape [{MEL + 1}, {FRAMES}]; the model's 'features' input takes [{MEL}, frames]",
        "ints.npy": "holds int64 values: features are floating-point numbers",
        "long.npy": f"too long for the model: the sequence length {FRAMES // 2 + 1}",
        "nan.npy": "NaN or infinite values",
        "text.npy": "is not a NumPy .npy array (nor .safetensors)",
        "two.safetensors": "holds 2 tensors ('a', 'b')",
    }
    for name, message in cases.items():
        result = run_cli("translate", out, "--features", tmp_path / name)
        assert result.code == 1 and message in result.stderr, (name, result.stderr)
        assert str(tmp_path / name) in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()
    result = run_cli("translate", out, "hello")
    assert result.code == 1 and "reads float features ('features'), not text" in result.stderr
    assert "--features" in result.stderr


def test_training_refuses_a_features_source_by_name():
    graph = builder.build(SPECS / "whisper.yaml", device="meta").typed_graph.graph
    with pytest.raises(SpecError, match=r"the source input 'features' holds float32 features, not token ids"):
        find_roles(graph)
    assert find_roles(graph, features=True).src == "features"


def test_inspect_reads_the_spectrogram_and_counts_the_convolutions():
    sizes = {"vocab": VOCAB, "mel": MEL, "d_model": 16, "heads": 2, "d_ff": 24, "enc_layers": 1, "dec_layers": 1}
    typed = builder.pipeline.typed_graph(SPECS / "whisper.yaml", sizes)
    model = builder.pipeline.compile_graph(typed, device="meta")
    costs = analyse(typed, model, {"batch": 2, "frames": FRAMES, "tgt_len": 5})
    assert costs.nodes["conv1"].flops == costs.nodes["conv1"].flops_analytic == 2 * 2 * 16 * FRAMES * MEL * 3
    assert costs.nodes["conv2"].flops == 2 * 2 * 16 * (FRAMES // 2) * 16 * 3
    assert costs.flops == costs.flops_analytic


def test_a_features_header_that_claims_more_than_the_file_holds_is_refused_before_allocating(tmp_path):
    """A .npy header of 8 × 10¹² floats over 64 bytes, and a sparse safetensors file whose (consistent) header
    claims 6 GB: each refused from its header, in a process under a 3 GiB address-space cap and a timeout."""
    import json
    import resource
    import struct
    import subprocess
    import sys

    claimed = tmp_path / "claimed.npy"
    with open(claimed, "wb") as handle:
        numpy.lib.format.write_array_header_1_0(
            handle, {"descr": "<f4", "fortran_order": False, "shape": (MEL, 10**12)}
        )
        handle.write(bytes(64))
    sparse, count = tmp_path / "sparse.safetensors", MEL * 100_000_000
    header = json.dumps({"features": {"dtype": "F64", "shape": [MEL, 100_000_000], "data_offsets": [0, 8 * count]}})
    with open(sparse, "wb") as handle:
        handle.write(struct.pack("<Q", len(header)) + header.encode())
        handle.truncate(8 + len(header) + 8 * count)
    sizes = {"vocab": VOCAB, "mel": MEL, "d_model": 16, "heads": 2, "d_ff": 24, "enc_layers": 1, "dec_layers": 1}
    script = f"""
from blockgraph.builder import pipeline
from blockgraph.common.errors import DataError
from blockgraph.trainer.features import read_features
typed = pipeline.typed_graph({str(SPECS / "whisper.yaml")!r}, {sizes!r})
for path in ({str(claimed)!r}, {str(sparse)!r}):
    try:
        read_features(path, typed, "features")
    except DataError as exc:
        print(exc)
"""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, preexec_fn=cap, check=False
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    for path, message in (
        (claimed, f"header says [{MEL}, 1000000000000] float32 values, which its 64 bytes of data do not hold"),
        (sparse, "the features tensor 'features' holds 5.96 GiB: the limit is 1 GiB"),
    ):
        assert str(path) in done.stdout and message in done.stdout, done.stdout
