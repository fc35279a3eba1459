"""How a Hugging Face checkpoint's tensors map onto a shipped spec's parameters: one table per model family.

A rule maps one Hugging Face tensor, named by a pattern whose `{i}` (a decoder-only model's layer), `{e}` (an
encoder layer) or `{d}` (a decoder layer) stands for a layer number, onto one or more tensors of the family's
spec (`specs/NAME.yaml`), through a transform:

- `copy`: the same tensor;
- `transpose`: GPT-2's Conv1D keeps a Linear weight as [in, out];
- `row`: a [1, n] row kept as [n] (Marian's and BART's final_logits_bias);
- `qkv`: GPT-2's fused `c_attn`, [d, 3d] (transposed), or its bias [3d]: W_Q, W_K, W_V one after the other;
- `qkv_heads`: GPT-NeoX's fused `query_key_value` [heads·3·head_dim, d] (or its bias): q, k, v interleaved per head;
- `computed`: a table the spec computes itself (Marian's sinusoidal positions): not copied, held against ours;
- `tied`: the same tensor as another Hugging Face tensor (an output layer tied to the embedding): not copied,
  required to be equal to it, as the spec ties the two.

`convert` maps every tensor of a checkpoint through exactly one rule and fills no tensor of the spec twice, or
says which are left over; the caller holds the result against the built spec's own tensors (none missing). The
conformance tests hold each table against the reference models; an importer of checkpoints reads the same tables.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, cast

import torch

from blockgraph.common.errors import CheckpointError, Problem

Transform = Literal["copy", "transpose", "row", "qkv", "qkv_heads", "computed", "tied"]


@dataclass(frozen=True)
class Rule:
    hf: str  # the Hugging Face tensor's name, with {i} / {e} / {d} for layer numbers
    ours: tuple[str, ...]  # the spec's tensor(s) it becomes
    transform: Transform = "copy"
    source: str = ""  # for `tied`: the Hugging Face tensor it is the same as

    def pattern(self) -> re.Pattern[str]:
        return re.compile(re.sub(r"\\\{([ied])\\\}", r"(?P<\1>\\d+)", re.escape(self.hf)) + "$")


@dataclass(frozen=True)
class Family:
    """A model family: its Hugging Face model type, the shipped spec it maps onto, and the table."""

    model_type: str
    spec: str
    rules: tuple[Rule, ...]


def _rules(*rows: tuple[str, str | tuple[str, ...]] | tuple[str, str | tuple[str, ...], str]) -> tuple[Rule, ...]:
    out = []
    for row in rows:
        hf, ours, *rest = row
        transform = rest[0] if rest else "copy"
        source = ""
        if transform.startswith("tied:"):
            transform, source = "tied", transform.removeprefix("tied:")
        out.append(Rule(hf, (ours,) if isinstance(ours, str) else ours, cast(Transform, transform), source))
    return tuple(out)


def _norm(hf: str, ours: str) -> tuple[tuple[str, str], tuple[str, str]]:
    """A LayerNorm's gain and shift."""
    return (f"{hf}.weight", f"{ours}.weight"), (f"{hf}.bias", f"{ours}.bias")


def _linear(hf: str, ours: str, transform: str = "copy") -> tuple[tuple[str, str, str], tuple[str, str]]:
    """A Linear's weight (transformed) and bias."""
    return (f"{hf}.weight", f"{ours}.weight", transform), (f"{hf}.bias", f"{ours}.bias")


def _qkv(hf: str, ours: str, transform: str) -> tuple[tuple[str, tuple[str, ...], str], ...]:
    return tuple(
        (f"{hf}.{kind}", tuple(f"{ours}.w_{p}.{kind}" for p in "qkv"), transform) for kind in ("weight", "bias")
    )


GPT2 = Family(
    "gpt2",
    "gpt2.yaml",
    _rules(
        ("transformer.wte.weight", "wte.lut.weight"),
        ("transformer.wpe.weight", "wpe.pe.weight"),
        *_norm("transformer.h.{i}.ln_1", "h.{i}.ln_1.norm"),
        *_qkv("transformer.h.{i}.attn.c_attn", "h.{i}.attn", "qkv"),
        *_linear("transformer.h.{i}.attn.c_proj", "h.{i}.attn.w_o", "transpose"),
        *_norm("transformer.h.{i}.ln_2", "h.{i}.ln_2.norm"),
        *_linear("transformer.h.{i}.mlp.c_fc", "h.{i}.mlp.w_1", "transpose"),
        *_linear("transformer.h.{i}.mlp.c_proj", "h.{i}.mlp.w_2", "transpose"),
        *_norm("transformer.ln_f", "ln_f.norm"),
        ("lm_head.weight", (), "tied:transformer.wte.weight"),
    ),
)

