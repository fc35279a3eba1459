"""Gemma (`GemmaForCausalLM`): specs/gemma.yaml, LLaMA's layout with (1 + w) norms, GeGLU, a scaled and tied
embedding; Gemma 2 and 3 (families/gemma2.py, gemma3.py) build on its table and reading."""

from __future__ import annotations

from typing import Any

from blockgraph.builder.families.llama import rope, rope_type, without_frequencies, written
from blockgraph.builder.hf_mappings import Family, Row, Value, table

LAYER, OURS = "model.layers.{i}", "layers.{i}"


def rows() -> tuple[Row, ...]:
    """The tensors every Gemma has: embedding (the output layer tied to it), projections, GeGLU, norms."""
    return (
        ("model.embed_tokens.weight", "embed_tokens.lut.weight"),
        *((f"{LAYER}.self_attn.{p}_proj.weight", f"{OURS}.self_attn.w_{p}.weight") for p in "qkvo"),
        (f"{LAYER}.input_layernorm.weight", f"{OURS}.input_layernorm.weight"),
        (f"{LAYER}.post_attention_layernorm.weight", f"{OURS}.post_attention_layernorm.weight"),
        (f"{LAYER}.mlp.gate_proj.weight", f"{OURS}.mlp.w_1.weight"),
        (f"{LAYER}.mlp.up_proj.weight", f"{OURS}.mlp.w_3.weight"),
        (f"{LAYER}.mlp.down_proj.weight", f"{OURS}.mlp.w_2.weight"),
        ("model.norm.weight", "norm.weight"),
        ("lm_head.weight", (), "tied:model.embed_tokens.weight"),  # transformers leaves it out; older files not
    )


def variables(
    vocab: int = 256000,
    d_model: int = 3072,
    heads: int = 16,
    kv_heads: int = 16,
    head_dim: int = 256,
    d_ff: int = 24576,
    layers: int = 28,
) -> dict[str, Value]:
    """The sizes every Gemma reads, each with transformers' value for a config.json that lacks it (GemmaConfig's,
    Gemma-7B's, unless given)."""
    return {
        "vocab": ("vocab_size", vocab),
        "d_model": ("hidden_size", d_model),
        "heads": ("num_attention_heads", heads),
        "kv_heads": ("num_key_value_heads", kv_heads),
        "head_dim": ("head_dim", head_dim),
        "d_ff": ("intermediate_size", d_ff),
        "layers": ("num_hidden_layers", layers),
        "eps": ("rms_norm_eps", 1e-6),
    }


FIXED: dict[str, tuple[Any, ...]] = {
    "attention_bias": (False,),
    "tie_word_embeddings": (True,),
    "use_bidirectional_attention": (None, False),
}

FAMILY = Family(
    "gemma",
    "gemma.yaml",
    table(*rows()),
    variables={**variables(), "rope_theta": rope("rope_theta", 10000.0, "rope_theta")},
    # transformers reads Gemma's legacy `gelu` as the tanh approximation it was trained with
    fixed={**FIXED, "hidden_act": ("gelu_pytorch_tanh", "gelu"), "rope_type": ("default",)},
    specials={"bos": 2, "eos": 1, "pad": 0},
    nested=("rope_scaling", "rope_parameters"),
    options={"rope_type": rope_type},
    written=written,
    legacy=without_frequencies,
    architectures=("GemmaForCausalLM",),
    sizes="2B, 7B (Gemma 1 and 1.1)",
)
