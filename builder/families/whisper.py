"""Whisper (`WhisperForConditionalGeneration`): specs/whisper.yaml, log-mel features through a convolutional front
end into a pre-norm encoder–decoder; the encoder's sinusoid table is stored in the checkpoint and copied as it is
(a frozen learned_position), the output layer tied to the decoder's token embedding; tokenizer.json."""

from __future__ import annotations

from blockgraph.builder.hf_mappings import Family, Row, linear, norm, same_as, table


def _attention(hf: str, ours: str) -> tuple[Row, ...]:
    """Whisper's q/k/v/out projections; its keys have no bias."""
    return (
        *linear(f"{hf}.q_proj", f"{ours}.w_q"),
        (f"{hf}.k_proj.weight", f"{ours}.w_k.weight"),
        *linear(f"{hf}.v_proj", f"{ours}.w_v"),
        *linear(f"{hf}.out_proj", f"{ours}.w_o"),
    )


def _layers(stack: str) -> tuple[Row, ...]:
    """The encoder (`{e}`) or decoder (`{d}`) layers onto the spec's whisper_encoder_layer / whisper_decoder_layer."""
    i = "{e}" if stack == "encoder" else "{d}"
    hf, ours = f"model.{stack}.layers.{i}", f"{stack}.{i}"
    rows = [*_attention(f"{hf}.self_attn", f"{ours}.self_attn")]
    rows += [*norm(f"{hf}.self_attn_layer_norm", f"{ours}.self_attn_layer_norm.norm")]
    if stack == "decoder":
        rows += [*_attention(f"{hf}.encoder_attn", f"{ours}.encoder_attn")]
        rows += [*norm(f"{hf}.encoder_attn_layer_norm", f"{ours}.encoder_attn_layer_norm.norm")]
    rows += [*linear(f"{hf}.fc1", f"{ours}.ffn.w_1"), *linear(f"{hf}.fc2", f"{ours}.ffn.w_2")]
    rows += [*norm(f"{hf}.final_layer_norm", f"{ours}.final_layer_norm.norm")]
    return tuple(rows)


FAMILY = Family(
    "whisper",
    "whisper.yaml",
    table(
        *linear("model.encoder.conv1", "conv1"),
        *linear("model.encoder.conv2", "conv2"),
        ("model.encoder.embed_positions.weight", "encoder_positions.pe.weight"),
        *_layers("encoder"),
        *norm("model.encoder.layer_norm", "encoder_norm.norm"),
        ("model.decoder.embed_tokens.weight", "embed_tokens.lut.weight"),
        ("model.decoder.embed_positions.weight", "decoder_positions.pe.weight"),
        *_layers("decoder"),
        *norm("model.decoder.layer_norm", "decoder_norm.norm"),
        ("proj_out.weight", (), "tied:model.decoder.embed_tokens.weight"),
    ),
    variables={
        "vocab": ("vocab_size", 51865),
        "mel": ("num_mel_bins", 80),
        "d_model": ("d_model", 384),
        "heads": ("encoder_attention_heads", 6),
        "d_ff": ("encoder_ffn_dim", 1536),
        "enc_layers": ("encoder_layers", 4),
        "dec_layers": ("decoder_layers", 4),
        "source_positions": ("max_source_positions", 1500),
        "max_len": ("max_target_positions", 448),
        "dropout": ("dropout", 0.0),
    },
    fixed={
        "activation_function": ("gelu",),
        "scale_embedding": (False,),
        "tie_word_embeddings": (True,),
        "decoder_attention_heads": (same_as("encoder_attention_heads", 6),),
        "decoder_ffn_dim": (same_as("encoder_ffn_dim", 1536),),
        "attention_dropout": (0.0,),
        "activation_dropout": (0.0,),
        "apply_spec_augment": (False,),  # SpecAugment's masking of the features while training
    },
    specials={"pad": 50256, "bos": 50256, "eos": 50256, "decoder_start": 50257},
    defaults={  # transformers' WhisperConfig writes these where config.json says nothing
        "activation_function": "gelu",
        "scale_embedding": False,
        "encoder_attention_heads": 6,
        "decoder_attention_heads": 6,
        "encoder_ffn_dim": 1536,
        "decoder_ffn_dim": 1536,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "apply_spec_augment": False,
    },
    architectures=("WhisperForConditionalGeneration",),
    task="speech-seq2seq",
    sizes="tiny (39M), base (74M), small (244M), medium (769M), large (1.55B)",
)
