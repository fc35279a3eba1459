"""RoBERTa (`RobertaModel`): specs/roberta.yaml, BERT's encoder and pooler with positions counted over the real
tokens from padding_idx + 1, as fairseq numbers them (XLM-R and CamemBERT are RoBERTa models); it does not generate."""

from __future__ import annotations

from dataclasses import replace

from blockgraph.builder.families import bert


def _today(name: str) -> str | None:
    """Checkpoints of the task models sit in a `roberta.` prefix; otherwise BERT's older names (LayerNorm's gamma
    and beta, the saved position ids, which the spec computes from the padding)."""
    return bert.FAMILY.legacy(name.removeprefix("roberta."))


# BERT's weights under BERT's names: only the config (positions, padding id, defaults) and the spec differ
FAMILY = replace(
    bert.FAMILY,
    model_type="roberta",
    spec="roberta.yaml",
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
