"""Mamba (`MambaForCausalLM`): specs/mamba.yaml, pre-norm residual blocks around the `mamba` state-space layer,
the output layer tied to the embedding. The layer's tensors keep transformers' names, so the table copies them."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from blockgraph.builder.hf_mappings import Config, Family, Rule, table

LAYER, OURS = "backbone.layers.{i}", "layers.{i}"
MIXER = ("in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias")


def rules() -> tuple[Rule, ...]:
    return table(
        ("backbone.embeddings.weight", "embeddings.lut.weight"),
        (f"{LAYER}.norm.weight", f"{OURS}.norm.weight"),
        *((f"{LAYER}.mixer.{name}", f"{OURS}.mixer.{name}") for name in (*MIXER, "A_log", "D", "out_proj.weight")),
        ("backbone.norm_f.weight", "norm_f.weight"),
        ("lm_head.weight", (), "tied:backbone.embeddings.weight"),  # transformers leaves it out; older files not
    )


def dt_rank(config: Config) -> Any:
    """`time_step_rank`: a number, or "auto" (transformers' default), ⌈hidden_size / 16⌉."""
    rank = config.get("time_step_rank", "auto")
    return math.ceil(config.get("hidden_size", 768) / 16) if rank == "auto" else rank


def older_names(name: str) -> str | None:
    """The first converted checkpoints named the embedding `backbone.embedding` (transformers renames it too)."""
    return name.replace("backbone.embedding.", "backbone.embeddings.")


def written(variables: Mapping[str, Any]) -> dict[str, Any]:
    """`time_step_rank`, which the reading computes where a config says "auto"."""
    return {"time_step_rank": variables["dt_rank"]}


FAMILY = Family(
    "mamba",
    "mamba.yaml",
    rules(),
    variables={
        "vocab": ("vocab_size", 50280),
        "d_model": ("hidden_size", 768),
        "layers": ("num_hidden_layers", 32),
        "d_state": ("state_size", 16),
        "expand": ("expand", 2),
        "d_conv": ("conv_kernel", 4),
        "dt_rank": dt_rank,
        "eps": ("layer_norm_epsilon", 1e-5),
    },
    fixed={
        "hidden_act": ("silu",),
        "use_bias": (False,),
        "use_conv_bias": (True,),
        "tie_word_embeddings": (True,),
    },
    specials={"bos": 0, "eos": 0, "pad": 0},
    written=written,
    legacy=older_names,
    architectures=("MambaForCausalLM",),
    sizes="130M (`mamba-130m-hf`), 370M, 790M, 1.4B, 2.8B",
)
