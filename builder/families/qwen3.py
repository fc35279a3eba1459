"""Qwen3 (`Qwen3ForCausalLM`): specs/qwen3.yaml, LLaMA's table with the per-head q/k norms and no biases, an
explicit head_dim; Qwen2's reading (families/qwen2.py)."""

from __future__ import annotations

from blockgraph.builder.families import qwen2
from blockgraph.builder.families.llama import rope_type, rules, without_frequencies, written
from blockgraph.builder.families.qwen2 import LAYER, OURS
from blockgraph.builder.hf_mappings import Family, table

FAMILY = Family(
    "qwen3",
    "qwen3.yaml",
    (*rules(), *table(*((f"{LAYER}.self_attn.{p}_norm.weight", f"{OURS}.self_attn.{p}_norm.weight") for p in "qk"))),
    variables={**qwen2.variables(), "head_dim": ("head_dim", 128)},
    fixed={**qwen2.FIXED, "attention_bias": (False,)},
    specials={"bos": None, "eos": None, "pad": None},
    nested=("rope_scaling", "rope_parameters"),
    options={"rope_type": rope_type},
    written=written,
    legacy=without_frequencies,
    architectures=("Qwen3ForCausalLM",),
    sizes="8B, 14B, 32B (the tied 0.6B–4B are refused)",
)
