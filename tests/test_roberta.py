"""RoBERTa's positions: counted over the real tokens only, from padding_idx + 1 (`learned_position` given `pad`),
so that left padding moves nothing. Held against transformers' RobertaModel (a small config, weights redrawn,
nothing downloaded) with left and right padding, through `import` and `export --format hf`; the block's decoding
step goes on from the real tokens so far, rows reordered as beam search reorders them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from conftest import redraw

from blockgraph.blocks import REGISTRY, ShapeError, TensorType
from blockgraph.blocks.stepping import StepCache
from blockgraph.blocks.types import symbol
from blockgraph.builder import persist
from blockgraph.builder.hf_export import MAX_SHARD_SIZE
from blockgraph.common.errors import CheckpointError
from blockgraph.trainer import pretrained

torch.set_num_threads(1)

PAD = 1  # RoBERTa's padding_idx: its positions start at 2
SIZES = {
    "vocab_size": 61, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 24,
    "max_position_embeddings": 14, "type_vocab_size": 1, "layer_norm_eps": 1e-5,
}  # fmt: skip


@pytest.fixture(scope="module")
def roberta(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """A RobertaModel saved by transformers and imported once: (the reference, the directory of both)."""
    root = tmp_path_factory.mktemp("roberta")
    torch.manual_seed(0)
    reference = transformers.RobertaModel(transformers.RobertaConfig(**SIZES)).eval()
    redraw(reference, seed=1)
    reference.save_pretrained(root / "hf")
    pretrained.import_pretrained(root / "hf", root / "out")
    return reference, root


def _batch(side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids, the pad id where padded (HF counts positions where the ids are not the pad id), and the mask
    (True = padding): row b has 3b padded positions on `side`."""
    tokens = torch.randint(3, SIZES["vocab_size"], (3, 10), generator=torch.Generator().manual_seed(2))
    pad = torch.zeros(3, 10, dtype=torch.bool)
    for b in (1, 2):
        pad[b, : 3 * b] = side == "left"
        pad[b, 10 - 3 * b :] = side == "right"
    return tokens.masked_fill(pad, PAD), pad