BERT = Family(
    "bert",
    "bert.yaml",
    _rules(
        ("embeddings.word_embeddings.weight", "word_embeddings.lut.weight"),
        ("embeddings.position_embeddings.weight", "position_embeddings.pe.weight"),
        ("embeddings.token_type_embeddings.weight", "token_type_embeddings.lut.weight"),
        *_norm("embeddings.LayerNorm", "embeddings_norm.norm"),
        *_linear("encoder.layer.{e}.attention.self.query", "encoder.{e}.self_attn.w_q"),
        *_linear("encoder.layer.{e}.attention.self.key", "encoder.{e}.self_attn.w_k"),
        *_linear("encoder.layer.{e}.attention.self.value", "encoder.{e}.self_attn.w_v"),
        *_linear("encoder.layer.{e}.attention.output.dense", "encoder.{e}.self_attn.w_o"),
        *_norm("encoder.layer.{e}.attention.output.LayerNorm", "encoder.{e}.norm1"),
        *_linear("encoder.layer.{e}.intermediate.dense", "encoder.{e}.ffn.w_1"),
        *_linear("encoder.layer.{e}.output.dense", "encoder.{e}.ffn.w_2"),
        *_norm("encoder.layer.{e}.output.LayerNorm", "encoder.{e}.norm2"),
        *_linear("pooler.dense", "pooler.proj"),
    ),
)


def _llama_rules() -> tuple[Rule, ...]:
    layer, ours = "model.layers.{i}", "layers.{i}"
    return _rules(
        ("model.embed_tokens.weight", "embed_tokens.lut.weight"),
        *((f"{layer}.self_attn.{p}_proj.weight", f"{ours}.self_attn.w_{p}.weight") for p in "qkvo"),
        (f"{layer}.input_layernorm.weight", f"{ours}.input_layernorm.weight"),
        (f"{layer}.post_attention_layernorm.weight", f"{ours}.post_attention_layernorm.weight"),
        (f"{layer}.mlp.gate_proj.weight", f"{ours}.mlp.w_1.weight"),
        (f"{layer}.mlp.up_proj.weight", f"{ours}.mlp.w_3.weight"),
        (f"{layer}.mlp.down_proj.weight", f"{ours}.mlp.w_2.weight"),
        ("model.norm.weight", "norm.weight"),
        ("lm_head.weight", "lm_head.proj.weight"),
    )


LLAMA = Family("llama", "llama.yaml", _llama_rules())
MISTRAL = Family("mistral", "mistral.yaml", _llama_rules())

GPT_NEOX = Family(
    "gpt_neox",
    "gpt_neox.yaml",
    _rules(
        ("gpt_neox.embed_in.weight", "embed_in.lut.weight"),
        *_norm("gpt_neox.layers.{i}.input_layernorm", "layers.{i}.input_layernorm.norm"),
        *_norm("gpt_neox.layers.{i}.post_attention_layernorm", "layers.{i}.post_attention_layernorm.norm"),
        *_qkv("gpt_neox.layers.{i}.attention.query_key_value", "layers.{i}.attention", "qkv_heads"),
        *_linear("gpt_neox.layers.{i}.attention.dense", "layers.{i}.attention.w_o"),
        *_linear("gpt_neox.layers.{i}.mlp.dense_h_to_4h", "layers.{i}.mlp.w_1"),
        *_linear("gpt_neox.layers.{i}.mlp.dense_4h_to_h", "layers.{i}.mlp.w_2"),
        *_norm("gpt_neox.final_layer_norm", "final_layer_norm.norm"),
        ("lm_head.weight", "embed_out.proj.weight"),
        ("embed_out.weight", "embed_out.proj.weight"),  # the same, as checkpoints on disk name it
    ),
)


def _attention(hf: str, ours: str) -> tuple[tuple[str, ...], ...]:
    """A BART-style attention's q/k/v/out projections."""
    names = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}
    return tuple(row for p, proj in names.items() for row in _linear(f"{hf}.{proj}", f"{ours}.w_{p}"))


