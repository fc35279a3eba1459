"""ViT (`ViTForImageClassification`): specs/vit.yaml, the Vision Transformer with its classifier on [CLS]; it reads
images, so it has no tokenizer and no special tokens, and its class count comes from config.json's labels."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from blockgraph.builder.hf_mappings import Config, Family, linear, norm, table


def _labels(config: Config) -> Any:
    """How many classes: `num_labels` where given, else as many as `id2label` names (transformers' default 2)."""
    if "num_labels" in config:
        return config["num_labels"]
    names = config.get("id2label")
    return len(names) if isinstance(names, Mapping) and names else 2


def _leftover(config: Config) -> Any:
    """The pixels of each side no patch covers: 0, as the spec implements (its grid is image_size / patch)."""
    size, patch = config.get("image_size", 224), config.get("patch_size", 16)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (size, patch)):
        return 0  # not sizes: reading the variables says so
    return size % patch if size >= patch else f"{size} (smaller than one patch of {patch})"


def _written(variables: Mapping[str, Any]) -> dict[str, Any]:
    """config.json's labels, named as transformers names them when it knows no better (LABEL_0, …)."""
    names = {str(i): f"LABEL_{i}" for i in range(variables["labels"])}
    return {"id2label": names, "label2id": {name: i for i, name in enumerate(names.values())}}


FAMILY = Family(
    "vit",
    "vit.yaml",
    table(
        ("vit.embeddings.patch_embeddings.projection.weight", "patch_embeddings.projection.weight"),
        ("vit.embeddings.patch_embeddings.projection.bias", "patch_embeddings.projection.bias"),
        ("vit.embeddings.cls_token", "cls_token.tokens", "row"),
        ("vit.embeddings.position_embeddings", "position_embeddings.pe", "row"),
        *linear("vit.encoder.layer.{e}.attention.attention.query", "encoder.{e}.self_attn.w_q"),
        *linear("vit.encoder.layer.{e}.attention.attention.key", "encoder.{e}.self_attn.w_k"),
        *linear("vit.encoder.layer.{e}.attention.attention.value", "encoder.{e}.self_attn.w_v"),
        *linear("vit.encoder.layer.{e}.attention.output.dense", "encoder.{e}.self_attn.w_o"),
        *norm("vit.encoder.layer.{e}.layernorm_before", "encoder.{e}.norm1"),
        *linear("vit.encoder.layer.{e}.intermediate.dense", "encoder.{e}.ffn.w_1"),
        *linear("vit.encoder.layer.{e}.output.dense", "encoder.{e}.ffn.w_2"),
        *norm("vit.encoder.layer.{e}.layernorm_after", "encoder.{e}.norm2"),
        *norm("vit.layernorm", "layernorm.norm"),
        *linear("classifier", "classifier.proj"),
    ),
    variables={
        "channels": ("num_channels", 3),
        "image_size": ("image_size", 224),
        "patch": ("patch_size", 16),
        "d_model": ("hidden_size", 768),
        "heads": ("num_attention_heads", 12),
        "d_ff": ("intermediate_size", 3072),
        "layers": ("num_hidden_layers", 12),
        "labels": _labels,
        "dropout": ("hidden_dropout_prob", 0.0),
        "eps": ("layer_norm_eps", 1e-12),
    },
    fixed={"hidden_act": ("gelu",), "qkv_bias": (True,), "image_size % patch_size": (0,)},
    options={"image_size % patch_size": _leftover},
    written=_written,
    architectures=("ViTForImageClassification",),
    task="image-classification",
    tokenizer=None,
    sizes="ViT-B/16 at 224 (86.6M with 1000 classes), ViT-L/16 (304M), ViT-B/32, at 224 or 384",
)
