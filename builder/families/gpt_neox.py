"""GPT-NeoX and Pythia (`GPTNeoXForCausalLM`): specs/gpt_neox.yaml, q/k/v fused per head, partial rotary."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from blockgraph.builder.families.llama import rope, rope_type
from blockgraph.builder.hf_mappings import Family, linear, norm, qkv, table


def _today(name: str) -> str | None:
    """Older checkpoints saved the causal masks and rotary frequencies, which the spec computes."""
    return None if re.search(r"\.attention\.(masked_)?bias$|rotary_emb\.inv_freq$", name) else name


def _written(variables: Mapping[str, Any]) -> dict[str, Any]:
    parameters = {"rope_type": "default", "rope_theta": variables["rope_theta"]}
    return {"rope_parameters": {**parameters, "partial_rotary_factor": variables["rotary_pct"]}}


FAMILY = Family(
    "gpt_neox",
    "gpt_neox.yaml",
    table(
        ("gpt_neox.embed_in.weight", "embed_in.lut.weight"),
        *norm("gpt_neox.layers.{i}.input_layernorm", "layers.{i}.input_layernorm.norm"),
        *norm("gpt_neox.layers.{i}.post_attention_layernorm", "layers.{i}.post_attention_layernorm.norm"),
        *qkv("gpt_neox.layers.{i}.attention.query_key_value", "layers.{i}.attention", "qkv_heads"),
        *linear("gpt_neox.layers.{i}.attention.dense", "layers.{i}.attention.w_o"),
        *linear("gpt_neox.layers.{i}.mlp.dense_h_to_4h", "layers.{i}.mlp.w_1"),
        *linear("gpt_neox.layers.{i}.mlp.dense_4h_to_h", "layers.{i}.mlp.w_2"),
        *norm("gpt_neox.final_layer_norm", "final_layer_norm.norm"),
        ("embed_out.weight", "embed_out.proj.weight"),  # as transformers writes it
        ("lm_head.weight", "embed_out.proj.weight"),  # the same, as its model names it
    ),
    variables={
        "vocab": ("vocab_size", 50432),
        "d_model": ("hidden_size", 6144),
        "heads": ("num_attention_heads", 64),
        "d_ff": ("intermediate_size", 24576),
        "layers": ("num_hidden_layers", 44),
        "rotary_pct": rope("partial_rotary_factor", 0.25, "rotary_pct"),
        "rope_theta": rope("rope_theta", 10000.0, "rotary_emb_base"),
        "eps": ("layer_norm_eps", 1e-5),
        "dropout": ("hidden_dropout", 0.0),
    },
    fixed={
        "hidden_act": ("gelu",),
        "use_parallel_residual": (True,),
        "attention_bias": (True,),
        "tie_word_embeddings": (False,),
        "rope_type": ("default",),
    },
    specials={"bos": 0, "eos": 2, "pad": None},
    nested=("rope_scaling", "rope_parameters"),
    options={"rope_type": rope_type},
    written=_written,
    legacy=_today,
    architectures=("GPTNeoXForCausalLM",),
    sizes="GPT-NeoX-20B; Pythia 70M to 12B",
)
