"""What a model family is, and how a Hugging Face checkpoint's tensors map onto its spec's parameters and back.

A `Family` (one module per family in builder/families/, registered by its `model_type`) owns everything about
one Hugging Face model type: the spec it maps onto, how config.json reads into the spec's variables (and back),
the options it refuses, its special tokens, its weight table, its tokenizer, its class names and sizes.

A table's rule maps one Hugging Face tensor, named by a pattern whose `{i}` (a decoder-only model's layer), `{e}`
(an encoder layer) or `{d}` (a decoder layer) stands for a layer number and `{x}` for an expert's (a mixture of
experts'), onto one or more tensors of the family's spec, through a transform (each has its inverse, for `to_hf`):

- `copy`: the same tensor;
- `transpose`: GPT-2's Conv1D keeps a Linear weight as [in, out];
- `row`: a tensor of a leading 1 kept without it: [1, n] as [n] (Marian's and BART's final_logits_bias), [1, n, d]
  as [n, d] (ViT's cls_token and position_embeddings);
- `unsqueeze`: a [n, …] tensor kept as [1, n, …] (CLIP's class_embedding [dim], one token of [count, dim]);
- `qkv`: GPT-2's fused `c_attn`, [d, 3d] (transposed), or its bias [3d]: W_Q, W_K, W_V one after the other;
- `qkv_heads`: GPT-NeoX's fused `query_key_value` [heads·3·head_dim, d] (or its bias): q, k, v interleaved per head;
- `split`: Phi-3's fused `qkv_proj` [(heads + 2·kv_heads)·head_dim, d] (unequal parts under grouped-query
  attention) and `gate_up_proj` [2·d_ff, d] (gate, then up): the spec's tensors one after another along the first
  dimension, each as large as the spec's (`convert` takes their `shapes`);
- `computed`: a table the spec computes itself (Marian's sinusoidal positions): not copied, held against ours;
- `tied`: the same tensor as another Hugging Face tensor (an output layer tied to the embedding): not copied,
  required to be equal to it, as the spec ties the two (and not written back: transformers ties it again).

`convert` maps every tensor of a checkpoint through exactly one rule and fills no tensor of the spec twice, or
says which are left over; the caller holds the result against the built spec's own tensors (none missing).
`to_hf` is the way back. The conformance tests hold each table against the reference models.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch

from blockgraph.common.errors import CheckpointError, Problem

Transform = Literal["copy", "transpose", "row", "unsqueeze", "qkv", "qkv_heads", "split", "computed", "tied"]
Config = Mapping[str, Any]
Value = str | tuple[str, Any] | Callable[[Config], Any]  # a config key, a key with its default, or a rule
Task = Literal["causal-lm", "seq2seq-lm", "speech-seq2seq", "encoder", "image-classification"]
AUTO_CLASSES: dict[Task, str] = {
    "causal-lm": "AutoModelForCausalLM",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
    "speech-seq2seq": "AutoModelForSpeechSeq2Seq",  # audio features in, text out (Whisper)
    "encoder": "AutoModel",
    "image-classification": "AutoModelForImageClassification",
}
SPECS = Path(__file__).resolve().parent.parent / "specs"
TokenizerKind = Literal["tokenizer.json", "marian"]
TOKENIZERS: dict[TokenizerKind, tuple[str, ...]] = {  # each kind's files, as a Hugging Face directory holds them
    "tokenizer.json": ("tokenizer.json",),
    "marian": ("source.spm", "target.spm", "vocab.json"),
}


@dataclass(frozen=True)
class Rule:
    hf: str  # the Hugging Face tensor's name, with {i} / {e} / {d} for layer numbers, {x} for an expert's
    ours: tuple[str, ...]  # the spec's tensor(s) it becomes
    transform: Transform = "copy"
    source: str = ""  # for `tied`: the Hugging Face tensor it is the same as

    def pattern(self) -> re.Pattern[str]:
        return _layered(self.hf)


def _layered(name: str) -> re.Pattern[str]:
    """A name whose {i} / {e} / {d} match layer numbers and {x} an expert's."""
    return re.compile(re.sub(r"\\\{([iedx])\\\}", r"(?P<\1>\\d+)", re.escape(name)) + "$")


@dataclass(frozen=True)
class Derived:
    """An option's value that follows from the config's others (`head_dim`: hidden_size / num_attention_heads)."""

    text: str  # how a refusal names it
    value: Callable[[Config], Any]

    def __str__(self) -> str:
        return self.text


