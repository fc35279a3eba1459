"""What each spec input and output means to the trainer, found by convention or given with `--input-roles`.

An encoder–decoder spec has two int64 inputs, the source and the (shifted-right) target, and optionally a
bool padding mask for each (True = padding). A language model has one int64 input (the tokens) and an
optional mask. By convention:

- source: the int input named `src` or `source`; target: `tgt` or `target`; with two int inputs and other
  names, the first declared is the source. A language model's single int input is its target; beside one
  required float input (audio features), that input is the source, which decoding an imported model reads.
- masks: a bool input whose name starts with the source's (`src_pad`, `src_mask`) or the target's name, or,
  failing that, has exactly the source's or the target's shape (same dimension names).
- output: the single output, or in a mapping the one named `log_probs`, `logits` or `output`, or the one
  that a `generator` block produces.
- a classifier: a spec with one int input whose output has shape [batch, classes] (two dimensions, the first
  the token input's first) trains on labelled text; its text vocabulary sizes `vocab`, and the number of
  labels sets the variable `classes` (or `num_classes`, `n_classes`, `labels`).
- vocabulary sizes: the variables `src_vocab`/`source_vocab` and `tgt_vocab`/`target_vocab`, or one `vocab`
  (a vocabulary shared by both sides, and a language model's).

`--input-roles src=a,tgt=b,src_pad=c,tgt_pad=d,output=e` names them explicitly (a language model:
`tokens=a,pad=b`).

The spec declares what no convention can tell: `roles: {loss: {aux: 0.01}}` adds its output `aux`, a scalar
(a router's load-balancing loss, an auxiliary head's), to the training loss times 0.01.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
from pydantic import ConfigDict

from blockgraph.builder.graph import Endpoint, Graph
from blockgraph.common.errors import Location, Problem, SpecError, UsageError

OutputMode = Literal["log_softmax", "logits", "softmax", "unknown"]  # unknown: log_softmax applied
ROLE_NAMES = ("src", "tgt", "src_pad", "tgt_pad", "output")
ALIASES = {"source": "src", "target": "tgt", "tokens": "tgt", "pad": "tgt_pad", "out": "output"}
SRC_VOCAB_VARS = ("src_vocab", "source_vocab")
TGT_VOCAB_VARS = ("tgt_vocab", "target_vocab")
SHARED_VOCAB_VARS = ("vocab",)
CLASS_VARS = ("classes", "num_classes", "n_classes", "labels")


@dataclass(frozen=True)
class Roles:
    """Input names for each role (None when the spec has no such input) and the output to train."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # read back from checkpoints: no unknown keys

    kind: Literal["seq2seq", "lm", "classify"]
    tgt: str
    src: str | None = None
    src_pad: str | None = None
    tgt_pad: str | None = None
    output: str | None = None  # key in the output mapping; None for a single output
    output_mode: OutputMode = "log_softmax"
    loss: dict[str, float] = field(default_factory=dict, hash=False)  # output → weight, added to the training loss

    def to_json(self) -> dict[str, Any]:
        fields = ("kind", "src", "tgt", "src_pad", "tgt_pad", "output", "output_mode")
        return {**{k: getattr(self, k) for k in fields}, "loss": dict(self.loss)}


def parse_roles(text: str | None) -> dict[str, str]:
    """`src=a,tgt=b` → {"src": "a", "tgt": "b"} (aliases resolved)."""
    roles: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        role, sep, name = (s.strip() for s in item.partition("="))
        role = ALIASES.get(role, role)
        if not sep or role not in ROLE_NAMES or not name:
            raise UsageError(
                Problem(
                    f"--input-roles: cannot use {item!r}",
                    hint=f"ROLE=INPUT with ROLE one of {', '.join(ROLE_NAMES)} (or tokens, pad for a language model)",
                )
            )
        roles[role] = name
    return roles


