"""CLIP (`CLIPModel`): specs/clip.yaml, a vision tower and a text tower whose embeddings are compared all against all.

config.json keeps each tower's sizes in a mapping of its own (`vision_config`, `text_config`) and the shared
projection width at the top; one table below says where each variable lives, for reading and for writing back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from blockgraph.builder.hf_mappings import Config, Family, Row, linear, norm, table

# variable → (its tower's mapping, key, transformers' default: the published ViT-B/32's)
TOWERS: dict[str, tuple[str, str, Any]] = {
    "vocab": ("text_config", "vocab_size", 49408),
    "max_len": ("text_config", "max_position_embeddings", 77),
    "d_model": ("text_config", "hidden_size", 512),
    "heads": ("text_config", "num_attention_heads", 8),
    "d_ff": ("text_config", "intermediate_size", 2048),
    "layers": ("text_config", "num_hidden_layers", 12),
    "eps": ("text_config", "layer_norm_eps", 1e-5),
    "image_size": ("vision_config", "image_size", 224),
    "patch": ("vision_config", "patch_size", 32),
    "vision_d_model": ("vision_config", "hidden_size", 768),
    "vision_heads": ("vision_config", "num_attention_heads", 12),
    "vision_d_ff": ("vision_config", "intermediate_size", 3072),
    "vision_layers": ("vision_config", "num_hidden_layers", 12),
    "vision_eps": ("vision_config", "layer_norm_eps", 1e-5),
}
# what the spec implements in both towers (a tower's option → its one value)
FIXED: dict[str, Any] = {"hidden_act": "quick_gelu", "attention_dropout": 0.0}
LEGACY_EOS = 2  # text_config.eos_token_id of the original checkpoints: end-of-text is then the largest id


def _section(config: Config, name: str) -> Mapping[str, Any]:
    """A tower's mapping (an absent or malformed one reads as transformers' defaults; `nested` reports the latter)."""
    found = config.get(name)
    return found if isinstance(found, Mapping) else {}


def _read(name: str, key: str, default: Any) -> Callable[[Config], Any]:
    return lambda config: _section(config, name).get(key, default)


def _eos_token(config: Config) -> int | None:
    """The id the text pooler looks for; None where it takes each row's largest id, as transformers does for
    the original checkpoints' eos_token_id of 2."""
    eos = _section(config, "text_config").get("eos_token_id", 49407)
    return None if eos == LEGACY_EOS else eos


def _written(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Each tower's mapping: its sizes, the options the spec fixes, the text pooler's eos_token_id."""
    towers: dict[str, dict[str, Any]] = {name: dict(FIXED) for name in ("text_config", "vision_config")}
    for variable, (name, key, _) in TOWERS.items():
        towers[name][key] = variables[variable]
    eos = variables["eos_token"]
    towers["text_config"]["eos_token_id"] = LEGACY_EOS if eos is None else eos
    towers["vision_config"]["num_channels"] = 3
    return towers


def _layers(tower: str, ours: str) -> tuple[Row, ...]:
    """One tower's pre-norm layers (`{e}`) onto the spec's `layer` sub-graph."""
    hf, mine = f"{tower}.encoder.layers.{{e}}", f"{ours}.{{e}}"
    return (
        *norm(f"{hf}.layer_norm1", f"{mine}.layer_norm1.norm"),
        *linear(f"{hf}.self_attn.q_proj", f"{mine}.self_attn.w_q"),
        *linear(f"{hf}.self_attn.k_proj", f"{mine}.self_attn.w_k"),
        *linear(f"{hf}.self_attn.v_proj", f"{mine}.self_attn.w_v"),
        *linear(f"{hf}.self_attn.out_proj", f"{mine}.self_attn.w_o"),
        *norm(f"{hf}.layer_norm2", f"{mine}.layer_norm2.norm"),
        *linear(f"{hf}.mlp.fc1", f"{mine}.mlp.w_1"),
        *linear(f"{hf}.mlp.fc2", f"{mine}.mlp.w_2"),
    )


def _today(name: str) -> str | None:
    """Older checkpoints saved each tower's position ids (a range the spec computes)."""
    return None if name.endswith("embeddings.position_ids") else name


FAMILY = Family(
    "clip",
    "clip.yaml",
    table(
        ("text_model.embeddings.token_embedding.weight", "token_embedding.lut.weight"),
        ("text_model.embeddings.position_embedding.weight", "position_embedding.pe.weight"),
        *_layers("text_model", "text_layers"),
        *norm("text_model.final_layer_norm", "final_layer_norm.norm"),
        ("text_projection.weight", "text_projection.proj.weight"),
        ("vision_model.embeddings.patch_embedding.weight", "patch_embedding.projection.weight"),
        ("vision_model.embeddings.class_embedding", "class_embedding.tokens", "unsqueeze"),
        ("vision_model.embeddings.position_embedding.weight", "vision_position.pe"),
        *norm("vision_model.pre_layrnorm", "pre_layrnorm.norm"),
        *_layers("vision_model", "vision_layers"),
        *norm("vision_model.post_layernorm", "post_layernorm.norm"),
        ("visual_projection.weight", "visual_projection.proj.weight"),
        ("logit_scale", "logits.logit_scale"),
    ),
    variables={
        **{variable: _read(name, key, default) for variable, (name, key, default) in TOWERS.items()},
        "eos_token": _eos_token,
        "proj_dim": ("projection_dim", 512),
    },
    fixed={
        **{f"{name}.{key}": (value,) for name in ("text_config", "vision_config") for key, value in FIXED.items()},
        "vision_config.num_channels": (3,),
    },
    options={
        **{
            f"{name}.{key}": _read(name, key, value)
            for name in ("text_config", "vision_config")
            for key, value in FIXED.items()
        },
        "vision_config.num_channels": _read("vision_config", "num_channels", 3),
    },
    nested=("text_config", "vision_config"),
    written=_written,
    legacy=_today,
    architectures=("CLIPModel",),
    task="encoder",
    sizes="ViT-B/32 (151M, `openai/clip-vit-base-patch32`), ViT-B/16 (150M), ViT-L/14 (428M)",
)
