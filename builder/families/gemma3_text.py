"""Gemma 3, text only (`Gemma3ForCausalLM`, model_type gemma3_text): specs/gemma3_text.yaml, Gemma 2's table with
the per-head q/k norms; five sliding-window layers to one global, each kind with its own rotary settings."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from blockgraph.builder.families import gemma, gemma2
from blockgraph.builder.families.llama import mapping, without_frequencies
from blockgraph.builder.hf_mappings import Config, Family, table

SLIDING, FULL = "sliding_attention", "full_attention"
QK_NORMS = ("q_norm", "k_norm")


def rope_of(config: Config, layer_type: str) -> Mapping[str, Any]:
    """One kind of layer's rotary settings: `rope_parameters[layer_type]` (transformers ≥ 5), else the older
    top-level keys (`rope_theta` and `rope_scaling` for the global layers, `rope_local_base_freq` the local)."""
    parameters = mapping(config, "rope_parameters").get(layer_type)
    if isinstance(parameters, dict):
        return parameters
    if layer_type == FULL:
        scaling = mapping(config, "rope_scaling")
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        return {**scaling, "rope_type": kind, "rope_theta": config.get("rope_theta", 1e6)}
    return {"rope_type": "default", "rope_theta": config.get("rope_local_base_freq", 10000.0)}


def rope_factor(config: Config) -> float:
    """The global layers' linear interpolation factor (1: none)."""
    parameters = rope_of(config, FULL)
    return float(parameters.get("factor", 1.0)) if parameters.get("rope_type") == "linear" else 1.0


def pattern(config: Config) -> Any:
    """Every pattern-th layer is global: as `layer_types` has it where given (what transformers follows; the
    import then checks the whole list against it), else `sliding_window_pattern` (6 by default)."""
    types = config.get("layer_types")
    if isinstance(types, list) and types:
        return types.index(FULL) + 1 if FULL in types else len(types) + 1
    return config.get("sliding_window_pattern", config.get("_sliding_window_pattern", 6))


def written(variables: Mapping[str, Any]) -> dict[str, Any]:
    """The rotary settings of each kind of layer, as transformers ≥ 5 writes them, and the pattern."""
    full: dict[str, Any] = {"rope_type": "default", "rope_theta": variables["rope_theta"]}
    if variables["rope_factor"] != 1.0:
        full = {**full, "rope_type": "linear", "factor": variables["rope_factor"]}
    local = {"rope_type": "default", "rope_theta": variables["rope_local_theta"]}
    return {"rope_parameters": {FULL: full, SLIDING: local}, "sliding_window_pattern": variables["pattern"]}


FAMILY = Family(
    "gemma3_text",
    "gemma3_text.yaml",
    (
        *gemma2.FAMILY.rules,
        *table(*((f"{gemma.LAYER}.self_attn.{n}.weight", f"{gemma.OURS}.self_attn.{n}.weight") for n in QK_NORMS)),
    ),
    variables={
        **gemma.variables(vocab=262208, d_model=2304, heads=8, kv_heads=4, d_ff=9216, layers=26),  # the config's
        "rope_theta": lambda c: float(rope_of(c, FULL).get("rope_theta", 1e6)),
        "rope_local_theta": lambda c: float(rope_of(c, SLIDING).get("rope_theta", 10000.0)),
        "rope_factor": rope_factor,
        "query_pre_attn_scalar": ("query_pre_attn_scalar", 256),
        "window": ("sliding_window", 4096),
        "pattern": pattern,
        "final_softcap": ("final_logit_softcapping", None),
    },
    fixed={
        **gemma.FIXED,
        "hidden_activation": ("gelu_pytorch_tanh",),
        "rope_type": ("default", "linear"),
        "local_rope_type": ("default",),
        "layer_types": (
            gemma2.layer_types(
                "every pattern-th layer full, the others sliding", lambda c, i: (i + 1) % int(pattern(c)) != 0
            ),
        ),
    },
    specials=gemma.FAMILY.specials,
    nested=("rope_scaling", "rope_parameters"),
    options={
        "rope_type": lambda c: rope_of(c, FULL).get("rope_type", "default"),
        "local_rope_type": lambda c: rope_of(c, SLIDING).get("rope_type", "default"),
    },
    written=written,
    legacy=without_frequencies,
    architectures=("Gemma3ForCausalLM",),
    sizes="1B; the 4B to 27B language models saved as `Gemma3ForCausalLM`",
)
