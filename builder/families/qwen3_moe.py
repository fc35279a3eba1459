"""Qwen3-MoE (`Qwen3MoeForCausalLM`): specs/qwen3_moe.yaml, Qwen3's attention (per-head q/k norms, an explicit
head_dim) with a mixture of experts in every layer, written as Qwen2-MoE's without the shared expert."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from blockgraph.builder.families import llama, qwen2, qwen2_moe
from blockgraph.builder.families.qwen2 import LAYER, OURS
from blockgraph.builder.hf_mappings import Config, Family, table

BIASES = {f"{LAYER}.self_attn.{p}_proj.bias" for p in "qkv"}
RULES = (
    *(rule for rule in qwen2_moe.moe_rules() if rule.hf not in BIASES and ".shared_expert" not in rule.hf),
    *table(*((f"{LAYER}.self_attn.{p}_norm.weight", f"{OURS}.self_attn.{p}_norm.weight") for p in "qk")),
)


def head_dim(config: Config) -> Any:
    """config.json's head_dim (Qwen3-30B-A3B: 128), else hidden_size / num_attention_heads, as the class reads it."""
    heads = max(1, int(config.get("num_attention_heads", 32)))
    return config.get("head_dim") or config.get("hidden_size", 2048) // heads


def experts(config: Config) -> Any:
    """`num_local_experts`, as transformers 5 writes it, or `num_experts`, as the published configs do."""
    return config.get("num_local_experts", config.get("num_experts", 128))


def written(variables: Mapping[str, Any]) -> dict[str, Any]:
    """LLaMA's (key/value heads, rotary parameters), the head width and the experts."""
    return {**llama.written(variables), "head_dim": variables["head_dim"], "num_local_experts": variables["experts"]}


FAMILY = Family(
    "qwen3_moe",
    "qwen3_moe.yaml",
    RULES,
    variables={
        **{name: value for name, value in qwen2_moe.VARIABLES.items() if name != "shared_d_ff"},
        "kv_heads": lambda c: c.get("num_key_value_heads") or c.get("num_attention_heads", 32),
        "heads": ("num_attention_heads", 32),
        "layers": ("num_hidden_layers", 24),
        "d_ff": ("moe_intermediate_size", 768),
        "experts": experts,
        "top_k": ("num_experts_per_tok", 8),
        "head_dim": head_dim,
    },
    fixed={
        **qwen2.FIXED,
        "attention_bias": (False,),
        "norm_topk_prob": (True,),
        "decoder_sparse_step": (1,),  # every layer sparse: (i + 1) % 1 == 0
        "mlp_only_layers": ([], None),
    },
    defaults={"norm_topk_prob": False},  # transformers' where config.json says nothing: refused
    specials={"bos": None, "eos": None, "pad": None},
    nested=("rope_scaling", "rope_parameters"),
    options={"rope_type": llama.rope_type},
    written=written,
    legacy=llama.without_frequencies,
    architectures=("Qwen3MoeForCausalLM",),
    sizes="Qwen3-30B-A3B (30.5B, 3.3B active), Qwen3-235B-A22B",
)
