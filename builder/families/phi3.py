"""Phi-3 (`Phi3ForCausalLM`): specs/phi3.yaml, LLaMA's layout whose checkpoints fuse q/k/v (`qkv_proj`) and the
SwiGLU's gate and up projections (`gate_up_proj`), split by the table; a sliding window, partial rotary."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from blockgraph.builder.families.llama import rope, rope_type, variables, without_frequencies
from blockgraph.builder.families.qwen2 import HEAD_DIM
from blockgraph.builder.hf_mappings import Family, table

LAYER, OURS = "model.layers.{i}", "layers.{i}"


def _written(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Key/value heads and the rotary parameters, as transformers ≥ 5 writes them."""
    parameters = {"rope_type": "default", "rope_theta": variables["rope_theta"]}
    return {
        "num_key_value_heads": variables["kv_heads"],
        "rope_parameters": {**parameters, "partial_rotary_factor": variables["rotary_pct"]},
    }


FAMILY = Family(
    "phi3",
    "phi3.yaml",
    table(
        ("model.embed_tokens.weight", "embed_tokens.lut.weight"),
        (f"{LAYER}.self_attn.qkv_proj.weight", tuple(f"{OURS}.self_attn.w_{p}.weight" for p in "qkv"), "split"),
        (f"{LAYER}.self_attn.o_proj.weight", f"{OURS}.self_attn.w_o.weight"),
        (f"{LAYER}.input_layernorm.weight", f"{OURS}.input_layernorm.weight"),
        (f"{LAYER}.post_attention_layernorm.weight", f"{OURS}.post_attention_layernorm.weight"),
        (f"{LAYER}.mlp.gate_up_proj.weight", (f"{OURS}.mlp.w_1.weight", f"{OURS}.mlp.w_3.weight"), "split"),
        (f"{LAYER}.mlp.down_proj.weight", f"{OURS}.mlp.w_2.weight"),
        ("model.norm.weight", "norm.weight"),
        ("lm_head.weight", "lm_head.proj.weight"),
    ),
    variables={  # transformers' values for a config.json that lacks them (Phi3Config's)
        **variables(vocab=32064, d_model=3072, d_ff=8192, eps=1e-5),
        "rotary_pct": rope("partial_rotary_factor", 1.0, "partial_rotary_factor"),
        "window": ("sliding_window", None),
    },
    # the long-context variants' rotary scaling (rope_scaling `longrope`, older `su`: Phi-3-mini-128k) is refused
    fixed={
        "hidden_act": ("silu",),
        "tie_word_embeddings": (False,),
        "rope_type": ("default",),
        "head_dim": HEAD_DIM,
    },
    specials={"bos": 1, "eos": 32000, "pad": 32000},
    nested=("rope_scaling", "rope_parameters"),
    options={"rope_type": rope_type},
    written=_written,
    legacy=without_frequencies,
    architectures=("Phi3ForCausalLM",),
    sizes="Phi-3-mini-4k (3.8B), Phi-3-medium-4k (14B); the 128k `longrope` ones are refused",
)
