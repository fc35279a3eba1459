"""GPT-2 (`GPT2LMHeadModel`): specs/gpt2.yaml, its Conv1D weights transposed and its fused q/k/v split."""

from __future__ import annotations

import re

from blockgraph.builder.hf_mappings import Derived, Family, linear, norm, qkv, table


def _today(name: str) -> str | None:
    """Older checkpoints saved the causal masks and named the body without `transformer.`."""
    if re.search(r"\.attn\.(masked_)?bias$", name):
        return None
    return name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"


FAMILY = Family(
    "gpt2",
    "gpt2.yaml",
    table(
        ("transformer.wte.weight", "wte.lut.weight"),
        ("transformer.wpe.weight", "wpe.pe.weight"),
        *norm("transformer.h.{i}.ln_1", "h.{i}.ln_1.norm"),
        *qkv("transformer.h.{i}.attn.c_attn", "h.{i}.attn", "qkv"),
        *linear("transformer.h.{i}.attn.c_proj", "h.{i}.attn.w_o", "transpose"),
        *norm("transformer.h.{i}.ln_2", "h.{i}.ln_2.norm"),
        *linear("transformer.h.{i}.mlp.c_fc", "h.{i}.mlp.w_1", "transpose"),
        *linear("transformer.h.{i}.mlp.c_proj", "h.{i}.mlp.w_2", "transpose"),
        *norm("transformer.ln_f", "ln_f.norm"),
        ("lm_head.weight", (), "tied:transformer.wte.weight"),
    ),
    variables={
        "vocab": ("vocab_size", 50257),
        "max_len": ("n_positions", 1024),
        "d_model": ("n_embd", 768),
        "heads": ("n_head", 12),
        "layers": ("n_layer", 12),
        "dropout": ("resid_pdrop", 0.1),
        "eps": ("layer_norm_epsilon", 1e-5),
    },
    fixed={
        "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
        "n_inner": (None, Derived("4 × n_embd", lambda c: 4 * int(c.get("n_embd", 768)))),
        "scale_attn_weights": (True,),
        "scale_attn_by_inverse_layer_idx": (False,),
        "add_cross_attention": (False,),
        "tie_word_embeddings": (True,),
    },
    specials={"bos": 50256, "eos": 50256, "pad": None},
    legacy=_today,
    architectures=("GPT2LMHeadModel",),
    sizes="124M (`gpt2`), 355M, 774M, 1.5B",
)
