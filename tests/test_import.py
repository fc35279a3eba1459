"""`blockgraph import`: Hugging Face-format directories (made here from small configs with redrawn random
weights, `save_pretrained`; nothing is downloaded) become a spec and a saved model whose outputs equal the
original's to 1e-5 on padded inputs, and whose greedy decoding equals `generate`'s token for token; the
tokenizer comes along (a SentencePiece Marian trained here, a tokenizer.json); what cannot be imported exactly
is refused by message, and a pickle file is never opened."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hf_dirs
import pytest
import torch
import transformers
from conftest import redraw
from hf_dirs import DROPOUTS, HEADS, SEQ

from blockgraph import builder
from blockgraph.builder import persist
from blockgraph.common.errors import CheckpointError
from blockgraph.trainer import decode, pretrained

torch.set_num_threads(1)

GEMMA_SIZES = {  # heads of 12, wider than hidden_size / heads
    "vocab_size": 89, "hidden_size": 32, "intermediate_size": 44, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 12, "max_position_embeddings": 64,
}  # fmt: skip

MODELS: dict[str, tuple[Callable[..., Any], Callable[[], Any]]] = {
    "gpt2": (
        transformers.GPT2LMHeadModel,
        lambda: transformers.GPT2Config(
            vocab_size=97, n_positions=32, n_embd=24, n_layer=2, n_head=4, bos_token_id=96, eos_token_id=96
        ),
    ),
    "llama": (
        transformers.LlamaForCausalLM,
        lambda: transformers.LlamaConfig(
            vocab_size=89,
            hidden_size=32,
            intermediate_size=44,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=500.0,
            max_position_embeddings=64,
        ),
    ),
    "mistral": (
        transformers.MistralForCausalLM,
        lambda: transformers.MistralConfig(
            vocab_size=89,
            hidden_size=32,
            intermediate_size=44,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=3,
            max_position_embeddings=64,
        ),
    ),
    "gpt_neox": (
        transformers.GPTNeoXForCausalLM,
        lambda: transformers.GPTNeoXConfig(
            vocab_size=83,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            rotary_pct=0.5,
            max_position_embeddings=64,
        ),
    ),
    "qwen2": (
        transformers.Qwen2ForCausalLM,
        lambda: transformers.Qwen2Config(
            vocab_size=89,
            hidden_size=32,
            intermediate_size=44,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=500.0,
            max_position_embeddings=64,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    "qwen3": (
        transformers.Qwen3ForCausalLM,
        lambda: transformers.Qwen3Config(
            vocab_size=89,
            hidden_size=32,
            intermediate_size=44,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,  # not hidden_size / heads
            rope_theta=500.0,
            max_position_embeddings=64,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    "olmo2": (
        transformers.Olmo2ForCausalLM,
        lambda: transformers.Olmo2Config(
            vocab_size=89,
            hidden_size=32,
            intermediate_size=44,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=500.0,
            max_position_embeddings=64,
            pad_token_id=None,
            eos_token_id=2,
        ),
    ),
    "phi3": (
        transformers.Phi3ForCausalLM,
        lambda: transformers.Phi3Config(
            vocab_size=89,
            hidden_size=32,
            intermediate_size=44,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,  # q/k/v fused in unequal parts
            partial_rotary_factor=0.5,
            sliding_window=3,  # shorter than the inputs
            max_position_embeddings=64,
            pad_token_id=2,
            eos_token_id=2,
        ),
    ),
    "mixtral": (
        transformers.MixtralForCausalLM,
        lambda: transformers.MixtralConfig(
            vocab_size=89,
            hidden_size=32,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,  # more experts than each token takes: tokens route unevenly
            num_experts_per_tok=2,
            rope_theta=500.0,
            max_position_embeddings=64,
        ),
    ),
    "qwen2_moe": (
        transformers.Qwen2MoeForCausalLM,
        lambda: transformers.Qwen2MoeConfig(
            vocab_size=89,
            hidden_size=32,
            moe_intermediate_size=12,
            shared_expert_intermediate_size=20,  # a gated shared expert beside the routed ones
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=6,
            num_experts_per_tok=2,
            rope_theta=500.0,
            max_position_embeddings=64,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    "deepseek_v3": (  # a dense layer, then two of 8 experts in 4 groups (2 kept), 2 per token; YaRN
        transformers.DeepseekV3ForCausalLM,
        lambda: transformers.DeepseekV3Config(
            vocab_size=89,
            hidden_size=32,
            intermediate_size=44,
            moe_intermediate_size=12,
            num_hidden_layers=3,
            first_k_dense_replace=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            q_lora_rank=12,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            v_head_dim=6,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=1.5,
            max_position_embeddings=1024,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 500.0,
                "factor": 4.0,
                "original_max_position_embeddings": 256,
                "mscale": 0.9,
                "mscale_all_dim": 0.7,
            },
        ),
    ),
    "qwen3_moe": (
        transformers.Qwen3MoeForCausalLM,
        lambda: transformers.Qwen3MoeConfig(
            vocab_size=89,
            hidden_size=32,
            moe_intermediate_size=12,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,  # not hidden_size / heads
            num_experts=5,
            num_experts_per_tok=3,
            norm_topk_prob=True,
            rope_theta=500.0,
            max_position_embeddings=64,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    "bert": (
        transformers.BertModel,
        lambda: transformers.BertConfig(
            vocab_size=91,
            hidden_size=24,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=40,
            max_position_embeddings=32,
        ),
    ),
    "roberta": (  # right-padded here; left padding, with the pad id where padded: tests/test_roberta.py
        transformers.RobertaModel,
        lambda: transformers.RobertaConfig(
            vocab_size=91,
            hidden_size=24,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=40,
            max_position_embeddings=34,
            type_vocab_size=1,
            layer_norm_eps=1e-5,
        ),
    ),
    "marian": (
        transformers.MarianMTModel,
        lambda: transformers.MarianConfig(
            vocab_size=71,
            decoder_vocab_size=71,
            activation_function="swish",
            scale_embedding=True,
            pad_token_id=70,
            decoder_start_token_id=70,
            eos_token_id=0,
            **SEQ,
            **HEADS,
            **DROPOUTS,
        ),
    ),
    "bart": (
        transformers.BartForConditionalGeneration,
        lambda: transformers.BartConfig(vocab_size=71, activation_function="gelu", **SEQ, **HEADS, **DROPOUTS),
    ),
    "t5": (
        transformers.T5ForConditionalGeneration,
        lambda: transformers.T5Config(
            vocab_size=71,
            d_model=24,
            d_kv=8,
            d_ff=40,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=3,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=12,
            feed_forward_proj="relu",
            dropout_rate=0.0,
            decoder_start_token_id=0,
        ),
    ),
    "gemma": (
        transformers.GemmaForCausalLM,
        lambda: transformers.GemmaConfig(**GEMMA_SIZES, num_hidden_layers=2, rope_theta=500.0),
    ),
    "gemma2": (  # softcaps small enough to change the logits; a window shorter than the padded inputs
        transformers.Gemma2ForCausalLM,
        lambda: transformers.Gemma2Config(
            **GEMMA_SIZES,
            num_hidden_layers=3,
            query_pre_attn_scalar=10,
            sliding_window=3,
            attn_logit_softcapping=1.0,
            final_logit_softcapping=2.0,
            rope_theta=500.0,
        ),
    ),
    "gemma3_text": (  # sliding, global, sliding; the global layer's positions linearly interpolated
        transformers.Gemma3ForCausalLM,
        lambda: transformers.Gemma3TextConfig(
            **GEMMA_SIZES,
            num_hidden_layers=3,
            query_pre_attn_scalar=10,
            sliding_window=3,
            sliding_window_pattern=2,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 50.0},
            },
        ),
    ),
    "mamba": (  # time_step_rank "auto": 2
        transformers.MambaForCausalLM,
        lambda: transformers.MambaConfig(vocab_size=89, hidden_size=32, state_size=8, num_hidden_layers=2),
    ),
}
SEQ2SEQ = ("marian", "bart", "t5")
ENCODERS = ("bert", "roberta")  # last_hidden_state, and a segment input


def _saved(model_type: str, where: Path) -> torch.nn.Module:
    """The Hugging Face model of the type, weights redrawn, written with `save_pretrained` to `where`."""
    model_class, config = MODELS[model_type]
    torch.manual_seed(0)
    reference = model_class(config()).eval()
    redraw(reference, seed=1)
    reference.save_pretrained(where)
    return reference


def _padded(batch: int, seq: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, vocab - 1, (batch, seq), generator=generator)
    pad = torch.zeros(batch, seq, dtype=torch.bool)
    for b in range(1, batch):
        pad[b, seq - b :] = True
    return tokens, pad


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path]]:
    """Every model type saved by transformers and imported: (the reference, the import's directory)."""
    found = {}
    for model_type in MODELS:
        root = tmp_path_factory.mktemp(model_type)
        reference = _saved(model_type, root / "hf")
        pretrained.import_pretrained(root / "hf", root / "out")
        found[model_type] = (reference, root / "out")
    return found


def padded_inputs(model_type: str, vocab: int) -> dict[str, torch.Tensor]:
    """The padded batch every family is held to: sources and targets, or tokens, with their masks (True = pad)."""
    if model_type in SEQ2SEQ:
        (src, src_pad), (tgt, tgt_pad) = _padded(3, 8, vocab, seed=1), _padded(3, 7, vocab, seed=2)
        return {"src": src, "src_pad": src_pad, "tgt": tgt, "tgt_pad": tgt_pad}
    tokens, pad = _padded(3, 9, vocab, seed=1)
    return {"tokens": tokens, "pad": pad}


def reference_outputs(model: torch.nn.Module, model_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A transformers model's logits (an encoder's last hidden state) on `padded_inputs`, and where they are real."""
    given = padded_inputs(model_type, model.config.vocab_size)
    with torch.no_grad():
        if model_type in SEQ2SEQ:
            output = model(
                input_ids=given["src"], attention_mask=(~given["src_pad"]).long(), decoder_input_ids=given["tgt"],
                decoder_attention_mask=(~given["tgt_pad"]).long(),
            )  # fmt: skip
            return output.logits, ~given["tgt_pad"]
        output = model(input_ids=given["tokens"], attention_mask=(~given["pad"]).long())
    return (output.last_hidden_state if model_type in ENCODERS else output.logits), ~given["pad"]


@pytest.mark.parametrize("model_type", list(MODELS))
def test_the_import_computes_what_the_original_does(imported, model_type):
    reference, out = imported[model_type]
    ours = persist.load(out / "model").eval()
    expected, keep = reference_outputs(reference, model_type)
    given = padded_inputs(model_type, reference.config.vocab_size)
    with torch.no_grad():
        if model_type in ENCODERS:
            got = ours(**given, segment=torch.zeros_like(given["tokens"]))["last_hidden_state"]
        else:
            got = ours(**given)
    if isinstance(got, dict):  # the logits beside a loss term (a mixture of experts' balancing loss)
        got = got["logits"]
    assert (got - expected).abs()[keep].max().item() <= 1e-5


@pytest.mark.parametrize("model_type", list(MODELS))
def test_the_written_spec_is_the_family_spec_with_the_configs_variables(imported, model_type):
    reference, out = imported[model_type]
    text = (out / "spec.yaml").read_text(encoding="utf-8")
    assert text.startswith("# Imported by `blockgraph import`") and "extends:" not in text
    rebuilt = builder.build(out / "spec.yaml")
    saved = persist.load(out / "model")
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in saved.state_dict().items()}
    variables = builder.load_spec(out / "spec.yaml").spec.vars
    config = reference.config
    size = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or config.d_model
    assert variables["d_model"] == size and variables["vocab"] == config.vocab_size


def _generated(reference: torch.nn.Module, model_type: str, inputs: dict[str, torch.Tensor], new: int) -> list:
    """`generate`'s greedy tokens per row, up to and including eos."""
    config = reference.config
    options: dict[str, Any] = {"max_new_tokens": new, "do_sample": False, "num_beams": 1}
    if model_type in SEQ2SEQ:  # what our decoder never generates, and no forced tokens
        options.update(suppress_tokens=[config.pad_token_id], forced_bos_token_id=None, forced_eos_token_id=None)
    elif config.pad_token_id not in (None, config.eos_token_id):  # a language model's padding id (Gemma's 0) too
        options.update(suppress_tokens=[config.pad_token_id])
    with torch.no_grad():
        sequences = reference.generate(**inputs, **options).tolist()
    skip = 1 if model_type in SEQ2SEQ else inputs["input_ids"].size(1)  # the decoder start, or the prompt
    rows = []
    for row in sequences:
        tokens = row[skip:]
        eos = config.eos_token_id
        rows.append(tuple(tokens[: tokens.index(eos) + 1] if eos in tokens else tokens))
    return rows


@pytest.mark.parametrize("model_type", [t for t in MODELS if t not in ENCODERS])
def test_greedy_decoding_equals_generate(imported, model_type):
    reference, out = imported[model_type]
    loaded = pretrained.load_model(out)
    decoder = decode.Decoder(loaded.model, loaded.roles, specials=loaded.specials)
    vocab = reference.config.vocab_size
    if model_type in SEQ2SEQ:
        src, src_pad = _padded(3, 7, vocab, seed=3)
        ours = decode.greedy(decoder, src, src_pad, max_len=6)
        inputs = {"input_ids": src, "attention_mask": (~src_pad).long()}
    else:
        prompt = torch.randint(3, vocab - 1, (3, 4), generator=torch.Generator().manual_seed(3))
        ours = decode.greedy(decoder, prompt=prompt, max_len=6)
        inputs = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}
    assert [h.tokens for h in ours] == _generated(reference, model_type, inputs, 6)


