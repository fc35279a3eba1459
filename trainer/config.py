"""The training options, declared once: the command line, the hand-off to workers and the checkpoint derive from it.

`TrainConfig` is a pydantic model. Each field says what it is (its type, default, bounds and help) and, where the
command line writes it differently, how (`Cli`: its flags, the type the command line takes and the parser that
turns it into the field's value). `trainer.commands` builds the `train` command's options from these fields,
`--nproc` hands the validated config to its workers as JSON, and checkpoints store and check it with the same
model, so an option cannot be missing from one of them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from blockgraph.common.errors import Problem, UsageError
from blockgraph.common.options import EXTERNAL_FILES_HELP, SET_HELP, parse_pairs
from blockgraph.trainer import subword, tasks

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Cli:
    """How a field is written on the command line, where that differs from `--field-name VALUE`."""

    flags: tuple[str, ...] = ()
    argument: bool = False  # a positional argument (SPEC)
    takes: Any = None  # the type the command line gives, when `parse` turns it into the field's type
    parse: Callable[[Any], Any] | None = None
    metavar: str | None = None
    panel: str = "Training"


def _parse_roles(text: str | None) -> dict[str, str]:
    """trainer.roles.parse_roles, imported when a run starts: the roles module loads torch, which `--help`
    should not wait for."""
    from blockgraph.trainer.roles import parse_roles

    return parse_roles(text)


def _resolved(path: Path | None) -> str | None:
    return None if path is None else str(path.resolve())


DATA, MODEL, RECIPE, PARALLEL = "Data", "Model and roles", "Recipe", "Processes"

#: the largest seed (of training, and of sampling): the trainer derives further seeds by arithmetic on it
#: (seed × 1,000,003 + epoch), which must stay within the 64 bits torch's generators take
MAX_SEED = 2**32 - 1


class DataOptions(BaseModel):
    """What decides the training and held-out examples and their vocabularies (trainer.corpus reads these)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    data: Annotated[
        str | None,
        Field(
            description="Training data: source<TAB>target lines (a text file for a language model, label<TAB>text "
            "lines for a classifier)."
        ),
        Cli(takes=Path | None, parse=_resolved, metavar="FILE", panel=DATA),
    ] = None
    valid_data: Annotated[
        str | None,
        Field(description="Held-out data file (default: a split of --data)."),
        Cli(flags=("--valid",), takes=Path | None, parse=_resolved, metavar="FILE", panel=DATA),
    ] = None
    task: Annotated[
        Literal["copy", "reverse"] | None,
        Field(
            description="Train on a synthetic task instead of --data: copy or reverse (a language model reads the "
            "source as a prompt and learns the target after it)."
        ),
        Cli(panel=DATA),
    ] = None
    task_options: Annotated[
        dict[str, int],
        Field(description="Synthetic task sizes: symbols=10,min_len=3,max_len=8,train=2000,valid=200."),
        Cli(takes=str | None, parse=lambda text: tasks.parse_options(text).to_json(), metavar="N=V,...", panel=DATA),
    ] = Field(default_factory=lambda: tasks.TaskOptions().to_json())
    seed: Annotated[
        int, Field(ge=0, le=MAX_SEED, description="Seed of weights, data split, batch order and dropout."), Cli()
    ] = 0
    valid_fraction: Annotated[
        float, Field(ge=0.0, le=0.9, description="Share of --data held out for evaluation."), Cli(panel=DATA)
    ] = 0.05
    max_len: Annotated[
        int, Field(ge=1, le=1_000_000, description="Leave out sentences longer than this (tokens)."), Cli(panel=DATA)
    ] = 100
    min_freq: Annotated[int, Field(ge=1, le=10**9, description="Rarer tokens become <unk>."), Cli(panel=DATA)] = 1
    max_vocab: Annotated[
        int | None, Field(ge=5, le=2**31 - 1, description="At most this many tokens per vocabulary."), Cli(panel=DATA)
    ] = None
    tokenizer: Annotated[
        str,
        Field(
            description="Tokenizer of both sides: chars (Chinese), words, space, auto (guess from the data), a "
            "SentencePiece model file (FILE.model), or MODULE:FUNCTION, a Python callable str -> list[str]."
        ),
        Cli(metavar="NAME", panel=DATA),
    ] = "auto"
    src_tokenizer: Annotated[
        str | None, Field(description="As --tokenizer, for the source side only."), Cli(metavar="NAME", panel=DATA)
    ] = None
    tgt_tokenizer: Annotated[
        str | None,
        Field(description="As --tokenizer, for the target side only (a classifier's text)."),
        Cli(metavar="NAME", panel=DATA),
    ] = None
    subword_vocab: Annotated[
        int | None,
        Field(
            ge=8,
            le=1_000_000,
            description="Learn a SentencePiece tokenizer of about N pieces per side from the training data.",
        ),
        Cli(metavar="N", panel=DATA),
    ] = None
    subword_model: Annotated[
        subword.Kind,
        Field(description="The subword algorithm of --subword-vocab: unigram or bpe."),
        Cli(panel=DATA),
    ] = "unigram"
    skip_bad_lines: Annotated[
        bool, Field(description="Leave out unreadable data lines (and count them)."), Cli(panel=DATA)
    ] = False

    @property
    def source_tokenizer(self) -> str:
        return self.src_tokenizer or self.tokenizer

    @property
    def target_tokenizer(self) -> str:
        return self.tgt_tokenizer or self.tokenizer


