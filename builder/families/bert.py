"""BERT (`BertModel`): specs/bert.yaml, the encoder and its pooler; it encodes text and does not generate."""

from __future__ import annotations

import re

from blockgraph.builder.hf_mappings import Family, linear, norm, table


def _today(name: str) -> str | None:
    """Older checkpoints sit in a `bert.` prefix, name LayerNorm's weight and bias gamma and beta, and save the
    position ids (a range the spec computes)."""
    name = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", name.removeprefix("bert.")))
    return None if name == "embeddings.position_ids" else name


FAMILY = Family(
    "bert",
    "bert.yaml",
    table(
        ("embeddings.word_embeddings.weight", "word_embeddings.lut.weight"),
        ("embeddings.position_embeddings.weight", "position_embeddings.pe.weight"),
        ("embeddings.token_type_embeddings.weight", "token_type_embeddings.lut.weight"),
        *norm("embeddings.LayerNorm", "embeddings_norm.norm"),
        *linear("encoder.layer.{e}.attention.self.query", "encoder.{e}.self_attn.w_q"),
        *linear("encoder.layer.{e}.attention.self.key", "encoder.{e}.self_attn.w_k"),
        *linear("encoder.layer.{e}.attention.self.value", "encoder.{e}.self_attn.w_v"),
        *linear("encoder.layer.{e}.attention.output.dense", "encoder.{e}.self_attn.w_o"),
        *norm("encoder.layer.{e}.attention.output.LayerNorm", "encoder.{e}.norm1"),
        *linear("encoder.layer.{e}.intermediate.dense", "encoder.{e}.ffn.w_1"),
        *linear("encoder.layer.{e}.output.dense", "encoder.{e}.ffn.w_2"),
        *norm("encoder.layer.{e}.output.LayerNorm", "encoder.{e}.norm2"),
        *linear("pooler.dense", "pooler.proj"),
    ),
    variables={
        "vocab": ("vocab_size", 30522),
        "segments": ("type_vocab_size", 2),
        "max_len": ("max_position_embeddings", 512),
        "d_model": ("hidden_size", 768),
        "heads": ("num_attention_heads", 12),
        "d_ff": ("intermediate_size", 3072),
        "layers": ("num_hidden_layers", 12),
        "dropout": ("hidden_dropout_prob", 0.1),
        "eps": ("layer_norm_eps", 1e-12),
    },
    fixed={"hidden_act": ("gelu",), "position_embedding_type": ("absolute",), "is_decoder": (False,)},
    specials={"pad": 0, "bos": None, "eos": None},
    legacy=_today,
    architectures=("BertModel",),
    task="encoder",
    sizes="base (110M), large (340M)",
)
