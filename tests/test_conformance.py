"""The shipped specs of today's architectures against the reference implementations people use (transformers).

For each family the reference model is built from a small config object (random weights; nothing is
downloaded), every parameter and buffer is drawn again (norm gains and biases too, so a wrong mapping cannot
hide behind a default init), the weights are copied into the spec built with the same sizes through the
family's table (builder/families/), which must use every reference tensor and fill every one of ours,
and the outputs are compared in eval mode on inputs with padded positions: at most 1e-5 apart in float32,
with the same number of learned parameters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import transformers
from conftest import ROOT, SPECS, meta_model, redraw

from blockgraph import builder
from blockgraph.builder.families import FAMILIES
from blockgraph.builder.hf_mappings import Family, Rule, convert, to_hf
from blockgraph.builder.persist import unique_tensors
from blockgraph.common.errors import CheckpointError

torch.set_num_threads(1)
TOLERANCE = 1e-5


def _learned(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass
class Pair:
    ours: torch.nn.Module
    reference: torch.nn.Module


def _pair(model_type: str, reference: torch.nn.Module, overrides: dict[str, Any], heads: int | None = None) -> Pair:
    """Our model of the family's spec at `overrides` with the (redrawn) reference's weights copied in."""
    family = FAMILIES[model_type]
    redraw(reference, seed=1)
    reference.eval()
    ours = builder.build(family.spec_path, overrides=overrides).eval()
    state, computed = convert(family, reference.state_dict(), heads=heads)
    targets, _aliases = unique_tensors(ours)
    assert sorted(state) == sorted(targets), "the table must fill every tensor of the spec, once"
    with torch.no_grad():
        for name, value in state.items():
            assert targets[name].shape == value.shape, name
            targets[name].copy_(value)
    for hf_name, our_name in computed:
        table = ours.get_buffer(our_name).squeeze(0)
        reference_table = reference.state_dict()[hf_name]
        rows = min(len(table), len(reference_table))
        torch.testing.assert_close(table[:rows], reference_table[:rows], rtol=0, atol=1e-6)
    assert _learned(ours) == _learned(reference)
    return Pair(ours, reference)


def _close(ours: torch.Tensor, reference: torch.Tensor, keep: torch.Tensor) -> None:
    """Equal to TOLERANCE at the positions `keep` (True: a real token) of [batch, seq, ...] outputs."""
    difference = (ours - reference).abs()[keep]
    assert difference.max().item() <= TOLERANCE, f"max abs diff {difference.max().item():.3g}"


def _padded(batch: int, seq: int, vocab: int, side: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and a padding mask (True = padding): sequence b has b padded positions on `side`."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab, (batch, seq), generator=generator)
    pad = torch.zeros(batch, seq, dtype=torch.bool)
    for b in range(batch):
        if b:
            pad[b, :b] = side == "left"
            pad[b, seq - b :] = side == "right"
    return tokens, pad


# --- GPT-2 ---------------------------------------------------------------------------------------------------

GPT2_SIZES = {"vocab": 97, "max_len": 32, "d_model": 24, "heads": 4, "layers": 2, "dropout": 0.0}


@pytest.mark.parametrize("side", ["right", "left"])
def test_gpt2(side):
    config = transformers.GPT2Config(
        vocab_size=97, n_positions=32, n_embd=24, n_layer=2, n_head=4, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0
    )
    pair = _pair("gpt2", transformers.GPT2LMHeadModel(config), GPT2_SIZES)
    tokens, pad = _padded(3, 9, 97, side)
    with torch.no_grad():
        reference = pair.reference(input_ids=tokens, attention_mask=(~pad).long()).logits
        ours = pair.ours(tokens=tokens, pad=pad)
    _close(ours, reference, ~pad)


# --- BERT ----------------------------------------------------------------------------------------------------


def test_bert_with_segments_and_padding():
    config = transformers.BertConfig(
        vocab_size=91, hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
        max_position_embeddings=32, type_vocab_size=2, hidden_dropout_prob=0, attention_probs_dropout_prob=0,
    )  # fmt: skip
    sizes = {"vocab": 91, "max_len": 32, "d_model": 24, "heads": 4, "d_ff": 40, "layers": 2, "dropout": 0.0}
    pair = _pair("bert", transformers.BertModel(config), sizes)
    tokens, pad = _padded(3, 10, 91, "right")
    segment = (torch.arange(10) >= 4).long().expand(3, -1).contiguous()
    with torch.no_grad():
        reference = pair.reference(input_ids=tokens, token_type_ids=segment, attention_mask=(~pad).long())
        ours = pair.ours(tokens=tokens, segment=segment, pad=pad)
    _close(ours["last_hidden_state"], reference.last_hidden_state, ~pad)
    _close(ours["pooler_output"], reference.pooler_output, torch.ones(3, dtype=torch.bool))


# --- LLaMA and Mistral ---------------------------------------------------------------------------------------

LLAMA_SIZES = {"vocab": 89, "d_model": 32, "heads": 4, "d_ff": 44, "layers": 2, "rope_theta": 500.0, "eps": 1e-6}


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_llama(side, kv_heads):
    config = transformers.LlamaConfig(
        vocab_size=89, hidden_size=32, intermediate_size=44, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, rope_theta=500.0, rms_norm_eps=1e-6, max_position_embeddings=64,
    )  # fmt: skip
    pair = _pair("llama", transformers.LlamaForCausalLM(config), {**LLAMA_SIZES, "kv_heads": kv_heads})
    tokens, pad = _padded(3, 9, 89, side)
    with torch.no_grad():
        reference = pair.reference(input_ids=tokens, attention_mask=(~pad).long()).logits
        ours = pair.ours(tokens=tokens, pad=pad)
    _close(ours, reference, ~pad)


@pytest.mark.parametrize("side", ["right", "left"])
def test_mistral_with_a_sliding_window(side):
    config = transformers.MistralConfig(
        vocab_size=89, hidden_size=32, intermediate_size=44, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=3, rope_theta=500.0, rms_norm_eps=1e-5, max_position_embeddings=64,
    )  # fmt: skip
    sizes = {**LLAMA_SIZES, "kv_heads": 2, "window": 3, "eps": 1e-5}
    pair = _pair("mistral", transformers.MistralForCausalLM(config), sizes)
    tokens, pad = _padded(3, 9, 89, side)
    with torch.no_grad():
        reference = pair.reference(input_ids=tokens, attention_mask=(~pad).long()).logits
        ours = pair.ours(tokens=tokens, pad=pad)
        unwindowed = builder.build(SPECS / "mistral.yaml", overrides={**sizes, "window": None}).eval()
        unwindowed.load_state_dict(pair.ours.state_dict())
        without = unwindowed(tokens=tokens, pad=pad)
    _close(ours, reference, ~pad)
    assert (without - reference).abs()[~pad].max() > 1e-3  # the window matters at these lengths


# --- GPT-NeoX ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
def test_gpt_neox_parallel_residual_and_partial_rotary(side):
    config = transformers.GPTNeoXConfig(
        vocab_size=83, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        rotary_pct=0.5, rotary_emb_base=700, max_position_embeddings=64, use_parallel_residual=True,
        hidden_dropout=0.0, attention_dropout=0.0,
    )  # fmt: skip
    config.rope_parameters = {**config.rope_parameters, "rope_theta": 700.0}
    sizes = {"vocab": 83, "d_model": 32, "heads": 4, "d_ff": 48, "layers": 2, "rotary_pct": 0.5, "rope_theta": 700.0}
    pair = _pair("gpt_neox", transformers.GPTNeoXForCausalLM(config), sizes, heads=4)
    tokens, pad = _padded(3, 9, 83, side)
    with torch.no_grad():
        reference = pair.reference(input_ids=tokens, attention_mask=(~pad).long()).logits
        ours = pair.ours(tokens=tokens, pad=pad)
    _close(ours, reference, ~pad)


# --- Marian and BART -----------------------------------------------------------------------------------------


def _seq2seq(pair: Pair, vocab: int) -> None:
    """Source right-padded, target right-padded: the logits at real target positions agree."""
    src, src_pad = _padded(3, 8, vocab, "right", seed=1)
    tgt, tgt_pad = _padded(3, 7, vocab, "right", seed=2)
    with torch.no_grad():
        reference = pair.reference(
            input_ids=src,
            attention_mask=(~src_pad).long(),
            decoder_input_ids=tgt,
            decoder_attention_mask=(~tgt_pad).long(),
        ).logits
        ours = pair.ours(src=src, tgt=tgt, src_pad=src_pad, tgt_pad=tgt_pad)
    _close(ours, reference, ~tgt_pad)


SEQ2SEQ_SIZES = {"vocab": 71, "max_len": 32, "d_model": 24, "heads": 4, "d_ff": 40, "enc_layers": 2, "dec_layers": 2}


def test_marian():
    config = transformers.MarianConfig(
        vocab_size=71, decoder_vocab_size=71, max_position_embeddings=32, d_model=24, encoder_layers=2,
        decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=40,
        decoder_ffn_dim=40, activation_function="swish", scale_embedding=True, pad_token_id=70,
        decoder_start_token_id=70, dropout=0.0,
    )  # fmt: skip
    pair = _pair("marian", transformers.MarianMTModel(config), {**SEQ2SEQ_SIZES, "dropout": 0.0})
    _seq2seq(pair, 70)


def test_bart():
    config = transformers.BartConfig(
        vocab_size=71, max_position_embeddings=32, d_model=24, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=40, decoder_ffn_dim=40,
        activation_function="gelu", dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    )  # fmt: skip
    pair = _pair("bart", transformers.BartForConditionalGeneration(config), {**SEQ2SEQ_SIZES, "dropout": 0.0})
    _seq2seq(pair, 71)


# --- T5 ------------------------------------------------------------------------------------------------------


def test_t5_relative_position_bias_and_unscaled_attention():
    config = transformers.T5Config(
        vocab_size=71, d_model=24, d_kv=8, d_ff=40, num_layers=2, num_decoder_layers=2, num_heads=3,
        relative_attention_num_buckets=8, relative_attention_max_distance=12, dropout_rate=0.0,
        feed_forward_proj="relu", tie_word_embeddings=True, layer_norm_epsilon=1e-6,
    )  # fmt: skip
    sizes = {"vocab": 71, "d_model": 24, "d_kv": 8, "heads": 3, "d_ff": 40, "enc_layers": 2, "dec_layers": 2,
             "buckets": 8, "max_distance": 12, "dropout": 0.0}  # fmt: skip
    pair = _pair("t5", transformers.T5ForConditionalGeneration(config), sizes)
    src, src_pad = _padded(3, 16, 71, "right", seed=1)  # longer than max_distance: the log buckets are used
    tgt, tgt_pad = _padded(3, 14, 71, "right", seed=2)
    with torch.no_grad():
        reference = pair.reference(
            input_ids=src, attention_mask=(~src_pad).long(), decoder_input_ids=tgt,
            decoder_attention_mask=(~tgt_pad).long(),
        ).logits  # fmt: skip
        ours = pair.ours(src=src, tgt=tgt, src_pad=src_pad, tgt_pad=tgt_pad)
    _close(ours, reference, ~tgt_pad)


# --- Luong's input feeding (no library has it: the reference is the paper's equations, step by step) --------


def test_input_feeding_decoder_follows_the_equations():
    """h_t = LSTM([y_t; h̃_{t−1}]), a_t = softmax(h_tᵀ W_a h̄_s), c_t = Σ a_t h̄_s, h̃_t = tanh(W_c[c_t; h_t])."""
    sizes = {"src_vocab": 30, "tgt_vocab": 29, "emb": 6, "hidden": 8, "layers": 2, "dropout": 0.0}
    model = builder.build(SPECS / "rnn_seq2seq_input_feeding.yaml", overrides=sizes).eval()
    redraw(model, seed=3)
    src, src_pad = _padded(3, 7, 30, "right", seed=1)
    tgt = torch.randint(1, 29, (3, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = model(src=src, tgt=tgt, src_pad=src_pad)
        memory, h, c = model.encoder(model.src_embed(src), mask=src_pad)
        decoder = model.decoder
        cells = [torch.nn.LSTMCell(6 + 8 if i == 0 else 8, 8) for i in range(2)]
        for i, cell in enumerate(cells):
            for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(cell, kind).copy_(getattr(decoder.lstm, f"{kind}_l{i}"))
        states = [(h[i], c[i]) for i in range(2)]
        attentional = torch.zeros(3, 8)
        logits = []
        for t in range(5):
            inp = torch.cat((model.tgt_embed(tgt[:, t]), attentional), dim=-1)
            for i, cell in enumerate(cells):
                states[i] = cell(inp, states[i])
                inp = states[i][0]
            scores = torch.einsum("bd,bsd->bs", inp, decoder.attn.w_a(memory)).masked_fill(src_pad, float("-inf"))
            context = torch.einsum("bs,bsd->bd", scores.softmax(-1), memory)
            attentional = torch.tanh(decoder.w_c(torch.cat((context, inp), dim=-1)))
            logits.append(model.generator(attentional))
        reference = torch.stack(logits, dim=1)
    assert (ours["log_probs"] - reference).abs().max().item() <= TOLERANCE


# --- the shipped specs' default sizes are the published models' ----------------------------------------------

PUBLISHED = {
    "gpt2.yaml": ("GPT2LMHeadModel", "GPT2Config", {}),
    "bert.yaml": ("BertModel", "BertConfig", {}),
    "roberta.yaml": ("RobertaModel", "RobertaConfig", {"max_position_embeddings": 514, "type_vocab_size": 1}),
    "llama.yaml": ("LlamaForCausalLM", "LlamaConfig", {"intermediate_size": 11008, "rms_norm_eps": 1e-6}),
    "mistral.yaml": ("MistralForCausalLM", "MistralConfig", {}),
    "mixtral.yaml": ("MixtralForCausalLM", "MixtralConfig", {}),
    "deepseek_v3.yaml": ("DeepseekV3ForCausalLM", "DeepseekV3Config", {}),  # 671B: meta, never allocated
    "qwen2_moe.yaml": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig", {}),
    "qwen3_moe.yaml": (
        "Qwen3MoeForCausalLM",
        "Qwen3MoeConfig",
        {"num_hidden_layers": 48, "head_dim": 128, "norm_topk_prob": True},
    ),
    "gpt_neox.yaml": (
        "GPTNeoXForCausalLM",
        "GPTNeoXConfig",
        {
            "vocab_size": 50432,
            "hidden_size": 6144,
            "num_hidden_layers": 44,
            "num_attention_heads": 64,
            "intermediate_size": 24576,
            "rotary_pct": 0.25,
        },
    ),
    "marian_zh_en.yaml": (
        "MarianMTModel",
        "MarianConfig",
        {
            "vocab_size": 65001,
            "decoder_vocab_size": 65001,
            "max_position_embeddings": 512,
            "d_model": 512,
            "encoder_layers": 6,
            "decoder_layers": 6,
            "encoder_attention_heads": 8,
            "decoder_attention_heads": 8,
            "encoder_ffn_dim": 2048,
            "decoder_ffn_dim": 2048,
            "pad_token_id": 65000,
        },
    ),
    "bart.yaml": (
        "BartForConditionalGeneration",
        "BartConfig",
        {
            "d_model": 768,
            "encoder_layers": 6,
            "decoder_layers": 6,
            "encoder_attention_heads": 12,
            "decoder_attention_heads": 12,
            "encoder_ffn_dim": 3072,
            "decoder_ffn_dim": 3072,
        },
    ),
    "t5.yaml": ("T5ForConditionalGeneration", "T5Config", {}),
    "whisper.yaml": (
        "WhisperForConditionalGeneration",
        "WhisperConfig",
        {
            "d_model": 512,
            "encoder_layers": 6,
            "decoder_layers": 6,
            "encoder_attention_heads": 8,
            "decoder_attention_heads": 8,
            "encoder_ffn_dim": 2048,
            "decoder_ffn_dim": 2048,
        },
    ),
    "qwen2.yaml": (
        "Qwen2ForCausalLM",
        "Qwen2Config",
        {
            "vocab_size": 152064,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
        },
    ),
    "qwen3.yaml": (
        "Qwen3ForCausalLM",
        "Qwen3Config",
        {"intermediate_size": 12288, "num_hidden_layers": 36, "num_key_value_heads": 8, "head_dim": 128},
    ),
    "olmo2.yaml": ("Olmo2ForCausalLM", "Olmo2Config", {"vocab_size": 100352}),
    "phi3.yaml": ("Phi3ForCausalLM", "Phi3Config", {}),
    "gemma.yaml": ("GemmaForCausalLM", "GemmaConfig", {}),
    "gemma2.yaml": (
        "Gemma2ForCausalLM",
        "Gemma2Config",
        {
            "hidden_size": 3584,
            "intermediate_size": 14336,
            "num_hidden_layers": 42,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
        },
    ),
    "gemma3_text.yaml": (
        "Gemma3ForCausalLM",
        "Gemma3TextConfig",
        {
            "vocab_size": 262144,
            "hidden_size": 1152,
            "intermediate_size": 6912,
            "num_hidden_layers": 26,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
        },
    ),
    "vit.yaml": ("ViTForImageClassification", "ViTConfig", {"num_labels": 1000}),  # google/vit-base-patch16-224
    "clip.yaml": ("CLIPModel", "CLIPConfig", {}),  # openai/clip-vit-base-patch32
    "mamba.yaml": ("MambaForCausalLM", "MambaConfig", {"num_hidden_layers": 24}),  # state-spaces/mamba-130m-hf
}


@pytest.mark.parametrize("spec", PUBLISHED)
def test_default_sizes_have_the_published_parameter_count(spec):
    """The spec at its defaults has the learned parameters of the published model (built on meta from its config)."""
    model_class, config_class, settings = PUBLISHED[spec]
    with torch.device("meta"):
        reference = getattr(transformers, model_class)(getattr(transformers, config_class)(**settings))
    assert _learned(meta_model(SPECS / spec)) == _learned(reference)


# --- the tables refuse what they cannot place ------------------------------------------------------------------


def _gpt2_state(**settings: Any) -> dict[str, torch.Tensor]:
    config = transformers.GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2, **settings)
    return transformers.GPT2LMHeadModel(config).state_dict()


def test_a_checkpoint_tensor_no_rule_places_is_refused_by_name():
    state = {**_gpt2_state(), "transformer.h.0.attn.rotary.weight": torch.zeros(2)}
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) of the checkpoint map to nothing: transformer.h.0.attn"):
        convert(FAMILIES["gpt2"], state)


def test_an_untied_output_layer_is_refused_for_a_spec_that_ties_it():
    state = _gpt2_state(tie_word_embeddings=False)
    with torch.no_grad():
        state["lm_head.weight"] += 1
    with pytest.raises(CheckpointError, match=r"lm_head\.weight differ"):
        convert(FAMILIES["gpt2"], state)


def test_fused_heads_need_the_number_of_heads():
    config = transformers.GPTNeoXConfig(vocab_size=11, hidden_size=8, num_hidden_layers=1, num_attention_heads=2)
    with pytest.raises(CheckpointError, match="give `heads`"):
        convert(FAMILIES["gpt_neox"], transformers.GPTNeoXForCausalLM(config).state_dict())


def test_fused_projections_split_into_the_specs_tensors_by_their_shapes_and_back():
    """Phi-3's qkv_proj under grouped-query attention (16 + 8 + 8 rows) and gate_up_proj (gate first)."""
    config = transformers.Phi3Config(
        vocab_size=11, hidden_size=16, intermediate_size=12, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0,
    )  # fmt: skip
    state = transformers.Phi3ForCausalLM(config).state_dict()
    family = FAMILIES["phi3"]
    ours = builder.build(
        family.spec_path, overrides={"vocab": 11, "d_model": 16, "heads": 4, "kv_heads": 2, "d_ff": 12, "layers": 1}
    )
    shapes = {name: tuple(t.shape) for name, t in ours.state_dict().items()}
    split, _ = convert(family, state, shapes=shapes)
    fused = state["model.layers.0.self_attn.qkv_proj.weight"]
    assert torch.equal(split["layers.0.self_attn.w_k.weight"], fused[16:24])
    assert torch.equal(split["layers.0.mlp.w_1.weight"], state["model.layers.0.mlp.gate_up_proj.weight"][:12])
    back = to_hf(family, split)
    assert back.keys() == state.keys() and all(torch.equal(back[name], state[name]) for name in state)
    with pytest.raises(CheckpointError, match="splits fused tensors: give the `shapes`"):
        convert(family, state)
    wrong = {**shapes, "layers.0.self_attn.w_k.weight": (4, 16)}  # 16 + 4 + 8 rows: not the fused tensor's 32
    with pytest.raises(CheckpointError, match=r"qkv_proj\.weight \(32, 16\): not a shape the phi3 table"):
        convert(family, state, shapes=wrong)


def test_two_checkpoint_tensors_onto_one_of_ours_are_refused():
    family = Family("toy", "toy.yaml", (Rule("a.{i}.weight", ("w",)),))
    with pytest.raises(CheckpointError, match="w would be filled by more than one"):
        convert(family, {"a.0.weight": torch.zeros(1), "a.1.weight": torch.ones(1)})


def test_the_models_page_states_the_parameter_counts_the_specs_have():
    """docs/models.md's table is checked, not copied: each count is the spec's, built on meta."""
    rows = re.findall(r"^\| `specs/(\w+\.yaml)` \|[^|]*\| ([\d,]+)", (ROOT / "docs" / "models.md").read_text(), re.M)
    assert {spec for spec, _ in rows} >= set(PUBLISHED)
    for spec, stated in rows:
        assert _learned(meta_model(SPECS / spec)) == int(stated.replace(",", "")), spec