class TrainConfig(DataOptions):
    """Everything that determines a run; saved in each checkpoint and reused by `--resume`."""

    spec: Annotated[
        str | None,
        Field(
            description="Spec file of an encoder–decoder, a language model or a classifier, or the directory of "
            "an imported model to fine-tune (blockgraph import)."
        ),
        Cli(argument=True, takes=Path | None, parse=lambda p: None if p is None else str(p), metavar="SPEC"),
    ] = None
    overrides: Annotated[
        dict[str, Any],
        Field(description=SET_HELP),
        Cli(
            flags=("--set", "-s"),
            takes=list[str],
            parse=lambda items: parse_pairs(items, "--set", typed=True),
            metavar="NAME=VALUE",
            panel=MODEL,
        ),
    ] = Field(default_factory=dict)
    input_roles: Annotated[
        dict[str, str],
        Field(description="Which inputs are which: src=NAME,tgt=NAME,src_pad=NAME,tgt_pad=NAME,output=NAME."),
        Cli(takes=str | None, parse=_parse_roles, metavar="ROLE=NAME,...", panel=MODEL),
    ] = Field(default_factory=dict)
    allow_external_files: Annotated[
        bool,
        Field(description=EXTERNAL_FILES_HELP),
        Cli(panel=MODEL),
    ] = False
    init: Annotated[
        Literal["xavier", "spec"],
        Field(description="xavier: Xavier-uniform weight matrices; spec: the blocks' own initialisation."),
        Cli(panel=MODEL),
    ] = "xavier"
    epochs: Annotated[int, Field(ge=1, le=10**6, description="Epochs to train (in all, when resuming)."), Cli()] = 10
    max_steps: Annotated[
        int | None, Field(ge=1, le=10**12, description="Stop after this many optimizer steps in all."), Cli()
    ] = None
    batch_size: Annotated[
        int, Field(ge=1, le=1_000_000, description="Sentences per (global) batch, across all processes."), Cli()
    ] = 32
    lr: Annotated[
        float | None,
        Field(
            ge=0.0,
            le=100.0,
            description="Peak learning rate, reached after --warmup steps (default: d_model^-0.5 schedule).",
        ),
        Cli(panel=RECIPE),
    ] = None
    warmup: Annotated[
        int, Field(ge=1, le=10**9, description="Warm-up steps of the learning-rate schedule."), Cli(panel=RECIPE)
    ] = 4000
    label_smoothing: Annotated[float, Field(ge=0.0, le=0.99, description="Label smoothing ε."), Cli(panel=RECIPE)] = 0.1
    clip_norm: Annotated[
        float, Field(ge=0.0, le=1e6, description="Clip the gradient norm (0: no clipping)."), Cli(panel=RECIPE)
    ] = 0.0
    save_every: Annotated[
        int, Field(ge=0, le=10**9, description="Also checkpoint every N steps within an epoch (0: per epoch)."), Cli()
    ] = 0
    bleu_sentences: Annotated[
        int, Field(ge=0, le=10**7, description="Held-out sentences translated for BLEU each epoch (0: none)."), Cli()
    ] = 200
    tensorboard: Annotated[
        bool,
        Field(
            description="Also write the curves and the options for TensorBoard into RUN/tensorboard (needs the "
            "tensorboard package, blockgraph's extra of that name)."
        ),
        Cli(),
    ] = False
    device: Annotated[str, Field(description="cpu or cuda (each process takes cuda:LOCAL_RANK)."), Cli()] = "cpu"
    precision: Annotated[
        Literal["32", "bf16-mixed", "16-mixed"],
        Field(
            description="32: float32 throughout; bf16-mixed: forward in bfloat16 (autocast; under fsdp, bfloat16 "
            "parameters), float32 loss, weights and optimizer state; 16-mixed: the same in float16 with loss "
            "scaling (CUDA only)."
        ),
        Cli(),
    ] = "32"
    strategy: Annotated[
        Literal["ddp", "fsdp"],
        Field(
            description="ddp: every process holds the whole model (fits one process); fsdp: parameters, gradients "
            "and optimizer state sharded over the processes (FSDP2), each repeated layer a unit."
        ),
        Cli(panel=PARALLEL),
    ] = "ddp"
    checkpoint_activations: Annotated[
        bool,
        Field(description="fsdp: recompute each repeated layer's activations in the backward pass (less memory)."),
        Cli(panel=PARALLEL),
    ] = False

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """The dtype the forward computes in under a mixed --precision (None: float32 throughout); torch is
        imported here, when a run asks, not when `--help` reads the options."""
        import torch

        return {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}[self.precision]


