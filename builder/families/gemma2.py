"""Gemma 2 (`Gemma2ForCausalLM`): specs/gemma2.yaml, Gemma's table with the norms around each sublayer's output,
softcapped scores and logits, and layers alternating a sliding window and global attention."""

from __future__ import annotations

from collections.abc import Callable

from blockgraph.builder.families import gemma
from blockgraph.builder.families.llama import rope, rope_type, without_frequencies, written
from blockgraph.builder.hf_mappings import Config, Derived, Family, table


def layer_types(text: str, sliding: Callable[[Config, int], bool]) -> Derived:
    """config.json's `layer_types` as the spec's repeated stack gives them: layer i slides where `sliding` says."""

    def types(config: Config) -> list[str]:
        layers = range(int(config.get("num_hidden_layers", 0)))
        return ["sliding_attention" if sliding(config, i) else "full_attention" for i in layers]

    return Derived(text, types)


NORMS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")

FAMILY = Family(
    "gemma2",
    "gemma2.yaml",
    table(*gemma.rows(), *((f"{gemma.LAYER}.{n}.weight", f"{gemma.OURS}.{n}.weight") for n in NORMS)),
    variables={
        **gemma.variables(d_model=2304, heads=8, kv_heads=4, d_ff=9216, layers=26),  # Gemma2Config's
        "rope_theta": rope("rope_theta", 10000.0, "rope_theta"),
        "query_pre_attn_scalar": ("query_pre_attn_scalar", 256),
        "window": ("sliding_window", 4096),
        "attn_softcap": ("attn_logit_softcapping", 50.0),
        "final_softcap": ("final_logit_softcapping", 30.0),
    },
    fixed={
        **gemma.FIXED,
        "hidden_activation": ("gelu_pytorch_tanh",),
        "rope_type": ("default",),
        "layer_types": (layer_types("sliding, full, sliding, … (layer 0 sliding)", lambda c, i: i % 2 == 0),),
    },
    specials=gemma.FAMILY.specials,
    nested=("rope_scaling", "rope_parameters"),
    options={"rope_type": rope_type},
    written=written,
    legacy=without_frequencies,
    architectures=("Gemma2ForCausalLM",),
    sizes="2B, 9B, 27B",
)