def same_as(key: str, default: Any) -> Derived:
    """An option that must equal another (`decoder_ffn_dim` = `encoder_ffn_dim`)."""
    return Derived(key, lambda config: config.get(key, default))


def _same_name(name: str) -> str | None:
    return name


def _nothing_more(variables: Mapping[str, Any]) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Family:
    """One Hugging Face model type: its spec, config reading (both ways), table, tokens, tokenizer, classes."""

    model_type: str
    spec: str | Path  # a shipped spec's file name in specs/, or (a plugin's) a spec file's path
    rules: tuple[Rule, ...]
    variables: Mapping[str, Value] = field(default_factory=dict)  # the spec's variables from config.json
    fixed: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)  # option → the values the spec implements
    specials: Mapping[str, int | None] = field(default_factory=dict)  # pad, bos, eos, decoder_start defaults
    defaults: Mapping[str, Any] = field(default_factory=dict)  # transformers' defaults the spec does not implement
    options: Mapping[str, Callable[[Config], Any]] = field(default_factory=dict)  # options read from elsewhere
    nested: tuple[str, ...] = ()  # the options that are mappings of options (rope_parameters)
    written: Callable[[Mapping[str, Any]], dict[str, Any]] = _nothing_more  # config.json for `options` and rules
    legacy: Callable[[str], str | None] = _same_name  # an older checkpoint's name as today's (None: dropped)
    architectures: tuple[str, ...] = ()  # config.json's `architectures`: the class that loads it
    task: Task = "causal-lm"
    tokenizer: TokenizerKind | None = "tokenizer.json"  # the files import carries and export writes; None: no text
    sizes: str = ""  # the published sizes, for docs/models.md

    @property
    def spec_path(self) -> Path:
        return SPECS / self.spec if isinstance(self.spec, str) else self.spec

    @property
    def auto_class(self) -> str:
        """The transformers Auto class that loads an exported directory (no remote code)."""
        return AUTO_CLASSES[self.task]

    @property
    def generates(self) -> bool:
        """Whether the model writes text (a generation_config.json, `translate` / `generate`): not an encoder of
        text alone, nor an image classifier."""
        return self.task not in ("encoder", "image-classification")


Row = tuple[str, str | tuple[str, ...]] | tuple[str, str | tuple[str, ...], str]  # (hf, ours[, transform])


def table(*rows: Row) -> tuple[Rule, ...]:
    """A table from rows (hf, ours) or (hf, ours, transform); the transform `tied:NAME` ties to NAME."""
    out = []
    for row in rows:
        hf, ours, *rest = row
        transform = rest[0] if rest else "copy"
        source = ""
        if transform.startswith("tied:"):
            transform, source = "tied", transform.removeprefix("tied:")
        out.append(Rule(hf, (ours,) if isinstance(ours, str) else ours, cast(Transform, transform), source))
    return tuple(out)


def norm(hf: str, ours: str) -> tuple[tuple[str, str], tuple[str, str]]:
    """A LayerNorm's gain and shift."""
    return (f"{hf}.weight", f"{ours}.weight"), (f"{hf}.bias", f"{ours}.bias")


def linear(hf: str, ours: str, transform: str = "copy") -> tuple[tuple[str, str, str], tuple[str, str]]:
    """A Linear's weight (transformed) and bias."""
    return (f"{hf}.weight", f"{ours}.weight", transform), (f"{hf}.bias", f"{ours}.bias")


def qkv(hf: str, ours: str, transform: str) -> tuple[tuple[str, tuple[str, ...], str], ...]:
    """A fused q/k/v projection's weight and bias onto the attention's w_q, w_k, w_v."""
    return tuple(
        (f"{hf}.{kind}", tuple(f"{ours}.w_{p}.{kind}" for p in "qkv"), transform) for kind in ("weight", "bias")
    )


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
    family: Family,
    tensors: Mapping[str, torch.Tensor],
    heads: int | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> tuple[dict[str, torch.Tensor], list[tuple[str, str]]]:
    """The spec's tensors from a checkpoint's, and the (checkpoint, spec) names of the `computed` ones to check.

    The names are `plan`ned first, so that a mapping that reads its tensors when asked (an import) reads none of
    a checkpoint it refuses; then a `tied` tensor that differs from its source is refused by name. `qkv_heads`
    needs `heads`; `split` the `shapes` of the spec's tensors.
    """
    if heads is None and any(rule.transform == "qkv_heads" for rule in family.rules):
        raise CheckpointError([Problem(f"the {family.model_type} table splits fused q/k/v per head: give `heads`")])
    if shapes is None and any(rule.transform == "split" for rule in family.rules):
        raise CheckpointError([Problem(f"the {family.model_type} table splits fused tensors: give the `shapes`")])
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
            sizes = [tuple(shapes[target]) for target in targets] if rule.transform == "split" and shapes else []
            values = _transform(rule.transform, tensor, heads or 0, sizes)
        except (RuntimeError, ValueError, KeyError):
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


