"""The example specs in specs/: every one validates, builds and inspects; each model does what its header says."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from conftest import SPECS, meta_model
from torch import nn

from blockgraph import builder
from blockgraph.blocks.attention import GlobalAttention, HardAttention, LocalAttention

SPEC_FILES = sorted(p for p in SPECS.iterdir() if p.suffix in {".yaml", ".yml", ".json"})
TRANSFORMER = SPECS / "transformer.yaml"
TIED = SPECS / "transformer_tied.yaml"
SEQ2SEQ = {
    "rnn_seq2seq_attention.yaml": GlobalAttention,
    "rnn_seq2seq_local.yaml": LocalAttention,
    "rnn_seq2seq_hard.yaml": HardAttention,
}

# Specs above this many parameters are built through the CLI with their size variables shrunk (their
# full-size graph is still compiled, weightless, by validate and inspect); smaller ones are built as shipped.
FULL_BUILD_LIMIT = 25_000_000
SMALL_VARS = {
    "vocab": 50,
    "src_vocab": 50,
    "tgt_vocab": 50,
    "d_model": 16,
    "heads": 2,
    "kv_heads": 1,
    "d_ff": 32,
    "emb": 16,
    "hidden": 16,
    "layers": 1,
    "enc_layers": 1,
    "dec_layers": 1,
    "vision_d_model": 16,  # CLIP's vision tower
    "vision_heads": 2,
    "vision_d_ff": 32,
    "vision_layers": 1,
    "patch": 4,  # images of 12 × 12 pixels (the trial's --dim cap): a 3 × 3 grid
    "image_size": 12,
}
SMALL_TRANSFORMER = {"src_vocab": 50, "tgt_vocab": 50, "d_model": 32, "heads": 4, "enc_layers": 2, "dec_layers": 2}
SMALL_RNN = {"src_vocab": 50, "tgt_vocab": 50, "emb": 16, "hidden": 24, "layers": 2}


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def spec_vars(path) -> dict:
    return dict(builder.load_spec(path).spec.vars)


# ---------------------------------------------------------------- every spec, through the CLI


def test_the_specs_directory_holds_the_shipped_examples():
    names = {p.name for p in SPEC_FILES}
    expected = {"transformer.yaml", "transformer_tied.yaml", "encoder_classifier.yaml", "gpt_decoder.yaml"}
    assert expected | {"lstm_lm.yaml", *SEQ2SEQ} <= names


@pytest.mark.parametrize("path", SPEC_FILES, ids=lambda p: p.name)
def test_spec_validates_strictly_and_inspects(run_cli, path):
    result = run_cli("validate", "--strict", path)
    assert result.code == 0, result.stdout + result.stderr
    assert "warning" not in result.stderr
    inspected = run_cli("inspect", path)
    assert inspected.code == 0, inspected.stdout + inspected.stderr
    total = n_params(meta_model(path))
    assert re.search(rf"total\s+{total:,} parameters", inspected.stdout), inspected.stdout


@pytest.mark.parametrize("path", SPEC_FILES, ids=lambda p: p.name)
def test_spec_builds_through_the_cli(run_cli, path):
    overrides: dict = {}
    if n_params(meta_model(path)) > FULL_BUILD_LIMIT:
        overrides = {k: v for k, v in SMALL_VARS.items() if k in spec_vars(path)}
        assert overrides, f"{path.name} is too large to build in a test and declares none of {sorted(SMALL_VARS)}"
    dims = builder.load_spec(path).spec.dims
    args = [f"--set={k}={v}" for k, v in overrides.items()] + [f"--dim={k}={min(v, 12)}" for k, v in dims.items()]
    result = run_cli("build", path, *args)
    assert result.code == 0, result.stdout + result.stderr
    expected = n_params(builder.build(path, device="meta", overrides=overrides) if overrides else meta_model(path))
    assert f"parameters  {expected:,}" in result.stdout


# ---------------------------------------------------------------- the Transformer


def test_transformer_has_exactly_the_parameters_of_torch_nn_transformer_plus_embeddings():
    v = spec_vars(TRANSFORMER)
    with torch.device("meta"):
        reference = nn.Transformer(512, 8, 6, 6, 2048, batch_first=True)
        src_embed, tgt_embed = nn.Embedding(v["src_vocab"], 512), nn.Embedding(v["tgt_vocab"], 512)
        generator = nn.Linear(512, v["tgt_vocab"])
    model = builder.build(TRANSFORMER, device="meta")
    assert n_params(model.encoder) + n_params(model.encoder_norm) == n_params(reference.encoder)
    assert n_params(model.decoder) + n_params(model.decoder_norm) == n_params(reference.decoder)
    expected = n_params(reference) + n_params(src_embed) + n_params(tgt_embed) + n_params(generator)
    assert n_params(model) == expected
    assert len(model.encoder) == 6 and len(model.decoder) == 6


def test_tied_transformer_shares_one_matrix_between_target_embedding_and_generator():
    v = spec_vars(TIED)
    untied = n_params(builder.build(TRANSFORMER, device="meta"))
    model = builder.build(TIED, device="meta")
    assert model.generator.proj.weight is model.tgt_embed.lut.weight
    assert n_params(model) == untied - n_params(nn.Embedding(v["tgt_vocab"], v["d_model"], device="meta"))
    small = builder.build(TIED, overrides=SMALL_TRANSFORMER)
    assert small.generator.proj.weight is small.tgt_embed.lut.weight
    assert "generator.proj.weight" not in dict(small.named_parameters())  # counted once, trained once


def test_transformer_is_causal_in_the_target():
    model = builder.build(TRANSFORMER, overrides=SMALL_TRANSFORMER).eval()
    src, tgt = torch.randint(0, 50, (2, 7)), torch.randint(0, 50, (2, 6))
    changed = tgt.clone()
    changed[:, 4:] = (tgt[:, 4:] + 1) % 50
    before, after = model(src, tgt), model(src, changed)
    torch.testing.assert_close(after[:, :4], before[:, :4])
    assert not torch.allclose(after[:, 4:], before[:, 4:])


def test_transformer_ignores_padded_source_tokens():
    model = builder.build(TRANSFORMER, overrides=SMALL_TRANSFORMER).eval()
    src, tgt = torch.randint(0, 50, (2, 7)), torch.randint(0, 50, (2, 5))
    src_pad = torch.zeros(2, 7, dtype=torch.bool)
    src_pad[0, 5:] = src_pad[1, 3:] = True
    changed = src.masked_fill(src_pad, 3)
    before = model(src, tgt, src_pad=src_pad)
    torch.testing.assert_close(model(changed, tgt, src_pad=src_pad), before)
    assert not torch.allclose(model(changed, tgt), model(src, tgt))  # without the mask they are read


def test_transformer_target_padding_keeps_real_positions_finite_and_normalised():
    model = builder.build(TRANSFORMER, overrides=SMALL_TRANSFORMER).eval()
    src, tgt = torch.randint(0, 50, (2, 7)), torch.randint(0, 50, (2, 5))
    tgt_pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    out = model(src, tgt, tgt_pad=tgt_pad)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(2, 5))


# ---------------------------------------------------------------- one training step, every trainable model


def translation_batch(vocab: int = 50):
    src, tgt = torch.randint(1, vocab, (4, 9)), torch.randint(1, vocab, (4, 8))
    return (src, tgt[:, :-1]), tgt[:, 1:]


def lm_batch(vocab: int = 50):
    tokens = torch.randint(1, vocab, (4, 10))
    return (tokens[:, :-1],), tokens[:, 1:]


TRAINING = {
    "transformer.yaml": (SMALL_TRANSFORMER, translation_batch),
    "transformer_tied.yaml": (SMALL_TRANSFORMER, translation_batch),
    "gpt_decoder.yaml": ({"vocab": 50, "d_model": 32, "heads": 4, "layers": 2}, lm_batch),
    "lstm_lm.yaml": ({"vocab": 50, "emb": 16, "hidden": 24}, lm_batch),
    "encoder_classifier.yaml": (
        {"vocab": 50, "d_model": 32, "heads": 4, "layers": 2, "classes": 3},
        lambda: ((torch.randint(0, 50, (6, 7)),), torch.tensor([0, 1, 2, 0, 1, 2])),
    ),
    **{name: (SMALL_RNN, translation_batch) for name in SEQ2SEQ},
}


@pytest.mark.parametrize("name", sorted(TRAINING))
def test_one_adam_step_reduces_the_nll_loss(name):
    overrides, batch = TRAINING[name]
    model = builder.build(SPECS / name, overrides={**overrides, "dropout": 0.0})
    inputs, targets = batch()

    def loss() -> torch.Tensor:
        out = model(*inputs)
        log_probs = out["log_probs"] if isinstance(out, dict) else out
        return F.nll_loss(log_probs.reshape(-1, log_probs.size(-1)), targets.reshape(-1))

    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.eval()  # the loss is compared in eval mode (hard attention samples in training)
    before = loss()
    model.train()
    optimizer.zero_grad()
    loss().backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        assert loss().item() < before.item()


# ---------------------------------------------------------------- decoder-only and encoder-only models


def test_gpt_decoder_is_causal_and_ties_its_head():
    model = builder.build(SPECS / "gpt_decoder.yaml", overrides=TRAINING["gpt_decoder.yaml"][0]).eval()
    assert model.generator.proj.weight is model.embed.lut.weight
    tokens = torch.randint(0, 50, (2, 9))
    changed = tokens.clone()
    changed[:, 6:] = (tokens[:, 6:] + 1) % 50
    before, after = model(tokens), model(changed)
    torch.testing.assert_close(after[:, :6], before[:, :6])
    assert not torch.allclose(after[:, 6:], before[:, 6:])


def test_gpt_decoder_has_gpt2_small_parameters():
    v = spec_vars(SPECS / "gpt_decoder.yaml")
    d = v["d_model"]
    with torch.device("meta"):
        block = nn.TransformerEncoderLayer(d, v["heads"], 4 * d, norm_first=True)  # same weights as a GPT-2 block
        embeddings = nn.Embedding(v["vocab"], d), nn.Embedding(v["max_len"], d)
    expected = v["layers"] * n_params(block) + sum(map(n_params, embeddings)) + n_params(nn.LayerNorm(d))
    model = builder.build(SPECS / "gpt_decoder.yaml", device="meta")
    assert n_params(model) == expected  # the head is tied to the embedding and has no bias, as in GPT-2


def test_encoder_classifier_gives_class_log_probabilities_that_ignore_padding():
    overrides = TRAINING["encoder_classifier.yaml"][0]
    model = builder.build(SPECS / "encoder_classifier.yaml", overrides=overrides).eval()
    tokens = torch.randint(0, 50, (3, 8))
    pad = torch.zeros(3, 8, dtype=torch.bool)
    pad[1, 5:] = pad[2, 2:] = True
    out = model(tokens, pad)
    assert out.shape == (3, overrides["classes"])
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(3))
    torch.testing.assert_close(model(tokens.masked_fill(pad, 7), pad), out)


def test_lstm_lm_ignores_steps_after_the_padding_starts():
    model = builder.build(SPECS / "lstm_lm.yaml", overrides=TRAINING["lstm_lm.yaml"][0]).eval()
    tokens = torch.randint(0, 50, (2, 6))
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    out = model(tokens, pad)
    assert out.shape == (2, 6, 50)
    torch.testing.assert_close(model(tokens.masked_fill(pad, 9), pad)[:, :4], out[:, :4])


# ---------------------------------------------------------------- RNN encoder–decoders with attention


@pytest.mark.parametrize("name", list(SEQ2SEQ))
def test_seq2seq_variant_shapes_normalisation_and_attention_kind(name):
    model = builder.build(SPECS / name, overrides=SMALL_RNN).eval()
    assert type(model.attn) is SEQ2SEQ[name]
    src, tgt = torch.randint(0, 50, (3, 11)), torch.randint(0, 50, (3, 7))
    src_pad = torch.zeros(3, 11, dtype=torch.bool)
    src_pad[1, 8:] = src_pad[2, 4:] = True
    out = model(src, tgt, src_pad=src_pad)
    assert set(out) == {"log_probs", "attention"}
    assert out["log_probs"].shape == (3, 7, 50) and out["attention"].shape == (3, 7, 11)
    torch.testing.assert_close(out["log_probs"].exp().sum(-1), torch.ones(3, 7))
    weights = out["attention"]
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 7))
    assert (weights >= 0).all() and (weights.masked_select(src_pad[:, None, :]) == 0).all()


def test_seq2seq_variants_differ_only_in_the_attention():
    base = builder.build(SPECS / "rnn_seq2seq_attention.yaml", device="meta").state_dict()
    for name in ("rnn_seq2seq_local.yaml", "rnn_seq2seq_hard.yaml"):
        variant = builder.build(SPECS / name, device="meta").state_dict()
        rest = {k: v.shape for k, v in variant.items() if not k.startswith("attn.")}
        assert rest == {k: v.shape for k, v in base.items() if not k.startswith("attn.")}


def test_hard_attention_weights_are_one_hot_in_eval():
    model = builder.build(SPECS / "rnn_seq2seq_hard.yaml", overrides=SMALL_RNN).eval()
    src, tgt = torch.randint(0, 50, (2, 9)), torch.randint(0, 50, (2, 6))
    weights = model(src, tgt)["attention"]
    assert ((weights == 0) | (weights == 1)).all()
    assert (weights.sum(-1) == 1).all()


def test_seq2seq_computes_luongs_attentional_state_from_the_encoder_and_decoder():
    model = builder.build(SPECS / "rnn_seq2seq_attention.yaml", overrides=SMALL_RNN).eval()
    src, tgt = torch.randint(0, 50, (2, 9)), torch.randint(0, 50, (2, 6))
    m = dict(model.named_modules())
    memory, h, c = m["encoder"](m["src_embed"](src))
    states, _, _ = m["decoder"](m["tgt_embed"](tgt), h, c)  # the decoder starts from the encoder's final state
    context, weights = m["attn"](states, memory)
    expected = m["generator"](torch.tanh(m["w_c"](torch.cat([context, states], -1))))  # tanh(W_c[c_t; h_t])
    out = model(src, tgt)
    torch.testing.assert_close(out["log_probs"], expected)
    torch.testing.assert_close(out["attention"], weights)
