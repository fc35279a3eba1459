"""Mistral (`MistralForCausalLM`): LLaMA's table and reading, with a sliding attention window."""

from __future__ import annotations

import dataclasses

from blockgraph.builder.families import llama

FAMILY = dataclasses.replace(
    llama.FAMILY,
    model_type="mistral",
    spec="mistral.yaml",
    variables={**llama.variables(d_ff=14336, eps=1e-5), "window": ("sliding_window", 4096)},
    architectures=("MistralForCausalLM",),
    sizes="7B (v0.1)",
)