def find_roles(
    graph: Graph, given: dict[str, str] | None = None, types: dict | None = None, *, features: bool = False
) -> Roles:
    """The roles of the spec's inputs and output; `types` (a TypedGraph's) lets a classifier be recognised.

    A spec with one int input and one required float input reads features (Whisper's log-mel spectrogram) into
    text: the float input is its source, which only decoding an imported model takes (`features`); training and
    translating text read token ids, and refuse it by name."""
    given = dict(given or {})
    where = graph.locate(("inputs",))
    inputs = graph.inputs
    for role, name in given.items():
        if role != "output" and name not in inputs:
            raise UsageError(
                Problem(
                    f"--input-roles {role}={name}: the spec has no input {name!r}",
                    where,
                    hint=f"inputs: {', '.join(inputs)}",
                )
            )
    ints = [n for n, s in inputs.items() if not s.torch_dtype.is_floating_point and s.torch_dtype != torch.bool]
    bools = [n for n, s in inputs.items() if s.torch_dtype == torch.bool]
    floats = [n for n, s in inputs.items() if s.torch_dtype.is_floating_point and not s.optional]
    src, tgt = given.get("src"), given.get("tgt")
    if src is None and tgt is None:
        src = next((n for n in ints if n in ("src", "source")), None)
        tgt = next((n for n in ints if n in ("tgt", "target")), None)
        if len(ints) == 1:
            src, tgt = (floats[0] if len(floats) == 1 else None), ints[0]
        elif len(ints) == 2 and (src is None or tgt is None):
            src, tgt = ints
    elif tgt is None:
        tgt = next((n for n in ints if n != src), None) if len(ints) == 2 else None
    elif src is None and len(ints) == 2:
        src = next(n for n in ints if n != tgt)
    if tgt is None:
        raise SpecError(
            Problem(
                f"cannot tell which inputs are the source and the target (integer inputs: {', '.join(ints) or 'none'})",
                where,
                hint="an encoder–decoder spec has two int64 inputs; name them with --input-roles src=NAME,tgt=NAME",
            )
        )
    if src in floats and not features:
        raise SpecError(
            Problem(
                f"the source input {src!r} holds {inputs[src].dtype} features, not token ids: training and translating "
                "text read token ids",
                where,
                hint="an imported speech model (Whisper) decodes its features into text: blockgraph translate MODEL "
                "--features FILE.npy",
            )
        )
    for role, chosen in (("src", src), ("tgt", tgt)):
        if chosen is not None and chosen not in ints and not (role == "src" and chosen in floats):
            raise SpecError(Problem(f"the {role} input {chosen!r} is not an integer input", where))
    masks: dict[str, str | None] = {}
    for role, owner in (("src_pad", src), ("tgt_pad", tgt)):
        if role in given:
            masks[role] = given[role]
        elif owner is not None:
            masks[role] = _find_mask(owner, bools, inputs, (src, tgt))
    for role, chosen in masks.items():
        if chosen is not None and chosen not in bools:
            raise SpecError(Problem(f"the {role} input {chosen!r} is not a bool mask", where))
    used = {src, tgt, *masks.values()}
    missing = [n for n, s in inputs.items() if not s.optional and n not in used]
    if missing:
        raise SpecError(
            Problem(
                f"required input(s) {', '.join(missing)} have no role in training",
                where,
                hint="the trainer feeds source, target and padding masks; map them with --input-roles",
            )
        )
    output, mode = _find_output(graph, given.get("output"))
    loss = _declared_losses(graph, output, types)
    kind: Literal["seq2seq", "lm", "classify"] = "seq2seq" if src is not None else "lm"
    if src is None and types is not None:
        out_type = types.get(graph.outputs[output or next(iter(graph.outputs))])
        tokens_type = types.get(Endpoint(tgt))
        if out_type is not None and tokens_type is not None and len(out_type.shape) == 2:
            kind = "classify" if str(out_type.shape[0]) == str(tokens_type.shape[0]) else kind
    return Roles(
        kind=kind,
        src=src,
        tgt=tgt,
        src_pad=masks.get("src_pad"),
        tgt_pad=masks.get("tgt_pad"),
        output=output,
        output_mode=mode,
        loss=loss,
    )


