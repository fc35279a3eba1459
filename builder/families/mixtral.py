"""Mixtral (`MixtralForCausalLM`): specs/mixtral.yaml, Mistral's reading with a mixture of experts in every layer.

transformers keeps each layer's experts fused ([E, 2·d_ff, d]) while it computes, but `save_pretrained` writes
Mixtral's checkpoints as published: one tensor per expert and projection (`experts.{x}.w1` gate, `w3` up, `w2`
down) and the router as `block_sparse_moe.gate`.
"""

from __future__ import annotations

from blockgraph.builder.families import llama
from blockgraph.builder.hf_mappings import Family, Rule, table


def rules() -> tuple[Rule, ...]:
    layer, ours = "model.layers.{i}", "layers.{i}"
    moe, our_moe = f"{layer}.block_sparse_moe", f"{ours}.block_sparse_moe"
    return table(
        ("model.embed_tokens.weight", "embed_tokens.lut.weight"),
        *((f"{layer}.self_attn.{p}_proj.weight", f"{ours}.self_attn.w_{p}.weight") for p in "qkvo"),
        (f"{layer}.input_layernorm.weight", f"{ours}.input_layernorm.weight"),
        (f"{layer}.post_attention_layernorm.weight", f"{ours}.post_attention_layernorm.weight"),
        (f"{moe}.gate.weight", f"{our_moe}.router.weight"),
        *((f"{moe}.experts.{{x}}.w{n}.weight", f"{our_moe}.experts.{{x}}.w_{n}.weight") for n in "123"),
        ("model.norm.weight", "norm.weight"),
        ("lm_head.weight", "lm_head.proj.weight"),
    )


FAMILY = Family(
    "mixtral",
    "mixtral.yaml",
    rules(),
    variables={
        **llama.variables(d_ff=14336, eps=1e-5),
        "rope_theta": llama.rope("rope_theta", 1e6, "rope_theta"),
        "experts": ("num_local_experts", 8),
        "top_k": ("num_experts_per_tok", 2),
        "window": ("sliding_window", None),
        "aux_weight": ("router_aux_loss_coef", 0.001),
    },
    fixed={**llama.FIXED, "router_jitter_noise": (0.0,)},  # noise on the router's input while training: none
    specials={"bos": 1, "eos": 2, "pad": None},
    nested=("rope_scaling", "rope_parameters"),
    options={"rope_type": llama.rope_type},
    written=llama.written,
    legacy=llama.without_frequencies,
    architectures=("MixtralForCausalLM",),
    sizes="8x7B (v0.1: 46.7B, 12.9B active), 8x22B",
)
