"""LLaMA (`LlamaForCausalLM`): specs/llama.yaml; Mistral (families/mistral.py) is the same table and reading."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from blockgraph.builder.hf_mappings import Config, Derived, Family, Rule, Value, table


def mapping(config: Config, key: str) -> Mapping[str, Any]:
    """`rope_parameters` or `rope_scaling`, {} where absent (or not a mapping, which the import reports)."""
    value = config.get(key)
    return value if isinstance(value, dict) else {}


def rope(key: str, default: float, legacy: str) -> Value:
    """A rotary setting from `rope_parameters` (transformers ≥ 5) or the older top-level key."""
    return lambda config: float(mapping(config, "rope_parameters").get(key, config.get(legacy, default)))


def rope_type(config: Config) -> Any:
    scaling, parameters = mapping(config, "rope_scaling"), mapping(config, "rope_parameters")
    return scaling.get("rope_type", scaling.get("type")) or parameters.get("rope_type", "default")


def without_frequencies(name: str) -> str | None:
    """Older checkpoints saved the rotary frequencies, which the spec computes."""
    return None if re.search(r"rotary_emb\.inv_freq$", name) else name


def rules() -> tuple[Rule, ...]:
    layer, ours = "model.layers.{i}", "layers.{i}"
    return table(
        ("model.embed_tokens.weight", "embed_tokens.lut.weight"),
        *((f"{layer}.self_attn.{p}_proj.weight", f"{ours}.self_attn.w_{p}.weight") for p in "qkvo"),
        (f"{layer}.input_layernorm.weight", f"{ours}.input_layernorm.weight"),
        (f"{layer}.post_attention_layernorm.weight", f"{ours}.post_attention_layernorm.weight"),
        (f"{layer}.mlp.gate_proj.weight", f"{ours}.mlp.w_1.weight"),
        (f"{layer}.mlp.up_proj.weight", f"{ours}.mlp.w_3.weight"),
        (f"{layer}.mlp.down_proj.weight", f"{ours}.mlp.w_2.weight"),
        ("model.norm.weight", "norm.weight"),
        ("lm_head.weight", "lm_head.proj.weight"),
    )


def variables(
    *,
    vocab: int = 32000,
    d_model: int = 4096,
    heads: int = 32,
    d_ff: int = 11008,
    layers: int = 32,
    eps: float = 1e-6,
) -> dict[str, Value]:
    """The sizes a LLaMA-layout decoder reads (LLaMA, Mistral, Qwen, OLMo 2, Phi-3, Mixtral), each with
    transformers' value for a config.json that lacks it (LlamaConfig's unless given); key/value heads default to
    the query heads."""
    return {
        "vocab": ("vocab_size", vocab),
        "d_model": ("hidden_size", d_model),
        "heads": ("num_attention_heads", heads),
        "kv_heads": lambda c: c.get("num_key_value_heads") or c.get("num_attention_heads", heads),
        "d_ff": ("intermediate_size", d_ff),
        "layers": ("num_hidden_layers", layers),
        "rope_theta": rope("rope_theta", 10000.0, "rope_theta"),
        "eps": ("rms_norm_eps", eps),
    }


FIXED = {
    "hidden_act": ("silu",),
    "attention_bias": (False,),
    "mlp_bias": (False,),
    "tie_word_embeddings": (False,),
    "pretraining_tp": (1,),
    "rope_type": ("default",),
    "head_dim": (
        None,
        Derived(
            "hidden_size / num_attention_heads",
            lambda c: c.get("hidden_size", 0) // max(1, int(c.get("num_attention_heads", 1))),
        ),
    ),
}


def written(variables: Mapping[str, Any]) -> dict[str, Any]:
    """The settings read by rules: key/value heads and the rotary parameters (as transformers ≥ 5 writes them)."""
    parameters = {"rope_type": "default", "rope_theta": variables["rope_theta"]}
    return {"num_key_value_heads": variables["kv_heads"], "rope_parameters": parameters}


FAMILY = Family(
    "llama",
    "llama.yaml",
    rules(),
    variables={**variables(), "window": lambda c: None},
    fixed=FIXED,
    specials={"bos": 1, "eos": 2, "pad": None},
    nested=("rope_scaling", "rope_parameters"),
    options={"rope_type": rope_type},
    written=written,
    legacy=without_frequencies,
    architectures=("LlamaForCausalLM",),
    sizes="7B, 13B, 33B, 65B (and Llama 2/3 without `rope_scaling`)",
)