def _find_mask(owner: str, bools: list[str], inputs: dict, tokens: tuple[str | None, str | None]) -> str | None:
    by_name = [b for b in bools if b.startswith(owner)]
    if len(by_name) == 1:
        return by_name[0]
    shape = list(inputs[owner].shape)
    others = [list(inputs[t].shape) for t in tokens if t is not None and t != owner]
    by_shape = [b for b in bools if list(inputs[b].shape) == shape and shape not in others]
    return by_shape[0] if len(by_shape) == 1 else None


def _find_output(graph: Graph, given: str | None) -> tuple[str | None, OutputMode]:
    outputs = graph.outputs
    name: str | None
    where = graph.locate(("outputs",))
    if given is not None:
        if graph.single_output or given not in outputs:
            names = "a single output" if graph.single_output else ", ".join(outputs)
            raise UsageError(Problem(f"--input-roles output={given}: the spec's outputs are {names}", where))
        name = given
    elif graph.single_output:
        name = next(iter(outputs))
    else:
        name = next((n for n in ("log_probs", "logits", "output") if n in outputs), None)
        if name is None:
            made = [
                n for n, e in outputs.items() if e.node in graph.nodes and graph.nodes[e.node].entry.name == "generator"
            ]
            name = made[0] if len(made) == 1 else None
        if name is None:
            raise SpecError(
                Problem(
                    f"cannot tell which output holds the token scores (outputs: {', '.join(outputs)})",
                    where,
                    hint="name it with --input-roles output=NAME",
                )
            )
    endpoint = outputs[name]
    node = graph.nodes.get(endpoint.node)
    mode: OutputMode = "unknown"
    if node is not None and node.entry.name == "generator":  # its `output` param: one of the modes
        mode = cast(OutputMode, str(getattr(node.params, "output", "log_softmax")))
    return (None if graph.single_output else name), mode


def _declared_losses(graph: Graph, trained: str | None, types: dict | None) -> dict[str, float]:
    """The spec's `roles: loss:` outputs and weights, each a model output other than the trained one, and (with
    `types`) a floating-point scalar: the loss adds it as it is, so a tensor of any other shape is a mistake."""
    declared = graph.roles.loss
    problems = []
    for name in declared:
        where = graph.locate(("roles", "loss", name))
        endpoint = None if graph.single_output else graph.outputs.get(name)
        if endpoint is None:
            names = "a single output" if graph.single_output else ", ".join(graph.outputs)
            problems.append(
                Problem(f"roles: loss: {name!r} is no output of the model (its outputs: {names})", where,
                        hint="declare the loss term under outputs:, by name")
            )  # fmt: skip
            continue
        if name == trained:
            problems.append(Problem(f"roles: loss: {name!r} is the output the model trains on", where))
            continue
        found = types.get(endpoint) if types is not None else None
        if found is not None and (
            not found.dtype.is_floating_point or [str(d) for d in found.shape] not in ([], ["1"])
        ):
            problems.append(
                Problem(
                    f"roles: loss: {name!r} is {found.described()}: a loss term is a float scalar (shape [] or [1])",
                    where,
                    hint="reduce it to one number in the spec, e.g. mean_pool and select",
                )
            )
    if problems:
        raise SpecError(problems)
    return dict(declared)


@dataclass(frozen=True)
class Sizes:
    """Sizes read off the built graph: embedding rows of each side, the output vocabulary, the model width."""

    src_vocab: int | None
    tgt_vocab: int | None
    out_vocab: int | None
    d_model: int | None


def sizes(graph: Graph, roles: Roles) -> Sizes:
    def embedding(name: str | None) -> tuple[int | None, int | None]:
        if name is None:
            return None, None
        for inst in graph.nodes.values():
            if inst.bindings.get("tokens") == Endpoint(name) and hasattr(inst.params, "vocab"):
                return int(inst.params.vocab), int(getattr(inst.params, "dim", 0)) or None
        return None, None

    src_rows, _ = embedding(roles.src)
    tgt_rows, tgt_dim = embedding(roles.tgt)
    key = roles.output or next(iter(graph.outputs))
    out_node = graph.nodes.get(graph.outputs[key].node)
    out_vocab = int(out_node.params.vocab) if out_node is not None and hasattr(out_node.params, "vocab") else None
    variables = graph.vars
    d_model = variables.get("d_model")
    if not isinstance(d_model, int) or isinstance(d_model, bool):
        d_model = tgt_dim
    return Sizes(src_rows, tgt_rows, out_vocab, d_model)


