"""RoBERTa (`RobertaModel`): specs/roberta.yaml, BERT's encoder and pooler with positions counted over the real
tokens from padding_idx + 1, as fairseq numbers them (XLM-R and CamemBERT are RoBERTa models); it does not generate."""

from __future__ import annotations

import re

from blockgraph.builder.hf_mappings import Family, linear, norm, table


def _today(name: str) -> str | None:
    """Checkpoints of the task models sit in a `roberta.` prefix; older ones save the position ids (which the spec
    computes from the padding) and name LayerNorm's weight and bias gamma and beta."""
    name = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", name.removeprefix("roberta.")))
    return None if name == "embeddings.position_ids" else name


FAMILY = Family(
    "roberta",
    "roberta.yaml",
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
        "vocab": ("vocab_size", 50265),
        "segments": ("type_vocab_size", 2),
        "positions": ("max_position_embeddings", 512),
        "d_model": ("hidden_size", 768),
        "heads": ("num_attention_heads", 12),
        "d_ff": ("intermediate_size", 3072),
        "layers": ("num_hidden_layers", 12),
        "dropout": ("hidden_dropout_prob", 0.1),
        "eps": ("layer_norm_eps", 1e-12),
    },
    fixed={
        "hidden_act": ("gelu",),
        "position_embedding_type": ("absolute",),
        "is_decoder": (False,),
        "pad_token_id": (1,),  # the spec's positions start after it (offset 2) and padding reads its row
    },
    specials={"pad": 1, "bos": 0, "eos": 2},
    legacy=_today,
    architectures=("RobertaModel",),
    task="encoder",
    sizes="base (125M), large (355M)",
)
