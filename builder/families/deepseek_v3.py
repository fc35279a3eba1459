"""DeepSeek-V3 (`DeepseekV3ForCausalLM`): specs/deepseek_v3.yaml, multi-head latent attention in every layer, a
SwiGLU in the first `first_k_dense_replace` layers and a mixture of experts after.

One stack holds both kinds of layer (its copies choose their type by `${copy}`), so that our layer numbers are
transformers' and the table needs no arithmetic on them: `model.layers.{i}.mlp.gate_proj` exists for the dense
layers, `model.layers.{i}.mlp.experts.{x}.gate_proj` for the others, and each rule fires where its tensor is.
`save_pretrained` writes the experts one tensor per expert and projection (transformers fuses them only while it
computes), the router as `mlp.gate` with its routing bias `e_score_correction_bias`. YaRN is read from
`rope_parameters` (transformers ≥ 5) or `rope_scaling` (the published config.json), as transformers reads it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from blockgraph.builder.families.llama import mapping, rope, rope_type, without_frequencies
from blockgraph.builder.hf_mappings import Config, Derived, Family, Rule, Value, table

LAYER, OURS = "model.layers.{i}", "layers.{i}"
ATTENTION = (
    "q_proj",
    "q_a_proj",
    "q_a_layernorm",
    "q_b_proj",
    "kv_a_proj_with_mqa",
    "kv_a_layernorm",
    "kv_b_proj",
    "o_proj",
)
SWIGLU = (("gate_proj", "w_1"), ("up_proj", "w_3"), ("down_proj", "w_2"))


def rules() -> tuple[Rule, ...]:
    mlp, ours = f"{LAYER}.mlp", f"{OURS}.mlp"
    return table(
        ("model.embed_tokens.weight", "embed_tokens.lut.weight"),
        *((f"{LAYER}.self_attn.{name}.weight", f"{OURS}.self_attn.{name}.weight") for name in ATTENTION),
        (f"{LAYER}.input_layernorm.weight", f"{OURS}.input_layernorm.weight"),
        (f"{LAYER}.post_attention_layernorm.weight", f"{OURS}.post_attention_layernorm.weight"),
        *((f"{mlp}.{theirs}.weight", f"{ours}.{name}.weight") for theirs, name in SWIGLU),  # the dense layers
        (f"{mlp}.gate.weight", f"{ours}.router.weight"),
        (f"{mlp}.gate.e_score_correction_bias", f"{ours}.router.selection_bias"),
        *((f"{mlp}.experts.{{x}}.{theirs}.weight", f"{ours}.experts.{{x}}.{name}.weight") for theirs, name in SWIGLU),
        *((f"{mlp}.shared_experts.{theirs}.weight", f"{ours}.shared.{name}.weight") for theirs, name in SWIGLU),
        ("model.norm.weight", "norm.weight"),
        ("lm_head.weight", "lm_head.proj.weight"),
    )


def rope_parameters(config: Config) -> Mapping[str, Any]:
    """The rotary settings: `rope_scaling` where given (as transformers prefers it), else `rope_parameters`."""
    return mapping(config, "rope_scaling") or mapping(config, "rope_parameters")


def yarn(read: Any) -> Value:
    """A YaRN setting read from the rotary settings, None where the rotary embedding is not YaRN."""
    return lambda config: read(config, rope_parameters(config)) if rope_type(config) == "yarn" else None


def original_positions(config: Config, parameters: Mapping[str, Any]) -> Any:
    """The context trained on before YaRN: a top-level `original_max_position_embeddings` wins, as in
    transformers, then the rotary settings', then `max_position_embeddings`."""
    inner = parameters.get("original_max_position_embeddings", config.get("max_position_embeddings", 4096))
    return config.get("original_max_position_embeddings", inner)


def yarn_factor(config: Config, parameters: Mapping[str, Any]) -> float:
    """YaRN's factor; where it is null, max_position_embeddings over the original context (as transformers)."""
    factor = parameters.get("factor")
    if factor is None:
        return float(config.get("max_position_embeddings", 4096)) / float(original_positions(config, parameters))
    return float(factor)


def optional_float(key: str) -> Any:
    return lambda config, parameters: None if parameters.get(key) is None else float(parameters[key])