def vocab_variables(variables: dict[str, Any], roles: Roles) -> dict[str, str]:
    """Role (src, tgt, shared) → the spec variable that sizes its vocabulary."""
    found = {}
    if roles.kind == "seq2seq":
        src = next((v for v in SRC_VOCAB_VARS if v in variables), None)
        tgt = next((v for v in TGT_VOCAB_VARS if v in variables), None)
        if src:
            found["src"] = src
        if tgt:
            found["tgt"] = tgt
        if (src is None or tgt is None) and "vocab" in variables:
            found = {"shared": "vocab"}
    elif "vocab" in variables:
        found["shared"] = "vocab"
    else:
        tgt = next((v for v in TGT_VOCAB_VARS if v in variables), None)
        if tgt:
            found["tgt"] = tgt
    return found


def check_sizes(found: Sizes, src_size: int | None, tgt_size: int, where: Location) -> list[Problem]:
    """Problems where the spec's embeddings or output are too small for the vocabularies built from the data."""
    problems = []
    hint = "give the spec a src_vocab/tgt_vocab (or vocab) variable, or --set the variable that sizes it"
    for what, have, need in (
        ("source embedding", found.src_vocab, src_size),
        ("target embedding", found.tgt_vocab, tgt_size),
        ("output layer", found.out_vocab, tgt_size),
    ):
        if have is not None and need is not None and have < need:
            problems.append(
                Problem(f"the spec's {what} has {have} rows, the data's vocabulary {need} tokens", where, hint)
            )
    return problems


def class_variable(variables: dict[str, Any]) -> str | None:
    """The spec variable that sets a classifier's number of classes."""
    return next((v for v in CLASS_VARS if v in variables), None)


@dataclass(frozen=True)
class Outputs:
    """What one call of the model gives training: the log-probabilities, and each declared loss output (float32
    scalars, by name)."""

    log_probs: torch.Tensor
    losses: dict[str, torch.Tensor]


class ModelIO:
    """Calls a built model with a batch by role and returns log-probabilities [batch, tgt_len, vocab].

    (A classifier's: [batch, classes].) `outputs` also returns the spec's declared loss outputs.
    """

    def __init__(self, roles: Roles):
        self.roles = roles

    def __call__(
        self,
        model: torch.nn.Module,
        tgt: torch.Tensor,
        src: torch.Tensor | None = None,
        src_pad: torch.Tensor | None = None,
        tgt_pad: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.outputs(model, tgt, src, src_pad, tgt_pad).log_probs

    def outputs(
        self,
        model: torch.nn.Module,
        tgt: torch.Tensor,
        src: torch.Tensor | None = None,
        src_pad: torch.Tensor | None = None,
        tgt_pad: torch.Tensor | None = None,
    ) -> Outputs:
        """The log-probabilities and the declared loss outputs of one call."""
        r = self.roles
        kwargs: dict[str, torch.Tensor | None] = {r.tgt: tgt}
        if r.src is not None:
            kwargs[r.src] = src
        if r.src_pad is not None and src_pad is not None:
            kwargs[r.src_pad] = src_pad
        if r.tgt_pad is not None and tgt_pad is not None:
            kwargs[r.tgt_pad] = tgt_pad
        out = model(**kwargs)
        losses = {name: out[name].float().reshape(()) for name in r.loss}
        return Outputs(self.log_probs(out[r.output] if r.output is not None else out), losses)

    def log_probs(self, out: torch.Tensor) -> torch.Tensor:
        """The model's output read as log-probabilities (float32), whatever its generator returns."""
        out = out.float()
        if self.roles.output_mode == "log_softmax":
            return out
        if self.roles.output_mode == "softmax":
            return out.clamp_min(1e-30).log()
        return torch.log_softmax(out, dim=-1)
