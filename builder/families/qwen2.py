"""Qwen2 (`Qwen2ForCausalLM`): specs/qwen2.yaml, LLaMA's table with the q/k/v biases; Qwen3 (families/qwen3.py)
builds on its reading."""

from __future__ import annotations

from typing import Any

from blockgraph.builder.families import llama
from blockgraph.builder.families.llama import FIXED as LLAMA_FIXED
from blockgraph.builder.families.llama import rope_type, rules, without_frequencies, written
from blockgraph.builder.hf_mappings import Config, Derived, Family, Value, table

LAYER, OURS = "model.layers.{i}", "layers.{i}"


def variables() -> dict[str, Value]:
    """The sizes a Qwen reads, each with transformers' value for a config.json that lacks it."""
    return llama.variables(vocab=151936, d_ff=22016)


def _full_attention(config: Config) -> list[str]:
    return ["full_attention"] * int(config.get("num_hidden_layers", 32))


# The spec attends every position of every layer: Qwen's sliding window (use_sliding_window, for the layers from
# max_window_layers on) is refused, and so is an output layer tied to the embedding (Qwen2-0.5B, 1.5B), which a
# spec ties or does not, whatever its variables.
FIXED: dict[str, tuple[Any, ...]] = {
    "hidden_act": ("silu",),
    "tie_word_embeddings": (False,),
    "use_sliding_window": (False,),
    "layer_types": (Derived("full_attention for every layer", _full_attention), None),
    "rope_type": ("default",),
}

# config.json's head_dim, where it says one, must be hidden_size / num_attention_heads, and export writes that:
# these classes read a null head_dim as the width itself (LLaMA's takes it as "derived")
HEAD_DIM = (LLAMA_FIXED["head_dim"][1],)

FAMILY = Family(
    "qwen2",
    "qwen2.yaml",
    (*rules(), *table(*((f"{LAYER}.self_attn.{p}_proj.bias", f"{OURS}.self_attn.w_{p}.bias") for p in "qkv"))),
    variables=variables(),
    fixed={**FIXED, "head_dim": HEAD_DIM},
    specials={"bos": None, "eos": None, "pad": None},
    nested=("rope_scaling", "rope_parameters"),
    options={"rope_type": rope_type},
    written=written,
    legacy=without_frequencies,
    architectures=("Qwen2ForCausalLM",),
    sizes="7B, 72B (and Qwen2.5 7B to 72B; the tied 0.5B–3B are refused)",
)
