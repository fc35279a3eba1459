"""The model families `blockgraph import` reads and `export --format hf` writes, one module each, registered by
their `model_type`: the built-in ones below, and those of plugins (`register`, from a `--plugin` file or a
package's `blockgraph.families` entry point; see builder/plugins.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from blockgraph.builder.families import (
    bart,
    bert,
    clip,
    deepseek_v3,
    gemma,
    gemma2,
    gemma3_text,
    gpt2,
    gpt_neox,
    llama,
    mamba,
    marian,
    mistral,
    mixtral,
    olmo2,
    phi3,
    qwen2,
    qwen2_moe,
    qwen3,
    qwen3_moe,
    roberta,
    t5,
    vit,
    whisper,
)
from blockgraph.builder.hf_mappings import TOKENIZERS, Family
from blockgraph.common.errors import PluginError, Problem

FAMILIES: dict[str, Family] = {}
_override = False  # whether the plugin loading now may replace a taken model_type (`loading`)


def register(family: Family, *, override: bool | None = None) -> Family:
    """Make `family` importable and exportable under its model_type: a taken one only with `override`, which
    by default is the loading plugin's `--allow-override`, as for its blocks."""
    if family.model_type in FAMILIES and not (_override if override is None else override):
        raise PluginError(
            Problem(
                f"model_type {family.model_type!r} is already taken by a registered family",
                hint="register it under another model_type, or pass --allow-override to let plugins replace families",
            )
        )
    FAMILIES[family.model_type] = family
    return family


@contextmanager
def loading(*, override: bool) -> Iterator[None]:
    """A plugin's families, registered inside: `override` as its `--allow-override`; all rolled back if it fails."""
    global _override
    saved, snapshot = _override, dict(FAMILIES)
    _override = override
    try:
        yield
    except BaseException:
        FAMILIES.clear()
        FAMILIES.update(snapshot)
        raise
    finally:
        _override = saved


for _module in (
    gpt2,
    bert,
    llama,
    mistral,
    gpt_neox,
    marian,
    bart,
    t5,
    gemma,
    gemma2,
    gemma3_text,
    qwen2,
    qwen3,
    olmo2,
    phi3,
    mixtral,
    qwen2_moe,
    qwen3_moe,
    deepseek_v3,
    roberta,
    clip,
    vit,
    whisper,
    mamba,
):
    register(_module.FAMILY)


def docs_table() -> str:
    """The families as docs/models.md and docs/pretrained.md list them (a test holds the pages to it)."""
    rows = ["| model_type | class (`architectures`) | spec | published sizes | tokenizer |", "|---|---|---|---|---|"]
    for family in FAMILIES.values():
        files = TOKENIZERS[family.tokenizer] if family.tokenizer is not None else ()
        tokenizer = ", ".join(f"`{name}`" for name in files) or "none"
        spec = family.spec if isinstance(family.spec, str) else family.spec.name
        rows.append(
            f"| `{family.model_type}` | `{family.architectures[0]}` | `specs/{spec}` | {family.sizes} | {tokenizer} |"
        )
    return "\n".join(rows) + "\n"