VARIABLES: dict[str, Value] = {
    "vocab": ("vocab_size", 129280),
    "d_model": ("hidden_size", 7168),
    "heads": ("num_attention_heads", 128),
    "q_lora_rank": ("q_lora_rank", 1536),
    "kv_lora_rank": ("kv_lora_rank", 512),
    "qk_nope_head_dim": ("qk_nope_head_dim", 128),
    "qk_rope_head_dim": ("qk_rope_head_dim", 64),
    "v_head_dim": ("v_head_dim", 128),
    "d_ff": ("intermediate_size", 18432),
    "moe_d_ff": ("moe_intermediate_size", 2048),
    "experts": ("n_routed_experts", 256),
    "top_k": ("num_experts_per_tok", 8),
    "groups": ("n_group", 8),
    "groups_kept": ("topk_group", 4),
    "shared_experts": ("n_shared_experts", 1),
    "routed_scaling": ("routed_scaling_factor", 2.5),
    "layers": ("num_hidden_layers", 61),
    "dense_layers": ("first_k_dense_replace", 3),
    "rope_theta": rope("rope_theta", 10000.0, "rope_theta"),
    "yarn_factor": yarn(yarn_factor),
    "yarn_original": yarn(original_positions),
    "yarn_beta_fast": lambda c: float(rope_parameters(c).get("beta_fast") or 32.0),  # transformers: 0 or null → 32
    "yarn_beta_slow": lambda c: float(rope_parameters(c).get("beta_slow") or 1.0),
    "yarn_mscale": yarn(optional_float("mscale")),
    "yarn_mscale_all_dim": yarn(optional_float("mscale_all_dim")),
    "eps": ("rms_norm_eps", 1e-6),
}

FIXED = {
    "hidden_act": ("silu",),
    "attention_bias": (False,),
    "rope_interleave": (True,),
    "norm_topk_prob": (True,),
    "tie_word_embeddings": (False,),
    "pretraining_tp": (1,),
    "num_key_value_heads": (Derived("num_attention_heads", lambda c: c.get("num_attention_heads", 128)),),
    "rope_type": ("default", "yarn"),
    "rope_parameters.attention_factor": (None,),  # the mscales' ratio is what the spec computes
    "rope_parameters.truncate": (True,),
    "quantization_config": (None,),  # the published FP8 weights with their block scales
}


def written(variables: Mapping[str, Any]) -> dict[str, Any]:
    """The rotary settings as transformers ≥ 5 writes them (YaRN's with the context it extends to)."""
    parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": variables["rope_theta"]}
    extra: dict[str, Any] = {}
    if variables["yarn_factor"] is not None:
        yarn_keys = {"factor": "yarn_factor", "original_max_position_embeddings": "yarn_original"}
        yarn_keys |= {key: f"yarn_{key}" for key in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim")}
        found = {key: variables[name] for key, name in yarn_keys.items() if variables[name] is not None}
        parameters = {**parameters, "rope_type": "yarn", **found}
        extra["max_position_embeddings"] = round(variables["yarn_original"] * variables["yarn_factor"])
    return {"rope_parameters": parameters, **extra}


def legacy(name: str) -> str | None:
    """Older checkpoints' rotary frequencies, and the multi-token-prediction module saved as layer 61 (which
    transformers leaves unread), are dropped."""
    return None if re.match(r"model\.layers\.61\.", name) else without_frequencies(name)


FAMILY = Family(
    "deepseek_v3",
    "deepseek_v3.yaml",
    rules(),
    variables=VARIABLES,
    fixed=FIXED,
    specials={"bos": 0, "eos": 1, "pad": None},
    defaults={"num_key_value_heads": 128},
    nested=("rope_scaling", "rope_parameters"),
    options={
        "rope_type": rope_type,
        "rope_parameters.attention_factor": lambda c: rope_parameters(c).get("attention_factor"),
        "rope_parameters.truncate": lambda c: rope_parameters(c).get("truncate", True),
        "quantization_config": lambda c: c.get("quantization_config"),  # refused on the way in, never written
    },
    written=written,
    legacy=legacy,
    architectures=("DeepseekV3ForCausalLM",),
    sizes="V3, R1 (671B, 37.6B active) as bfloat16 weights (the published FP8 ones are refused)",
)
