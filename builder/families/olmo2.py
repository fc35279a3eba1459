"""OLMo 2 (`Olmo2ForCausalLM`): specs/olmo2.yaml, norms after the sublayers and q/k norms over all heads."""

from __future__ import annotations

from blockgraph.builder.families.llama import rope_type, variables, without_frequencies, written
from blockgraph.builder.families.qwen2 import HEAD_DIM
from blockgraph.builder.hf_mappings import Family, table

LAYER, OURS = "model.layers.{i}", "layers.{i}"

FAMILY = Family(
    "olmo2",
    "olmo2.yaml",
    table(
        ("model.embed_tokens.weight", "embed_tokens.lut.weight"),
        *((f"{LAYER}.self_attn.{p}_proj.weight", f"{OURS}.self_attn.w_{p}.weight") for p in "qkvo"),
        *((f"{LAYER}.self_attn.{p}_norm.weight", f"{OURS}.self_attn.{p}_norm.weight") for p in "qk"),
        (f"{LAYER}.post_attention_layernorm.weight", f"{OURS}.post_attention_layernorm.weight"),
        (f"{LAYER}.mlp.gate_proj.weight", f"{OURS}.mlp.w_1.weight"),
        (f"{LAYER}.mlp.up_proj.weight", f"{OURS}.mlp.w_3.weight"),
        (f"{LAYER}.mlp.down_proj.weight", f"{OURS}.mlp.w_2.weight"),
        (f"{LAYER}.post_feedforward_layernorm.weight", f"{OURS}.post_feedforward_layernorm.weight"),
        ("model.norm.weight", "norm.weight"),
        ("lm_head.weight", "lm_head.proj.weight"),
    ),
    variables={  # transformers' values for a config.json that lacks them (Olmo2Config's)
        **variables(vocab=50304, eps=1e-5),
    },
    fixed={
        "hidden_act": ("silu",),
        "attention_bias": (False,),
        "tie_word_embeddings": (False,),
        "rope_type": ("default",),
        "head_dim": HEAD_DIM,
    },
    specials={"bos": None, "eos": 50279, "pad": 1},
    nested=("rope_scaling", "rope_parameters"),
    options={"rope_type": rope_type},
    written=written,
    legacy=without_frequencies,
    architectures=("Olmo2ForCausalLM",),
    sizes="OLMo-2-1124 7B, 13B",
)