def _bart_layers(stack: str) -> tuple[tuple[str, ...], ...]:
    """The encoder (`{e}`) or decoder (`{d}`) layers of BART and Marian onto encoder_layer / decoder_layer."""
    i = "{e}" if stack == "encoder" else "{d}"
    hf, ours = f"model.{stack}.layers.{i}", f"{stack}.{i}"
    rows = [*_attention(f"{hf}.self_attn", f"{ours}.self_attn"), *_norm(f"{hf}.self_attn_layer_norm", f"{ours}.norm1")]
    if stack == "decoder":
        rows += [*_attention(f"{hf}.encoder_attn", f"{ours}.cross_attn")]
        rows += [*_norm(f"{hf}.encoder_attn_layer_norm", f"{ours}.norm2")]
    rows += [*_linear(f"{hf}.fc1", f"{ours}.ffn.w_1"), *_linear(f"{hf}.fc2", f"{ours}.ffn.w_2")]
    rows += [*_norm(f"{hf}.final_layer_norm", f"{ours}.norm2" if stack == "encoder" else f"{ours}.norm3")]
    return tuple(rows)


def _shared_embeddings() -> tuple[tuple[str, ...], ...]:
    """One embedding for both sides and the output layer, with its fixed output bias."""
    return (
        ("model.shared.weight", "src_embed.lut.weight"),
        ("model.encoder.embed_tokens.weight", (), "tied:model.shared.weight"),
        ("model.decoder.embed_tokens.weight", (), "tied:model.shared.weight"),
        ("lm_head.weight", (), "tied:model.shared.weight"),
        ("final_logits_bias", "lm_head.bias", "row"),
    )


MARIAN = Family(
    "marian",
    "marian_zh_en.yaml",
    _rules(
        *_shared_embeddings(),
        ("model.encoder.embed_positions.weight", "src_position.pe", "computed"),
        ("model.decoder.embed_positions.weight", "tgt_position.pe", "computed"),
        *_bart_layers("encoder"),
        *_bart_layers("decoder"),
    ),
)

BART = Family(
    "bart",
    "bart.yaml",
    _rules(
        *_shared_embeddings(),
        ("model.encoder.embed_positions.weight", "src_position.pe.weight"),
        ("model.decoder.embed_positions.weight", "tgt_position.pe.weight"),
        *_norm("model.encoder.layernorm_embedding", "src_norm.norm"),
        *_norm("model.decoder.layernorm_embedding", "tgt_norm.norm"),
        *_bart_layers("encoder"),
        *_bart_layers("decoder"),
    ),
)


def _t5_stack(stack: str) -> tuple[tuple[str, ...], ...]:
    """T5's encoder (`{e}`) or decoder (`{d}`) blocks onto the spec's encoder_block / decoder_block."""
    i = "{e}" if stack == "encoder" else "{d}"
    hf, ours = f"{stack}.block.{i}.layer", f"{stack}.{i}"
    attention = ((f"{hf}.0.SelfAttention.{p}.weight", f"{ours}.self_attention.w_{p}.weight") for p in "qkvo")
    rows = [
        (f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
         f"{stack}_bias.relative_attention_bias.weight"),
        *attention,
        (f"{hf}.0.layer_norm.weight", f"{ours}.attention_norm.weight"),
        (f"{stack}.final_layer_norm.weight", f"{stack}_norm.weight"),
    ]  # fmt: skip
    ffn = 1
    if stack == "decoder":
        rows += [(f"{hf}.1.EncDecAttention.{p}.weight", f"{ours}.cross_attention.w_{p}.weight") for p in "qkvo"]
        rows += [(f"{hf}.1.layer_norm.weight", f"{ours}.cross_norm.weight")]
        ffn = 2
    return (
        *rows,
        (f"{hf}.{ffn}.DenseReluDense.wi.weight", f"{ours}.ffn.w_1.weight"),
        (f"{hf}.{ffn}.DenseReluDense.wo.weight", f"{ours}.ffn.w_2.weight"),
        (f"{hf}.{ffn}.layer_norm.weight", f"{ours}.ffn_norm.weight"),
    )


T5 = Family(
    "t5",
    "t5.yaml",
    _rules(
        ("shared.weight", "shared.lut.weight"),
        ("encoder.embed_tokens.weight", (), "tied:shared.weight"),
        ("decoder.embed_tokens.weight", (), "tied:shared.weight"),
        ("lm_head.weight", (), "tied:shared.weight"),
        *_t5_stack("encoder"),
        *_t5_stack("decoder"),
    ),
)

FAMILIES: dict[str, Family] = {
    family.model_type: family for family in (GPT2, BERT, LLAMA, MISTRAL, GPT_NEOX, MARIAN, BART, T5)
}