# --- tokenizers ------------------------------------------------------------------------------------------------


def test_marian_with_sentencepiece_translates_as_generate_does(tmp_path, run_cli):
    """A SentencePiece model trained here on the shipped zh sentences, a Marian directory around a random model."""
    reference, tokenizer, hf = hf_dirs.marian(tmp_path)
    result = run_cli("import", hf, "--out", tmp_path / "out")
    assert result.code == 0, result.stderr
    assert "imported marian" in result.stderr and "tokenizer: marian" in result.stderr
    sentence = "我们今天去公园。"
    result = run_cli("translate", tmp_path / "out", sentence, "--max-len", "8")
    assert result.code == 0, result.stderr

    ids = tokenizer(sentence, return_tensors="pt").input_ids
    assert pretrained.load(tmp_path / "out").source.encode(sentence) == ids[0].tolist()
    with torch.no_grad():
        generated = reference.generate(
            input_ids=ids, max_new_tokens=8, do_sample=False, num_beams=1,
            suppress_tokens=[reference.config.pad_token_id],
            forced_eos_token_id=None,
        )  # fmt: skip
    assert result.stdout.strip() == tokenizer.decode(generated[0], skip_special_tokens=True).strip()


def test_a_language_model_with_a_tokenizer_json_generates_as_generate_does(tmp_path, run_cli):
    reference, tokenizer, hf = hf_dirs.gpt2(tmp_path)
    assert run_cli("import", hf, "--out", tmp_path / "out").code == 0
    prompt = "I want to"
    result = run_cli("generate", tmp_path / "out", prompt, "--max-new", "5")
    assert result.code == 0, result.stderr
    ids = torch.tensor([tokenizer.encode(prompt).ids])
    with torch.no_grad():
        generated = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5)
    assert result.stdout.strip() == tokenizer.decode(generated[0].tolist(), skip_special_tokens=True)
    assert result.stdout.startswith(prompt)


