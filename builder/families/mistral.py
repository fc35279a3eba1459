"""Mistral (`MistralForCausalLM`): LLaMA's table and reading, with a sliding attention window."""

from __future__ import annotations

from blockgraph.builder.families import llama
from blockgraph.builder.hf_mappings import Family

FAMILY = Family(
    "mistral",
    "mistral.yaml",
    llama.rules(),
    variables={**llama.variables(14336, 1e-5), "window": ("sliding_window", 4096)},
    fixed=llama.FIXED,
    specials={"bos": 1, "eos": 2, "pad": None},
    nested=("rope_scaling", "rope_parameters"),
    options={"rope_type": llama.rope_type},
    written=llama.written,
    legacy=llama.without_frequencies,
    architectures=("MistralForCausalLM",),
    sizes="7B (v0.1)",
)
