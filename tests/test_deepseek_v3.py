"""The deepseek_v3 family beyond what every family is held to (tests/test_import.py's MODELS): left padding, a
direct query projection without YaRN, the published config.json read as the shipped spec's defaults, and what
the spec does not compute refused by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from conftest import SPECS, redraw
from safetensors.torch import load_file

from blockgraph import builder
from blockgraph.builder.families import FAMILIES
from blockgraph.builder.hf_import import spec_variables
from blockgraph.builder.hf_mappings import convert
from blockgraph.common.errors import CheckpointError, Location

torch.set_num_threads(1)

FAMILY = FAMILIES["deepseek_v3"]
SMALL = {
    "vocab_size": 61, "hidden_size": 24, "intermediate_size": 40, "moe_intermediate_size": 12, "num_hidden_layers": 3,
    "num_attention_heads": 3, "num_key_value_heads": 3, "kv_lora_rank": 10, "qk_nope_head_dim": 6,
    "qk_rope_head_dim": 4, "v_head_dim": 5, "n_routed_experts": 6, "num_experts_per_tok": 3, "n_group": 3,
    "topk_group": 2, "n_shared_experts": 2, "first_k_dense_replace": 2,
}  # fmt: skip
VARIANTS = {
    "direct query, plain rotary, 2 shared experts": {"q_lora_rank": None, "rope_parameters": {"rope_theta": 50.0}},
    "query latent, YaRN": {
        "q_lora_rank": 8,
        "max_position_embeddings": 64,
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 50.0,
            "factor": 8.0,
            "original_max_position_embeddings": 8,
        },
    },
}
# DeepSeek-V3's config.json as published (the keys transformers reads, and its FP8 weights' quantization_config)
PUBLISHED = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "attention_bias": False,
    "bos_token_id": 0, "eos_token_id": 1, "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168,
    "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 163840, "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1, "pretraining_tp": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06, "rope_theta": 10000, "routed_scaling_factor": 2.5,
    "rope_scaling": {
        "beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096, "type": "yarn",
    },
    "scoring_func": "sigmoid", "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc",
    "v_head_dim": 128, "vocab_size": 129280,
}  # fmt: skip


def _saved_tensors(reference: torch.nn.Module, where: Path) -> dict[str, torch.Tensor]:
    """The tensors as `save_pretrained` writes them (one per expert and projection)."""
    reference.save_pretrained(where)
    return load_file(str(where / "model.safetensors"))


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_spec_read_from_the_config_computes_what_transformers_does(tmp_path, variant, side):
    config = transformers.DeepseekV3Config(**SMALL, **VARIANTS[variant])
    torch.manual_seed(0)
    reference = transformers.DeepseekV3ForCausalLM(config).eval()
    redraw(reference, seed=1)
    variables = spec_variables(FAMILY, config.to_dict(), Location())
    ours = builder.build(FAMILY.spec_path, overrides=variables).eval()
    state, _ = convert(FAMILY, _saved_tensors(reference, tmp_path))
    ours.load_state_dict(state)  # strict: every tensor of the spec, from exactly the checkpoint's
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(2, 61, (3, 9), generator=generator)
    pad = torch.zeros(3, 9, dtype=torch.bool)
    for row in (1, 2):
        pad[row, :row] = side == "left"
        pad[row, 9 - 2 * row :] = side == "right"
    with torch.no_grad():
        expected = reference(input_ids=tokens, attention_mask=(~pad).long()).logits
        got = ours(tokens=tokens, pad=pad)
    assert (got - expected).abs()[~pad].max().item() <= 1e-5


def test_the_published_config_reads_as_the_shipped_specs_defaults_and_its_fp8_weights_are_refused():
    defaults = builder.load_spec(SPECS / "deepseek_v3.yaml").spec.vars or {}
    assert spec_variables(FAMILY, PUBLISHED, Location()) == {name: defaults[name] for name in FAMILY.variables}
    fp8 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
    with pytest.raises(CheckpointError, match=r"quantization_config is .*; the deepseek_v3 spec implements null"):
        spec_variables(FAMILY, {**PUBLISHED, "quantization_config": fp8}, Location())


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rope_interleave": False}, "rope_interleave is .false.; the deepseek_v3 spec implements true"),
        ({"norm_topk_prob": False}, "norm_topk_prob is .false."),
        (
            {"num_key_value_heads": 1},
            "num_key_value_heads is .?1.?; the deepseek_v3 spec implements num_attention_heads",
        ),
        ({"rope_scaling": {**PUBLISHED["rope_scaling"], "attention_factor": 1.2}}, "rope_parameters.attention_factor"),
        (
            {"rope_scaling": {"type": "longrope"}},
            "rope_type is .?longrope.?; the deepseek_v3 spec implements default or yarn",
        ),
    ],
)
def test_what_the_spec_does_not_compute_is_refused_by_name(changes: dict[str, Any], message: str):
    with pytest.raises(CheckpointError, match=message):
        spec_variables(FAMILY, {**PUBLISHED, **changes}, Location())