def test_the_tokenizer_is_the_family_s_and_another_kind_alone_is_refused_at_its_file(tmp_path, run_cli):
    """gpt2 reads text through tokenizer.json: Marian's SentencePiece files beside it are not its tokenizer."""
    hf = _gpt2_dir(tmp_path)
    for name in ("source.spm", "target.spm", "vocab.json"):
        (hf / name).write_bytes(b"{}")
    result = run_cli("import", hf, "--out", tmp_path / "out")
    assert result.code == 1 and "Traceback" not in result.stderr, result.stderr
    assert "holds source.spm, target.spm, vocab.json but not tokenizer.json, the gpt2 family's" in result.stderr
    assert f"{hf / 'source.spm'}" in result.stderr and not (tmp_path / "out").exists()
    (hf / "source.spm").unlink()  # no kind's files whole: imported without a tokenizer, as before
    result = run_cli("import", hf, "--out", tmp_path / "out")
    assert result.code == 0 and "tokenizer: none" in result.stderr, result.stderr


# --- what is refused -------------------------------------------------------------------------------------------


def _gpt2_dir(tmp_path: Path, **settings: Any) -> Path:
    sizes = {"vocab_size": 11, "n_positions": 8, "n_embd": 8, "n_layer": 1, "n_head": 2, "eos_token_id": 10}
    config = transformers.GPT2Config(**{**sizes, "bos_token_id": 10, **settings})
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_an_unknown_model_type_is_refused(tmp_path, run_cli):
    hf = _gpt2_dir(tmp_path)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "model_type": "xlnet"}))
    result = run_cli("import", hf, "--out", tmp_path / "out")
    assert result.code == 1 and "model_type 'xlnet' cannot be imported" in result.stderr
    assert "supported: gpt2, bert, llama" in result.stderr and not (tmp_path / "out").exists()


