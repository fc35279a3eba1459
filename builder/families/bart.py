"""BART (`BartForConditionalGeneration`): specs/bart.yaml; its layer tables serve Marian too (families/marian.py)."""

from __future__ import annotations

from blockgraph.builder.hf_mappings import Family, Row, linear, norm, same_as, table


def _attention(hf: str, ours: str) -> tuple[Row, ...]:
    """A BART-style attention's q/k/v/out projections."""
    names = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}
    return tuple(row for p, proj in names.items() for row in linear(f"{hf}.{proj}", f"{ours}.w_{p}"))


def layers(stack: str) -> tuple[Row, ...]:
    """The encoder (`{e}`) or decoder (`{d}`) layers of BART and Marian onto encoder_layer / decoder_layer."""
    i = "{e}" if stack == "encoder" else "{d}"
    hf, ours = f"model.{stack}.layers.{i}", f"{stack}.{i}"
    rows = [*_attention(f"{hf}.self_attn", f"{ours}.self_attn"), *norm(f"{hf}.self_attn_layer_norm", f"{ours}.norm1")]
    if stack == "decoder":
        rows += [*_attention(f"{hf}.encoder_attn", f"{ours}.cross_attn")]
        rows += [*norm(f"{hf}.encoder_attn_layer_norm", f"{ours}.norm2")]
    rows += [*linear(f"{hf}.fc1", f"{ours}.ffn.w_1"), *linear(f"{hf}.fc2", f"{ours}.ffn.w_2")]
    rows += [*norm(f"{hf}.final_layer_norm", f"{ours}.norm2" if stack == "encoder" else f"{ours}.norm3")]
    return tuple(rows)


SHARED_EMBEDDINGS = (
    ("model.shared.weight", "src_embed.lut.weight"),
    ("model.encoder.embed_tokens.weight", (), "tied:model.shared.weight"),
    ("model.decoder.embed_tokens.weight", (), "tied:model.shared.weight"),
    ("lm_head.weight", (), "tied:model.shared.weight"),
    ("final_logits_bias", "lm_head.bias", "row"),
)  # one embedding for both sides and the output layer, with its fixed output bias


def variables(vocab: int, heads: int, d_ff: int) -> dict[str, tuple[str, object]]:
    return {
        "vocab": ("vocab_size", vocab),
        "max_len": ("max_position_embeddings", 1024),
        "d_model": ("d_model", 1024),
        "heads": ("encoder_attention_heads", heads),
        "d_ff": ("encoder_ffn_dim", d_ff),
        "enc_layers": ("encoder_layers", 12),
        "dec_layers": ("decoder_layers", 12),
        "dropout": ("dropout", 0.1),
    }


def symmetric(heads: int, d_ff: int) -> dict[str, tuple[object, ...]]:
    """The decoder's heads and widths must be the encoder's."""
    return {
        "decoder_attention_heads": (same_as("encoder_attention_heads", heads),),
        "decoder_ffn_dim": (same_as("encoder_ffn_dim", d_ff),),
        "tie_word_embeddings": (True,),
    }


DEFAULTS = {
    "encoder_attention_heads": 16,
    "decoder_attention_heads": 16,
    "encoder_ffn_dim": 4096,
    "decoder_ffn_dim": 4096,
}

FAMILY = Family(
    "bart",
    "bart.yaml",
    table(
        *SHARED_EMBEDDINGS,
        ("model.encoder.embed_positions.weight", "src_position.pe.weight"),
        ("model.decoder.embed_positions.weight", "tgt_position.pe.weight"),
        *norm("model.encoder.layernorm_embedding", "src_norm.norm"),
        *norm("model.decoder.layernorm_embedding", "tgt_norm.norm"),
        *layers("encoder"),
        *layers("decoder"),
    ),
    variables=variables(50265, 16, 4096),
    fixed={"activation_function": ("gelu",), "scale_embedding": (False,), **symmetric(16, 4096)},
    specials={"bos": 0, "pad": 1, "eos": 2, "decoder_start": 2},
    defaults=DEFAULTS,
    architectures=("BartForConditionalGeneration",),
    task="seq2seq-lm",
    sizes="base (140M), large (400M)",
)