def _transform(
    kind: Transform, tensor: torch.Tensor, heads: int, sizes: Sequence[tuple[int, ...]] = ()
) -> tuple[torch.Tensor, ...]:
    """The tensor(s) of the spec that a copied rule's checkpoint tensor becomes (`split`: of these `sizes`)."""
    if kind == "transpose":
        if tensor.dim() != 2:
            raise ValueError("not a matrix")
        return (tensor.t().contiguous(),)
    if kind == "row":  # [1, …] → […]; another leading size fails to reshape
        return (tensor.reshape(tensor.shape[1:]),)
    if kind == "unsqueeze":
        return (tensor.unsqueeze(0),)
    if kind == "qkv":  # [d, 3d] (Conv1D) → three [d, d]; a bias [3d] → three [d]
        if tensor.dim() not in (1, 2) or tensor.shape[-1] % 3:
            raise ValueError("not three equal parts")
        parts = tensor.t().chunk(3, dim=0) if tensor.dim() == 2 else tensor.chunk(3)
        return tuple(part.contiguous() for part in parts)
    if kind == "qkv_heads":  # [heads·3·head_dim, …]: per head, its q, k, v rows one after the other
        grouped = tensor.reshape(heads, 3, -1, *tensor.shape[1:])
        return tuple(grouped[:, j].reshape(-1, *tensor.shape[1:]).contiguous() for j in range(3))
    if kind == "split":  # [rows₁ + rows₂ + …, …]: the spec's tensors one after another
        if not sizes or any(size[1:] != tuple(tensor.shape[1:]) for size in sizes):
            raise ValueError("not the spec's tensors one after another")
        return tuple(piece.contiguous() for piece in tensor.split([size[0] for size in sizes]))
    return (tensor,)  # copy


def to_hf(family: Family, ours: Mapping[str, torch.Tensor], heads: int | None = None) -> dict[str, torch.Tensor]:
    """The Hugging Face tensors of the spec's `ours` (each tied tensor once), as transformers writes them: every
    tensor of ours through the first rule that names it; tied and computed ones are left to transformers."""
    found: dict[str, torch.Tensor] = {}
    placed: set[str] = set()
    for rule in family.rules:
        if rule.transform in ("tied", "computed"):
            continue
        first = _layered(rule.ours[0])
        for name in ours:
            match = first.match(name)
            if match is None or name in placed:
                continue
            groups = match.groupdict()
            targets = [target.format(**groups) for target in rule.ours]
            placed.update(targets)
            found[rule.hf.format(**groups)] = _untransform(rule.transform, [ours[t] for t in targets], heads or 0)
    left = sorted(set(ours) - placed)
    if left:
        raise CheckpointError(
            [Problem(f"the {family.model_type} table places {len(left)} tensor(s) nowhere: {names_text(left)}")]
        )
    return found


def _untransform(kind: Transform, tensors: list[torch.Tensor], heads: int) -> torch.Tensor:
    """The checkpoint tensor a rule's spec tensors came from (the inverse of `_transform`)."""
    if kind == "transpose":
        return tensors[0].t().contiguous()
    if kind == "row":
        return tensors[0].unsqueeze(0)
    if kind == "unsqueeze":
        return tensors[0].squeeze(0)
    if kind == "qkv":
        return torch.cat(tensors).t().contiguous() if tensors[0].dim() == 2 else torch.cat(tensors)
    if kind == "split":
        return torch.cat(tensors)
    if kind == "qkv_heads":
        rest = tensors[0].shape[1:]
        return torch.stack([t.reshape(heads, -1, *rest) for t in tensors], dim=1).reshape(-1, *rest).contiguous()
    return tensors[0]


def names_text(names: list[str], limit: int = 6) -> str:
    """The first `limit` names, and how many more: a message names what is wrong, however much is."""
    return ", ".join(names[:limit]) + (f", … ({len(names) - limit} more)" if len(names) > limit else "")
