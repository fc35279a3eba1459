"""T5 (`T5ForConditionalGeneration`): specs/t5.yaml, ReLU feed-forwards, one shared relative position bias."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from blockgraph.builder.hf_mappings import Family, Row, table


def _stack(stack: str) -> tuple[Row, ...]:
    """T5's encoder (`{e}`) or decoder (`{d}`) blocks onto the spec's encoder_block / decoder_block."""
    i = "{e}" if stack == "encoder" else "{d}"
    hf, ours = f"{stack}.block.{i}.layer", f"{stack}.{i}"
    attention = ((f"{hf}.0.SelfAttention.{p}.weight", f"{ours}.self_attention.w_{p}.weight") for p in "qkvo")
    rows = [
        (f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
         f"{stack}_bias.relative_attention_bias.weight"),
        *attention,
        (f"{hf}.0.layer_norm.weight", f"{ours}.attention_norm.weight"),
        (f"{stack}.final_layer_norm.weight", f"{stack}_norm.weight"),
    ]  # fmt: skip
    ffn = 1
    if stack == "decoder":
        rows += [(f"{hf}.1.EncDecAttention.{p}.weight", f"{ours}.cross_attention.w_{p}.weight") for p in "qkvo"]
        rows += [(f"{hf}.1.layer_norm.weight", f"{ours}.cross_norm.weight")]
        ffn = 2
    return (
        *rows,
        (f"{hf}.{ffn}.DenseReluDense.wi.weight", f"{ours}.ffn.w_1.weight"),
        (f"{hf}.{ffn}.DenseReluDense.wo.weight", f"{ours}.ffn.w_2.weight"),
        (f"{hf}.{ffn}.layer_norm.weight", f"{ours}.ffn_norm.weight"),
    )


def _written(variables: Mapping[str, Any]) -> dict[str, Any]:
    return {"num_decoder_layers": variables["dec_layers"]}


FAMILY = Family(
    "t5",
    "t5.yaml",
    table(
        ("shared.weight", "shared.lut.weight"),
        ("encoder.embed_tokens.weight", (), "tied:shared.weight"),
        ("decoder.embed_tokens.weight", (), "tied:shared.weight"),
        ("lm_head.weight", (), "tied:shared.weight"),
        *_stack("encoder"),
        *_stack("decoder"),
    ),
    variables={
        "vocab": ("vocab_size", 32128),
        "d_model": ("d_model", 512),
        "d_kv": ("d_kv", 64),
        "heads": ("num_heads", 8),
        "d_ff": ("d_ff", 2048),
        "enc_layers": ("num_layers", 6),
        "dec_layers": lambda c: c.get("num_decoder_layers") or c.get("num_layers", 6),
        "buckets": ("relative_attention_num_buckets", 32),
        "max_distance": ("relative_attention_max_distance", 128),
        "dropout": ("dropout_rate", 0.1),
        "eps": ("layer_norm_epsilon", 1e-6),
    },
    fixed={"feed_forward_proj": ("relu",), "tie_word_embeddings": (True,), "is_encoder_decoder": (True,)},
    specials={"pad": 0, "eos": 1, "bos": None, "decoder_start": 0},
    written=_written,
    architectures=("T5ForConditionalGeneration",),
    task="seq2seq-lm",
    sizes="small (60M), base (220M), large (770M)",
)
