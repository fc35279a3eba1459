"""token_embedding (pretrained text vectors, padding, scale), sinusoidal_position and learned_position."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError

from blockgraph import builder
from blockgraph.blocks.embedding import PretrainedFileError, TokenEmbedding
from blockgraph.blocks.positional import LearnedPosition, SinusoidalPosition, sinusoid_table
from blockgraph.blocks.types import ShapeError, TensorType, symbol
from blockgraph.builder.shapes import check_bounds, largest
from blockgraph.common.errors import SpecError

# --- pretrained vectors ------------------------------------------------------------------------------------------

GLOVE = """the 0.5 -1.25 2.0
cat 1.0 2.0 3.0
dog -0.5 0.25 4.5
"""


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def embedding(**params) -> TokenEmbedding:
    return TokenEmbedding(TokenEmbedding.Params(**params))


def test_pretrained_glove_rows_follow_the_vocab_file(tmp_path):
    vectors = write(tmp_path, "glove.txt", GLOVE)
    vocab = write(tmp_path, "vocab.txt", "<pad>\ncat\nthe\nunk\ndog\n")
    emb = embedding(vocab=5, dim=3, pretrained=vectors, vocab_file=vocab, missing="zeros")
    w = emb.lut.weight.detach()
    assert w[1].tolist() == [1.0, 2.0, 3.0]
    assert w[2].tolist() == [0.5, -1.25, 2.0]
    assert w[4].tolist() == [-0.5, 0.25, 4.5]
    assert w[0].tolist() == [0.0, 0.0, 0.0] and w[3].tolist() == [0.0, 0.0, 0.0]
    assert emb.lut.weight.requires_grad


def test_word2vec_header_is_skipped_and_order_gives_ids_without_vocab_file(tmp_path):
    vectors = write(tmp_path, "w2v.txt", "3 3\n" + GLOVE)
    emb = embedding(vocab=3, dim=3, pretrained=vectors)
    w = emb.lut.weight.detach()
    assert w.tolist() == [[0.5, -1.25, 2.0], [1.0, 2.0, 3.0], [-0.5, 0.25, 4.5]]


def test_header_and_no_header_give_the_same_table(tmp_path):
    vocab = write(tmp_path, "vocab.txt", "dog\nthe\ncat\n")
    plain = embedding(vocab=3, dim=3, pretrained=write(tmp_path, "a.txt", GLOVE), vocab_file=vocab)
    headed = embedding(vocab=3, dim=3, pretrained=write(tmp_path, "b.txt", "3 3\n" + GLOVE), vocab_file=vocab)
    assert torch.equal(plain.lut.weight, headed.lut.weight)
    assert plain.lut.weight[0].tolist() == [-0.5, 0.25, 4.5]


def test_missing_words_normal_matches_the_pretrained_scale(tmp_path):
    # Two known words whose values have population std exactly 3 (values ±3), then many unknown ids.
    vectors = write(tmp_path, "v.txt", "a 3 -3 3 -3\nb -3 3 -3 3\n")
    tokens = ["a", "b"] + [f"w{i}" for i in range(2000)]
    vocab = write(tmp_path, "vocab.txt", "\n".join(tokens) + "\n")
    emb = embedding(vocab=len(tokens), dim=4, pretrained=vectors, vocab_file=vocab, missing="normal")
    w = emb.lut.weight.detach().double()
    assert w[0].tolist() == [3, -3, 3, -3] and w[1].tolist() == [-3, 3, -3, 3]
    rest = w[2:]
    assert abs(rest.mean().item()) < 0.15  # 8000 draws of N(0, 9): standard error of the mean ≈ 0.034
    assert rest.std().item() == pytest.approx(3.0, rel=0.05)
    assert (rest != 0).all()


def test_padding_row_is_zero_even_if_the_file_has_a_vector(tmp_path):
    vectors = write(tmp_path, "v.txt", GLOVE)
    vocab = write(tmp_path, "vocab.txt", "cat\nthe\ndog\n")
    emb = embedding(vocab=3, dim=3, pretrained=vectors, vocab_file=vocab, padding_idx=1)
    assert emb.lut.weight[1].tolist() == [0.0, 0.0, 0.0]
    assert emb.lut.weight[0].tolist() == [1.0, 2.0, 3.0]


def test_freeze_stops_gradients(tmp_path):
    emb = embedding(vocab=3, dim=3, pretrained=write(tmp_path, "v.txt", GLOVE), freeze=True)
    assert emb.lut.weight.requires_grad is False
    assert emb(torch.tensor([[0, 2]])).requires_grad is False


def test_meta_device_reads_no_file(tmp_path):
    missing_file = str(tmp_path / "does-not-exist.txt")
    with torch.device("meta"):
        emb = embedding(vocab=3, dim=3, pretrained=missing_file, freeze=True)
    assert emb.lut.weight.is_meta and emb.lut.weight.requires_grad is False


def test_word_containing_spaces_is_one_word(tmp_path):
    vectors = write(tmp_path, "v.txt", "new york 1 2\nthe 3 4\n")
    emb = embedding(vocab=2, dim=2, pretrained=vectors, vocab_file=write(tmp_path, "voc.txt", "the\nnew york\n"))
    assert emb.lut.weight.tolist() == [[3.0, 4.0], [1.0, 2.0]]


@pytest.mark.parametrize(
    ("text", "line", "phrase"),
    [
        ("the 0.5 -1.25 2.0\ncat 1.0 2.0\n", 2, "2 values after the word, expected dim=3"),
        ("the 0.5 -1.25 2.0\ncat 1.0 2.0 3.0 4.0\n", 2, "4 values after the word, expected dim=3"),
        ("the 0.5 -1.25 2.0\ndog 1 2 3\ncat 1.0 x2 3.0\n", 3, "value 2 after the word is not a number"),
        ("cat 1.0 nan 3.0\n", 1, "must be finite"),
        ("2 300\nthe 0.5 -1.25 2.0\ncat 1 2 3\n", 1, "header says 300 values per word, expected dim=3"),
        ("5 3\nthe 0.5 -1.25 2.0\ncat 1 2 3\n", 1, "header says 5 words, but the file has 2 vector lines"),
    ],
)
def test_malformed_vector_file_names_file_and_line(tmp_path, text, line, phrase):
    vectors = write(tmp_path, "glove.txt", text)
    vocab = write(tmp_path, "vocab.txt", "the\ncat\n")
    with pytest.raises(PretrainedFileError) as caught:
        embedding(vocab=2, dim=3, pretrained=vectors, vocab_file=vocab)
    message = str(caught.value)
    assert message.startswith(f"{vectors} line {line}: "), message
    assert phrase in message
    assert "cat" not in message and "x2" not in message  # a spec-named file is never quoted
    assert isinstance(caught.value, ValueError) and caught.value.line == line


def test_dim_mismatch_of_a_whole_file_is_reported_at_its_first_line(tmp_path):
    vectors = write(tmp_path, "glove.txt", GLOVE)
    with pytest.raises(PretrainedFileError, match=r"glove\.txt line 1: 3 values after the word, expected dim=4"):
        embedding(vocab=3, dim=4, pretrained=vectors)


def test_vocab_size_mismatch_says_what_to_set(tmp_path):
    vectors = write(tmp_path, "glove.txt", GLOVE)
    vocab = write(tmp_path, "vocab.txt", "the\ncat\n")
    with pytest.raises(PretrainedFileError, match=r"vocab\.txt: 2 tokens \(lines\), but vocab is 5; set vocab: 2"):
        embedding(vocab=5, dim=3, pretrained=vectors, vocab_file=vocab)
    with pytest.raises(PretrainedFileError, match=r"3 distinct words, but vocab is 4"):
        embedding(vocab=4, dim=3, pretrained=vectors)


def test_vocab_file_problems(tmp_path):
    vectors = write(tmp_path, "glove.txt", GLOVE)
    with pytest.raises(PretrainedFileError, match=r"vocab\.txt line 2: empty line"):
        embedding(vocab=3, dim=3, pretrained=vectors, vocab_file=write(tmp_path, "vocab.txt", "the\n\ncat\n"))
    with pytest.raises(PretrainedFileError, match=r"none of the 2 tokens"):
        embedding(vocab=2, dim=3, pretrained=vectors, vocab_file=write(tmp_path, "v2.txt", "zebra\nyak\n"))
    with pytest.raises(PretrainedFileError, match=r"nowhere\.txt: pretrained vectors file not found"):
        embedding(vocab=2, dim=3, pretrained=str(tmp_path / "nowhere.txt"))


def test_binary_file_is_a_clear_error(tmp_path):
    path = tmp_path / "w2v.bin"
    path.write_bytes(b"2 3\nthe \xff\xfe\x00\x01\n")
    with pytest.raises(PretrainedFileError, match=r"w2v\.bin line 2: not UTF-8 text"):
        embedding(vocab=2, dim=3, pretrained=str(path))


def test_vocab_file_needs_pretrained():
    with pytest.raises(ValidationError, match="set pretrained too"):
        TokenEmbedding.Params(vocab=3, dim=3, vocab_file="vocab.txt")


# --- padding and scale -------------------------------------------------------------------------------------------


def test_padding_row_is_zero_and_gets_no_gradient():
    emb = embedding(vocab=6, dim=4, padding_idx=2)
    assert emb.lut.weight[2].abs().sum().item() == 0.0
    tokens = torch.tensor([[2, 1, 2, 5]])
    out = emb(tokens)
    assert out[0, 0].abs().sum().item() == 0.0
    out.sum().backward()
    grad = emb.lut.weight.grad
    assert grad[2].abs().sum().item() == 0.0
    assert grad[1].tolist() == [1.0] * 4 and grad[5].tolist() == [1.0] * 4


def test_scale_multiplies_by_sqrt_dim():
    plain = embedding(vocab=5, dim=9)
    scaled = embedding(vocab=5, dim=9, scale=True)
    scaled.load_state_dict(plain.state_dict())
    tokens = torch.tensor([[0, 3, 4]])
    torch.testing.assert_close(scaled(tokens), plain(tokens) * 3.0, rtol=0, atol=0)
    assert TokenEmbedding.infer(
        TokenEmbedding.Params(vocab=5, dim=9), TensorType((symbol("batch"), 3), torch.int64)
    ).shape == (symbol("batch"), 3, 9)


# --- positional encodings ----------------------------------------------------------------------------------------


def closed_form(max_len: int, dim: int) -> list[list[float]]:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)), in Python floats."""
    table = []
    for pos in range(max_len):
        row = []
        for j in range(dim):
            angle = pos / 10000.0 ** ((2 * (j // 2)) / dim)
            row.append(math.sin(angle) if j % 2 == 0 else math.cos(angle))
        table.append(row)
    return table


@pytest.mark.parametrize(("max_len", "dim"), [(1000, 8), (1000, 7), (3, 1)])
def test_sinusoid_table_equals_the_closed_form(max_len, dim):
    got = sinusoid_table(max_len, dim)
    assert got.dtype == torch.float32 and got.shape == (max_len, dim)
    want = torch.tensor(closed_form(max_len, dim), dtype=torch.float64)
    assert (got.double() - want).abs().max().item() < 1e-6


def test_sinusoidal_position_adds_the_table():
    block = SinusoidalPosition(SinusoidalPosition.Params(dim=5, max_len=20)).eval()
    x = torch.randn(2, 6, 5)
    want = x.double() + torch.tensor(closed_form(6, 5), dtype=torch.float64)
    assert (block(x).double() - want).abs().max().item() < 1e-6
    assert "pe" not in block.state_dict()


def _positions(kind: str, seq: int | str) -> dict:
    return {
        "name": "positions",
        "dims": {"batch": 2, "seq": 6},
        "inputs": {"x": {"shape": ["batch", seq, 4]}},
        "nodes": {"pos": {"type": kind, "params": {"dim": 4, "max_len": 8}, "in": "x"}},
        "outputs": "pos",
    }


@pytest.mark.parametrize("kind", ["sinusoidal_position", "learned_position"])
def test_positions_longer_than_max_len_are_a_located_error(kind):
    with pytest.raises(SpecError, match=r"sequence length 9 exceeds max_len 8") as caught:
        builder.typed_graph(_positions(kind, 9))
    assert caught.value.problems[0].location.path == ("nodes", "pos", "params", "max_len")
    typed = builder.typed_graph(_positions(kind, "seq"))  # a named length is checked once its size is known
    check_bounds(typed, {"batch": 2, "seq": 8})
    with pytest.raises(SpecError, match=r"sequence length 9 \(seq at batch=2, seq=9\) exceeds max_len 8"):
        check_bounds(typed, {"batch": 2, "seq": 9})
    assert largest(typed, "seq") == 8


def test_learned_position_shape_values_and_gradient():
    block = LearnedPosition(LearnedPosition.Params(dim=4, max_len=10))
    assert block.pe.weight.shape == (10, 4)
    x = torch.randn(3, 6, 4, requires_grad=True)
    y = block(x)
    assert y.shape == (3, 6, 4)
    torch.testing.assert_close(y, x + block.pe.weight[:6].unsqueeze(0))
    y.pow(2).sum().backward()
    grad = block.pe.weight.grad
    # d/dP[pos] of Σ (x + P[pos])² = Σ_batch 2 (x + P[pos]); positions ≥ seq get nothing.
    torch.testing.assert_close(grad[:6], 2 * (x + block.pe.weight[:6]).sum(0).detach())
    assert grad[6:].abs().sum().item() == 0.0
    assert x.grad is not None
    block_params = LearnedPosition.Params(dim=4)
    assert LearnedPosition.infer(block_params, TensorType((2, 7, 4))).shape == (2, 7, 4)
    with pytest.raises(ShapeError, match="dim is 4"):
        LearnedPosition.infer(block_params, TensorType((2, 7, 5)))


def test_spec_with_pretrained_embedding_builds_and_meta_reads_nothing(tmp_path, monkeypatch):

    write(tmp_path, "glove.txt", GLOVE)
    write(tmp_path, "vocab.txt", "dog\ncat\n<unk>\nthe\n")
    spec = {
        "name": "pretrained",
        "inputs": {"tokens": {"dtype": "int64", "shape": ["batch", "seq"], "high": 4}},
        "nodes": {
            "embed": {
                "type": "token_embedding",
                "params": {"vocab": 4, "dim": 3, "pretrained": "glove.txt", "vocab_file": "vocab.txt"},
                "in": "tokens",
            }
        },
        "outputs": "embed",
    }
    monkeypatch.chdir(tmp_path)  # relative paths are resolved from the current directory
    model = builder.build(spec)
    assert model.embed.lut.weight[3].tolist() == [0.5, -1.25, 2.0]
    assert model(tokens=torch.tensor([[1, 0]])).tolist() == [[[1.0, 2.0, 3.0], [-0.5, 0.25, 4.5]]]
    monkeypatch.chdir(tmp_path.parent)  # the files are no longer reachable, and meta does not look for them
    assert builder.build(spec, device="meta").embed.lut.weight.is_meta
    with pytest.raises(
        Exception, match=r"vocab\.txt: vocabulary file not found"
    ) as caught:  # the builder may add the node
        builder.build(spec)
    error = caught.value if isinstance(caught.value, PretrainedFileError) else caught.value.__cause__
    assert isinstance(error, PretrainedFileError) and error.path == "vocab.txt"


def test_scaled_embedding_starts_with_unit_variance_output():
    """With scale, the table is drawn N(0, 1/dim) so that √dim · E[token] has variance 1 (not dim)."""
    scaled = embedding(vocab=4000, dim=64, scale=True, padding_idx=0)
    weights = scaled.lut.weight.detach()[1:]
    assert abs(weights.std().item() - 64**-0.5) < 0.05 * 64**-0.5
    assert torch.count_nonzero(scaled.lut.weight[0]) == 0
    out = scaled(torch.arange(1, 4000))
    assert abs(out.var().item() - 1.0) < 0.05


def test_a_rounded_scale_is_gemmas_normalizer_in_the_tables_dtype():
    """√3072 = 55.43 is 55.5 in bfloat16: Gemma multiplies by that, and so does round_scale (float32: the same)."""
    from transformers.models.gemma.modeling_gemma import GemmaTextScaledWordEmbedding

    ours = embedding(vocab=7, dim=3072, scale=True, round_scale=True)
    reference = GemmaTextScaledWordEmbedding(7, 3072, padding_idx=0, embed_scale=3072**0.5)
    reference.weight.data.copy_(ours.lut.weight.data)
    tokens = torch.arange(7)
    assert torch.equal(ours(tokens), reference(tokens))
    ours, reference = ours.bfloat16(), reference.bfloat16()
    assert torch.equal(ours(tokens), reference(tokens))
    exact = embedding(vocab=7, dim=3072, scale=True).bfloat16()
    exact.lut.weight.data.copy_(ours.lut.weight.data)
    assert not torch.equal(exact(tokens), ours(tokens))
    with pytest.raises(ValidationError, match="round_scale rounds the √dim factor: set scale: true"):
        embedding(vocab=7, dim=4, round_scale=True)


def test_a_file_a_base_spec_names_is_found_beside_the_base(tmp_path):
    """As `extends:` is relative to the file that writes it, so is `pretrained:` in a base."""
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub", "vectors.txt", GLOVE)
    base = {
        "name": "base",
        "inputs": {"tokens": {"dtype": "int64", "shape": ["b", "s"]}},
        "nodes": {
            "embed": {
                "type": "token_embedding",
                "params": {"vocab": 3, "dim": 3, "pretrained": "vectors.txt"},
                "in": "tokens",
            }
        },
        "outputs": {"output": "embed"},
    }
    (tmp_path / "sub" / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "top.yaml").write_text("extends: sub/base.yaml\nname: top\n")
    model = builder.build(tmp_path / "top.yaml")
    assert model.embed.lut.weight[0].tolist() == [0.5, -1.25, 2.0]
