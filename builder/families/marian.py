"""Marian (`MarianMTModel`): specs/marian_zh_en.yaml with BART's layer tables; sinusoidal positions the spec
computes; SentencePiece tokenizers (source.spm, target.spm, vocab.json)."""

from __future__ import annotations

from blockgraph.builder.families import bart
from blockgraph.builder.hf_mappings import Family, same_as, table

FAMILY = Family(
    "marian",
    "marian_zh_en.yaml",
    table(
        *bart.SHARED_EMBEDDINGS,
        ("model.encoder.embed_positions.weight", "src_position.pe", "computed"),
        ("model.decoder.embed_positions.weight", "tgt_position.pe", "computed"),
        *bart.layers("encoder"),
        *bart.layers("decoder"),
    ),
    variables=bart.variables(58101, 16, 4096),
    fixed={
        "activation_function": ("swish", "silu"),
        "scale_embedding": (True,),
        "share_encoder_decoder_embeddings": (True,),
        "decoder_vocab_size": (None, same_as("vocab_size", None)),
        **bart.symmetric(16, 4096),
    },
    specials={"pad": 58100, "eos": 0, "bos": None, "decoder_start": 58100},
    defaults={  # transformers' MarianConfig writes these where config.json says nothing
        "activation_function": "gelu",
        "scale_embedding": False,
        **bart.DEFAULTS,
    },
    architectures=("MarianMTModel",),
    task="seq2seq-lm",
    tokenizer="marian",
    sizes="the opus-mt models (~77M)",
)