def test_every_option_the_spec_does_not_implement_is_reported_at_once(tmp_path):
    hf = _gpt2_dir(tmp_path, activation_function="relu", scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(CheckpointError) as caught:
        pretrained.import_pretrained(hf, tmp_path / "out")
    messages = [p.message for p in caught.value.problems]
    assert any("activation_function is 'relu'; the gpt2 spec implements gelu_new" in m for m in messages)
    assert any("scale_attn_by_inverse_layer_idx is 'true'; the gpt2 spec implements false" in m for m in messages)


def test_a_tied_or_windowed_qwen_and_a_long_context_phi3_are_refused_by_message(tmp_path):
    """What a spec cannot follow by its variables: the tie of Qwen's small sizes, Qwen's sliding window; and the
    rotary scaling of the 128k Phi-3 (older files name it `su`)."""
    _saved("qwen2", tmp_path / "qwen2")
    config_file = tmp_path / "qwen2" / "config.json"
    tied = {**json.loads(config_file.read_text()), "tie_word_embeddings": True, "use_sliding_window": True}
    config_file.write_text(json.dumps(tied))
    with pytest.raises(CheckpointError) as caught:
        pretrained.import_pretrained(tmp_path / "qwen2", tmp_path / "out")
    messages = [p.message for p in caught.value.problems]
    assert any("tie_word_embeddings is 'true'; the qwen2 spec implements false" in m for m in messages)
    assert any("use_sliding_window is 'true'; the qwen2 spec implements false" in m for m in messages)
    _saved("phi3", tmp_path / "phi3")
    config_file = tmp_path / "phi3" / "config.json"
    scaled = {**json.loads(config_file.read_text()), "rope_scaling": {"type": "su", "short_factor": [1.0] * 2}}
    config_file.write_text(json.dumps(scaled))
    with pytest.raises(CheckpointError, match="rope_type is 'su'; the phi3 spec implements default"):
        pretrained.import_pretrained(tmp_path / "phi3", tmp_path / "out")


def test_a_missing_or_extra_tensor_is_refused_by_name(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = _gpt2_dir(tmp_path)
    tensors = load_file(str(hf / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if k != "transformer.ln_f.bias"}, str(hf / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor\(s\) of the spec: ln_f\.norm\.bias"):
        pretrained.import_pretrained(hf, tmp_path / "out")
    save_file({**tensors, "transformer.h.0.extra": torch.zeros(2)}, str(hf / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"map to nothing: transformer\.h\.0\.extra"):
        pretrained.import_pretrained(hf, tmp_path / "out")


class _Planted:
    """Unpickling this creates the marker file: proof that a pickle was opened."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_checkpoint_is_refused_unopened(tmp_path, run_cli):
    import pickle

    hf = _gpt2_dir(tmp_path)
    (hf / "model.safetensors").unlink()
    marker = tmp_path / "ran"
    (hf / "pytorch_model.bin").write_bytes(pickle.dumps(_Planted(marker)))
    result = run_cli("import", hf, "--out", tmp_path / "out")
    assert result.code == 1 and "pytorch_model.bin is a pickle file" in result.stderr
    assert "safe_serialization" in result.stderr and not marker.exists()


def test_an_encoder_imports_but_does_not_generate(imported, run_cli):
    _, out = imported["bert"]
    result = run_cli("generate", out, "hello")
    assert result.code == 1 and "a bert model encodes text; it does not generate" in result.stderr
    (out.parent / "lines.txt").write_text("hello\n")
    result = run_cli("train", out, "--data", out.parent / "lines.txt", "--out", out.parent / "run")
    assert result.code == 1 and "a bert model encodes text" in result.stderr and "Traceback" not in result.stderr


def test_import_replaces_its_own_output_and_nothing_else(tmp_path, run_cli):
    hf = _gpt2_dir(tmp_path)
    out = tmp_path / "out"
    assert run_cli("import", hf, "--out", out).code == 0
    assert run_cli("import", hf, "--out", out).code == 0  # its own: replaced
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    result = run_cli("import", hf, "--out", mine)
    assert result.code == 1 and (mine / "notes.txt").read_text() == "keep me"


def _edited_config(hf: Path, **changes: Any) -> None:
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model_type": ["gpt2"]}, "model_type '['gpt2']' cannot be imported"),
        ({"n_layer": True}, "layers is 'true', not a size"),
        ({"layer_norm_epsilon": "tiny"}, "eps is 'tiny', not a finite number"),
        ({"eos_token_id": 99}, "eos_token_id is 99, beyond the vocabulary of 11"),
        ({"n_embd": 64}, "config.json describes a model of"),
    ],
)
def test_a_malformed_config_is_a_located_error(tmp_path, run_cli, changes, message):
    hf = _gpt2_dir(tmp_path)
    _edited_config(hf, **changes)
    result = run_cli("import", hf, "--out", tmp_path / "out")
    assert result.code == 1 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_the_gemma2_held_to_its_import_softcaps_and_slides_where_it_counts(tmp_path):
    """Each cap of MODELS' Gemma 2, and its window, changes its logits on the padded inputs: the import's 1e-5 is
    held on a model where all three matter."""
    reference = _saved("gemma2", tmp_path / "hf")
    expected, keep = reference_outputs(reference, "gemma2")
    for change in ({"attn_logit_softcapping": None}, {"final_logit_softcapping": None}, {"sliding_window": 64}):
        config = transformers.Gemma2Config.from_pretrained(tmp_path / "hf", **change)
        other = transformers.Gemma2ForCausalLM.from_pretrained(tmp_path / "hf", config=config).eval()
        assert (reference_outputs(other, "gemma2")[0] - expected).abs()[keep].max() > 1e-2, change


def test_gemma_layers_off_their_specs_pattern_and_other_rotary_scalings_are_refused(tmp_path):
    """Gemma 2 slides on its even layers, Gemma 3 on all but every pattern-th (here 2nd); Gemma 3's global layers
    take linear rotary scaling only, its sliding-window layers none."""
    _saved("gemma2", tmp_path / "g2")
    _edited_config(tmp_path / "g2", layer_types=["full_attention", "sliding_attention", "full_attention"])
    with pytest.raises(CheckpointError, match=r"layer_types is .*; the gemma2 spec implements sliding, full, sliding"):
        pretrained.import_pretrained(tmp_path / "g2", tmp_path / "out")
    _saved("gemma3_text", tmp_path / "g3")
    rope = json.loads((tmp_path / "g3" / "config.json").read_text())["rope_parameters"]
    rope["full_attention"]["rope_type"] = "yarn"
    rope["sliding_attention"].update(rope_type="linear", factor=2.0)
    _edited_config(
        tmp_path / "g3", layer_types=["sliding_attention", "full_attention", "full_attention"], rope_parameters=rope
    )
    with pytest.raises(CheckpointError) as caught:
        pretrained.import_pretrained(tmp_path / "g3", tmp_path / "out")
    messages = " ".join(p.message for p in caught.value.problems)
    assert "layer_types is" in messages and "every pattern-th layer full, the others sliding" in messages
    assert "rope_type is 'yarn'; the gemma3_text spec implements default or linear" in messages
    assert "local_rope_type is 'linear'; the gemma3_text spec implements default" in messages
    assert not (tmp_path / "out").exists()


def test_marian_without_its_options_gets_transformers_defaults_and_is_refused(tmp_path):
    _saved("marian", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    for option in ("activation_function", "scale_embedding"):
        del config[option]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as caught:
        pretrained.import_pretrained(tmp_path / "hf", tmp_path / "out")
    messages = " ".join(p.message for p in caught.value.problems)
    assert "activation_function is 'gelu'" in messages and "scale_embedding is 'false'" in messages


def test_sharded_weights_import_and_their_index_is_checked(tmp_path):
    model_class, config = MODELS["llama"]
    torch.manual_seed(0)
    reference = model_class(config()).eval()
    redraw(reference, seed=1)
    hf = tmp_path / "hf"
    reference.save_pretrained(hf, max_shard_size="20KB")
    assert (hf / "model.safetensors.index.json").exists() and not (hf / "model.safetensors").exists()
    pretrained.import_pretrained(hf, tmp_path / "out")
    tokens = torch.randint(3, 80, (2, 6))
    with torch.no_grad():
        got = persist.load(tmp_path / "out" / "model").eval()(tokens=tokens)
        assert (got - reference(input_ids=tokens).logits).abs().max().item() <= 1e-5
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    for file, message in (("../x.safetensors", "not a .safetensors file beside it"), (None, "is not in its shard")):
        changed = dict(index["weight_map"])
        changed[first] = file or next(f for f in changed.values() if f != index["weight_map"][first])
        (hf / "model.safetensors.index.json").write_text(json.dumps({**index, "weight_map": changed}))
        with pytest.raises(CheckpointError, match=message):
            pretrained.import_pretrained(hf, tmp_path / "again")


def test_older_checkpoints_saved_buffers_are_dropped(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = _gpt2_dir(tmp_path)
    tensors = load_file(str(hf / "model.safetensors"))
    old = {k.removeprefix("transformer."): v for k, v in tensors.items() if k != "lm_head.weight"}
    old["h.0.attn.bias"] = torch.ones(1, 1, 8, 8).tril()
    old["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(old, str(hf / "model.safetensors"))
    pretrained.import_pretrained(hf, tmp_path / "out")  # GPT-2 as older transformers wrote it


def test_an_edited_spec_is_never_replaced(tmp_path, run_cli):
    hf = _gpt2_dir(tmp_path)
    out = tmp_path / "out"
    assert run_cli("import", hf, "--out", out).code == 0
    spec = out / "spec.yaml"
    spec.write_text(spec.read_text().replace("layers: 1", "layers: 2"))
    result = run_cli("import", hf, "--out", out)
    assert result.code == 1 and "layers: 2" in spec.read_text()


def test_a_tokenizer_json_cannot_truncate_or_pad_what_it_encodes(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    hf = _gpt2_dir(tmp_path)
    vocab = {w: i for i, w in enumerate(["<unk>", "a", "b", "c", "d", "e", "f", "g", "h", "i", "<|endoftext|>"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.enable_truncation(max_length=2)
    tokenizer.enable_padding(length=9, pad_id=0)
    tokenizer.save(str(hf / "tokenizer.json"))
    pretrained.import_pretrained(hf, tmp_path / "out")
    translator = pretrained.load(tmp_path / "out")
    assert translator.target.encode("a b c d") == [1, 2, 3, 4]


def test_an_imported_model_refuses_another_tokenizer(imported, run_cli):
    _, out = imported["gpt2"]
    result = run_cli("generate", out, "hello", "--tokenizer", "words")
    assert result.code == 1 and "its own tokenizer" in result.stderr
