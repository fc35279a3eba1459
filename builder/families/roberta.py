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
    variables={  # BERT's keys and defaults, but for the vocabulary and the positions (2 more rows than tokens)
        **{name: value for name, value in bert.FAMILY.variables.items() if name != "max_len"},
        "vocab": ("vocab_size", 50265),
        "positions": ("max_position_embeddings", 512),
    },
    # the spec's positions start after the padding id (offset 2) and padding reads its row
    fixed={**bert.FAMILY.fixed, "pad_token_id": (1,)},
    specials={"pad": 1, "bos": 0, "eos": 2},
    legacy=_today,
    architectures=("RobertaModel",),
    sizes="base (125M), large (355M)",
)
