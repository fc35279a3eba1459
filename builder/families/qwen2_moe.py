"""Qwen2-MoE (`Qwen2MoeForCausalLM`): specs/qwen2_moe.yaml, Qwen2's attention and reading with a mixture of experts
(60 routed, a gated shared one) in every layer.

`save_pretrained` writes one tensor per expert and projection (`mlp.experts.{x}.gate_proj`, `up_proj`,
`down_proj`), the router as `mlp.gate`, the shared expert as `mlp.shared_expert` and its gate
`mlp.shared_expert_gate` [1, hidden]. A layer is sparse where it is not in `mlp_only_layers` and its number plus one
is a multiple of `decoder_sparse_step`: the spec makes every layer sparse, as the published models do, and import
refuses the other patterns.
"""

from __future__ import annotations

from blockgraph.builder.families import qwen2
from blockgraph.builder.families.llama import rope_type, rules, variables, without_frequencies, written
from blockgraph.builder.hf_mappings import Family, Rule, table


def moe_rules() -> tuple[Rule, ...]:
    """LLaMA's table (Qwen2's) with the q/k/v biases, the feed-forward rows replaced by the experts'."""
    layer, ours = qwen2.LAYER, qwen2.OURS
    moe, our_moe = f"{layer}.mlp", f"{ours}.mlp"
    names = {"gate_proj": "w_1", "up_proj": "w_3", "down_proj": "w_2"}
    dense = {f"{moe}.{p}.weight" for p in names}
    return (
        *(rule for rule in rules() if rule.hf not in dense),
        *table(
            *((f"{layer}.self_attn.{p}_proj.bias", f"{ours}.self_attn.w_{p}.bias") for p in "qkv"),
            (f"{moe}.gate.weight", f"{our_moe}.router.weight"),
            *((f"{moe}.experts.{{x}}.{p}.weight", f"{our_moe}.experts.{{x}}.{w}.weight") for p, w in names.items()),
            *((f"{moe}.shared_expert.{p}.weight", f"{our_moe}.shared.{w}.weight") for p, w in names.items()),
            (f"{moe}.shared_expert_gate.weight", f"{our_moe}.shared_gate.weight"),
        ),
    )


VARIABLES = {
    **variables(vocab=151936, d_model=2048, heads=16, layers=24),
    "d_ff": ("moe_intermediate_size", 1408),
    "shared_d_ff": ("shared_expert_intermediate_size", 5632),
    "experts": ("num_experts", 60),
    "top_k": ("num_experts_per_tok", 4),
    "aux_weight": ("router_aux_loss_coef", 0.001),
}

FAMILY = Family(
    "qwen2_moe",
    "qwen2_moe.yaml",
    moe_rules(),
    variables=VARIABLES,
    fixed={
        **qwen2.FIXED,
        "head_dim": qwen2.HEAD_DIM,
        "qkv_bias": (True,),
        "norm_topk_prob": (False,),
        "decoder_sparse_step": (1,),  # every layer sparse: (i + 1) % 1 == 0
        "mlp_only_layers": ([],),
    },
    specials={"bos": None, "eos": None, "pad": None},
    nested=("rope_scaling", "rope_parameters"),
    options={"rope_type": rope_type},
    written=written,
    legacy=without_frequencies,
    architectures=("Qwen2MoeForCausalLM",),
    sizes="Qwen1.5-MoE-A2.7B (14.3B, 2.7B active), Qwen2-57B-A14B",
)