def plan(family: Family, names: Iterable[str]) -> dict[str, tuple[Rule, dict[str, str]]]:
    """Each checkpoint tensor's rule and layer numbers, from the names alone (nothing is read): a name no rule
    matches, and two names that would fill the same tensor of the spec, are refused, all of them at once."""
    patterns = [(rule, rule.pattern()) for rule in family.rules]
    found: dict[str, tuple[Rule, dict[str, str]]] = {}
    filled: set[str] = set()
    leftover, twice = [], []
    for name in names:
        match = next(((rule, m) for rule, p in patterns if (m := p.match(name))), None)
        if match is None:
            leftover.append(name)
            continue
        rule, groups = match[0], match[1].groupdict()
        found[name] = (rule, groups)
        if rule.transform not in ("tied", "computed"):
            targets = [target.format(**groups) for target in rule.ours]
            twice += [target for target in targets if target in filled]
            filled.update(targets)
    problems = []
    if leftover:
        problems.append(Problem(f"{len(leftover)} tensor(s) of the checkpoint map to nothing: {names_text(leftover)}"))
    if twice:
        problems.append(Problem(f"{names_text(twice)} would be filled by more than one checkpoint tensor"))
    if problems:
        raise CheckpointError(problems)
    return found


def convert(
    family: Family, tensors: Mapping[str, torch.Tensor], heads: int | None = None
) -> tuple[dict[str, torch.Tensor], list[tuple[str, str]]]:
    """The spec's tensors from a checkpoint's, and the (checkpoint, spec) names of the `computed` ones to check.

    The names are `plan`ned first, so that a mapping that reads its tensors when asked (an import) reads none of
    a checkpoint it refuses; then a `tied` tensor that differs from its source is refused by name. `qkv_heads`
    needs `heads`.
    """
    if heads is None and any(rule.transform == "qkv_heads" for rule in family.rules):
        raise CheckpointError([Problem(f"the {family.model_type} table splits fused q/k/v per head: give `heads`")])
    ours: dict[str, torch.Tensor] = {}
    computed: list[tuple[str, str]] = []
    untied, misshapen = [], []
    for name, (rule, groups) in plan(family, tensors).items():
        targets = [target.format(**groups) for target in rule.ours]
        if rule.transform == "tied":
            source = rule.source.format(**groups)
            if source not in tensors or not torch.equal(tensors[source], tensors[name]):
                untied.append(name)
            continue
        if rule.transform == "computed":
            computed += [(name, target) for target in targets]
            continue
        tensor = tensors[name]
        try:
            values = _transform(rule.transform, tensor, heads or 0)
        except (RuntimeError, ValueError):
            misshapen.append(f"{name} {tuple(tensor.shape)}")
            continue
        ours.update(zip(targets, values, strict=True))
    problems = []
    if untied:
        problems.append(
            Problem(
                f"{names_text(untied)} differ(s) from the tensor the {family.model_type} spec ties it to",
                hint="the checkpoint does not tie its output layer to its embedding; the spec does",
            )
        )
    if misshapen:
        problems.append(Problem(f"{names_text(misshapen)}: not a shape the {family.model_type} table can take apart"))
    if problems:
        raise CheckpointError(problems)
    return ours, computed


def _transform(kind: Transform, tensor: torch.Tensor, heads: int) -> tuple[torch.Tensor, ...]:
    """The tensor(s) of the spec that a copied rule's checkpoint tensor becomes."""
    if kind == "transpose":
        if tensor.dim() != 2:
            raise ValueError("not a matrix")
        return (tensor.t().contiguous(),)
    if kind == "row":
        return (tensor.reshape(-1),)
    if kind == "qkv":  # [d, 3d] (Conv1D) → three [d, d]; a bias [3d] → three [d]
        if tensor.dim() not in (1, 2) or tensor.shape[-1] % 3:
            raise ValueError("not three equal parts")
        parts = tensor.t().chunk(3, dim=0) if tensor.dim() == 2 else tensor.chunk(3)
        return tuple(part.contiguous() for part in parts)
    if kind == "qkv_heads":  # [heads·3·head_dim, …]: per head, its q, k, v rows one after the other
        grouped = tensor.reshape(heads, 3, -1, *tensor.shape[1:])
        return tuple(grouped[:, j].reshape(-1, *tensor.shape[1:]).contiguous() for j in range(3))
    return (tensor,)  # copy


def names_text(names: list[str], limit: int = 6) -> str:
    """The first `limit` names, and how many more: a message names what is wrong, however much is."""
    return ", ".join(names[:limit]) + (f", … ({len(names) - limit} more)" if len(names) > limit else "")