#: options a resumed run takes from the command line when given again; the others are the checkpoint's
RESUMABLE = frozenset(
    {"epochs", "max_steps", "device", "data", "valid_data", "save_every", "bleu_sentences", "skip_bad_lines",
     "checkpoint_activations", "precision", "tensorboard"}
)  # fmt: skip


def command_parameters(model: type[BaseModel] = TrainConfig) -> list[inspect.Parameter]:
    """The Typer parameters of `model`'s fields: their flags, help, bounds and defaults, for a command's signature."""
    parameters = []
    for name, info in model.model_fields.items():
        cli = next((m for m in info.metadata if isinstance(m, Cli)), Cli())
        default = info.get_default(call_default_factory=True) if cli.parse is None else _cli_default(cli)
        bounds = {}  # pydantic keeps Field(ge=, le=) as metadata objects; open bounds (gt, lt) are pydantic's alone
        for meta in info.metadata:
            for attr, bound in (("ge", "min"), ("le", "max")):
                if getattr(meta, attr, None) is not None:
                    bounds[bound] = getattr(meta, attr)
        show = not (default is None or default is False or default == [] or default == {})
        if cli.argument:
            marker = typer.Argument(metavar=cli.metavar, help=info.description, show_default=False)
        else:
            flag = bool in (info.annotation, cli.takes)
            flags = cli.flags or ((f"--{name.replace('_', '-')}",) if flag else ())  # a flag has no --no- twin
            metavar = "" if flag else cli.metavar or _METAVARS.get(info.annotation)
            option = {"help": info.description, "metavar": metavar, "rich_help_panel": cli.panel, **bounds}
            marker = typer.Option(*flags, show_default=show, **option)
        kind = cli.takes if cli.takes is not None else info.annotation
        annotation = Annotated[kind, marker]  # type: ignore[valid-type]  # a field's type, known at run time
        parameters.append(
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
        )
    return parameters


_METAVARS: dict[Any, str] = {int: "N", int | None: "N", float: "X", float | None: "X", str: "TEXT", str | None: "TEXT"}


def _cli_default(cli: Cli) -> Any:
    return [] if cli.takes == list[str] else None


def config_from_command_line(values: dict[str, Any]) -> TrainConfig:
    """The config of the options given on the command line (its `model_fields_set`), each parsed as its field's
    `Cli.parse` says; the others keep their defaults."""
    fields = {}
    for name, value in values.items():
        info = TrainConfig.model_fields[name]
        cli = next((m for m in info.metadata if isinstance(m, Cli)), Cli())
        if cli.parse is not None:
            value = info.get_default(call_default_factory=True) if value in (None, []) else cli.parse(value)
        fields[name] = value
    try:
        return TrainConfig(**fields)
    except ValidationError as exc:
        raise UsageError(
            [Problem(f"--{'.'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}") for e in exc.errors()]
        ) from None