def _theirs(model: torch.nn.Module, tokens: torch.Tensor, pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        output = model(input_ids=tokens, attention_mask=(~pad).long())
    return output.last_hidden_state, output.pooler_output


def _ours(model: torch.nn.Module, tokens: torch.Tensor, pad: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        output = model(tokens=tokens, segment=torch.zeros_like(tokens), pad=pad)
    return output["last_hidden_state"], output["pooler_output"]


@pytest.mark.parametrize("side", ["left", "right"])
def test_the_import_computes_what_roberta_does_padded_on_either_side(roberta, side):
    """Every position (padded ones too: they read padding_idx's row, as HF's do) and the pooled first one."""
    reference, root = roberta
    ours = persist.load(root / "out" / "model").eval()
    tokens, pad = _batch(side)
    (hidden, pooled), (want_hidden, want_pooled) = _ours(ours, tokens, pad), _theirs(reference, tokens, pad)
    assert (hidden - want_hidden).abs().max().item() <= 1e-5
    assert (pooled - want_pooled).abs().max().item() <= 1e-5
    alone = _ours(ours, tokens[2:, ~pad[2]], None)[0]  # the last row's real tokens, unpadded
    assert (hidden[2, ~pad[2]] - alone[0]).abs().max().item() <= 1e-5


def test_the_export_loads_in_transformers_and_computes_the_same_left_padded(roberta):
    reference, root = roberta
    ours = persist.load(root / "out" / "model").eval()
    pretrained.export(ours, root / "out", root / "back", lambda note: None, max_shard_size=MAX_SHARD_SIZE)
    config = json.loads((root / "back" / "config.json").read_text())
    assert config["architectures"] == ["RobertaModel"] and config["pad_token_id"] == PAD
    assert config["max_position_embeddings"] == SIZES["max_position_embeddings"] and config["type_vocab_size"] == 1
    loaded = transformers.AutoModel.from_pretrained(root / "back").eval()
    assert type(loaded) is transformers.RobertaModel
    tokens, pad = _batch("left")
    for got, want in zip(_theirs(loaded, tokens, pad), _theirs(reference, tokens, pad), strict=True):
        assert (got - want).abs().max().item() <= 1e-5


def test_another_padding_id_is_refused_by_message(roberta, tmp_path):
    _, root = roberta
    hf = tmp_path / "hf"
    hf.mkdir()
    shutil.copy(root / "hf" / "model.safetensors", hf)
    config = json.loads((root / "hf" / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "pad_token_id": 0}))
    with pytest.raises(CheckpointError, match="pad_token_id is '0'; the roberta spec implements 1"):
        pretrained.import_pretrained(hf, tmp_path / "out")


# --- the block ---------------------------------------------------------------------------------------------------


def _position(**params: object) -> torch.nn.Module:
    entry = REGISTRY.get("learned_position")
    torch.manual_seed(3)
    return entry.cls(entry.cls.Params(dim=4, max_len=12, **params)).eval()


def test_positions_count_the_real_tokens_from_the_offset_as_fairseq_numbers_them():
    """HF's create_position_ids_from_input_ids: cumsum(mask)·mask + padding_idx, mask = ids ≠ padding_idx."""
    block = _position(offset=2, pad_row=1)
    tokens = torch.tensor([[5, 6, 7, 8, 9, 4], [1, 1, 5, 1, 6, 7], [5, 6, 1, 1, 1, 1]])
    ids = transformers.models.roberta.modeling_roberta.RobertaEmbeddings.create_position_ids_from_input_ids(tokens, 1)
    x = torch.randn(3, 6, 4)
    with torch.no_grad():
        assert torch.equal(block(x, tokens == 1), x + block.pe.weight[ids])
        assert torch.equal(block(x), x + block.pe.weight[2:8])  # no mask: every position is real


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_step_goes_on_from_the_real_tokens_so_far_and_follows_reordered_rows(dtype):
    """A left-padded prompt of 4 positions at once, then one at a time with the rows reordered (swapped, one
    duplicated, one dropped), then steps without a mask (every new position real): each equals the forward's
    rows, in float32 and in bfloat16 (the weights cast, as bfloat16 decoding casts them)."""
    block = _position(offset=2, pad_row=1).to(dtype)
    x = torch.randn(3, 8, 4, dtype=dtype)
    pad = torch.zeros(3, 8, dtype=torch.bool)
    pad[1, :2] = pad[2, :3] = True
    pad[0, 5] = True  # a gap inside a row
    with torch.no_grad():
        full = block(x, pad)
        cache = StepCache(8, {"x": True, "pad": True})
        assert torch.equal(block.step(cache, x[:, :4], pad[:, :4]), full[:, :4])
        rows = torch.arange(3)
        for position, index in zip(range(4, 8), ([1, 0, 2], [0, 0, 2], [2, 1], [0, 1]), strict=True):
            cache.reorder(torch.tensor(index))
            rows = rows[index]
            mask = pad[rows, position : position + 1] if position < 6 else None
            step = block.step(cache, x[rows, position : position + 1], mask)
            assert torch.equal(step, full[rows, position : position + 1]), position


def test_on_meta_the_block_keeps_the_shape():
    with torch.device("meta"):
        block = _position(offset=2, pad_row=1)
        y = block(torch.empty(2, 5, 4), torch.zeros(2, 5, dtype=torch.bool))
    assert y.shape == (2, 5, 4) and y.device.type == "meta"


def test_the_mask_must_be_the_tokens_and_the_padded_row_a_row_of_the_table():
    entry = REGISTRY.get("learned_position")
    with pytest.raises(ValueError, match=r"pad_row \(14\) must be a row of the table, below max_len \+ offset \(14\)"):
        entry.cls.Params(dim=4, max_len=12, offset=2, pad_row=14)
    batch, seq = symbol("batch"), symbol("seq")
    x = TensorType((batch, seq, 4), source="emb")
    params = entry.cls.Params(dim=4, max_len=12)
    assert entry.cls.infer(params, x, TensorType((batch, seq), torch.bool)) == x
    with pytest.raises(ShapeError, match=r"pad \[batch, 7\] bool must be \[batch, seq\]"):
        entry.cls.infer(params, x, TensorType((batch, 7), torch.bool))
