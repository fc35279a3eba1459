"""The training loop: set up (or resume) a run, train with progress, evaluate each epoch, checkpoint.

`train(config, out)` is what `blockgraph train` runs; it returns the trained model and the metrics history.
A `Run` carries everything a training run holds (its options, read once; the model, data, roles, optimizer,
progress; where it reports and saves), so that its steps are its methods rather than functions handed its parts.

A run is reproducible from its seed: the weights are initialised after `torch.manual_seed(seed)`, the batch
plan depends on (seed, epoch) only, and the random-number generators are saved with each checkpoint, so
training 2 epochs and training 1, resuming and training 1 more give identical weights.

A mixed `--precision` runs each forward (training's and evaluation's, BLEU's decoding included) under
`torch.autocast` in bfloat16 or float16 (under fsdp, the sharding's own casts: trainer.sharded); the loss is
computed from float32 log-probabilities, and the weights and Adam's state stay float32, so checkpoints are the
same whatever the precision. 16-mixed scales the loss (`torch.amp.GradScaler`), as float16 gradients underflow.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from blockgraph.builder import persist
from blockgraph.builder.model import GraphModel
from blockgraph.builder.pipeline import compile_graph, load_spec, typed_graph
from blockgraph.builder.shapes import TypedGraph
from blockgraph.common.console import safe_console
from blockgraph.common.errors import CheckpointError, Location, Problem, SpecError, UsageError
from blockgraph.common.records import check_record
from blockgraph.trainer import (
    batching,
    bleu,
    checkpoint,
    corpus,
    decode,
    distributed,
    fits,
    losses,
    model_path,
    pretrained,
    rundir,
    schedule,
    sharded,
    tensorboard,
)
from blockgraph.trainer.config import RESUMABLE, TrainConfig
from blockgraph.trainer.roles import ModelIO, Roles, check_sizes, class_variable, find_roles, sizes, vocab_variables
from blockgraph.trainer.vocab import check_tokenizer


@dataclass
class TrainResult:
    model: GraphModel
    roles: Roles
    corpus: corpus.Corpus
    history: list[dict[str, Any]]
    step: int
    checkpoint: Path | None = None
    optimizer: torch.optim.Optimizer | None = None


#: what an epoch's training figures are made of, summed over its batches (and the ranks); the gradient norm, the
#: same on every rank, is summed by the main process alone, over its steps with a finite norm (`grad_steps`)
SUMS = ("loss", "tokens", "correct", "grad_norm", "grad_steps")


class EpochSums(BaseModel):
    """`trainer.json`'s `epoch_sums`: the current epoch's sums over the ranks at the save, so that an epoch
    resumed midway reports the figures of all its batches."""

    model_config = ConfigDict(extra="forbid")

    loss: float = Field(0.0, allow_inf_nan=False)
    tokens: float = Field(0.0, ge=0, allow_inf_nan=False)
    correct: float = Field(0.0, ge=0, allow_inf_nan=False)
    grad_norm: float = Field(0.0, ge=0, allow_inf_nan=False)
    grad_steps: float = Field(0.0, ge=0, allow_inf_nan=False)
    outputs: dict[str, Annotated[float, Field(allow_inf_nan=False)]] = Field(
        default_factory=dict
    )  # each declared loss output times its batches' tokens


@dataclass(frozen=True)
class Voice:
    """Where a run reports: its console, on the main process unless quiet."""

    console: Console
    on: bool

    def __call__(self, *parts: Any) -> None:
        if self.on:
            self.console.print(*parts, soft_wrap=True)


@dataclass(frozen=True)
class StepFigures:
    """One step's figures on this rank: the summed training loss, its tokens and how many of them the model got
    right, the tokens of the global batch, each declared loss output times the tokens (for the epoch mean), and
    the norm of the step's (averaged, unscaled, unclipped) gradient."""

    loss: float
    tokens: float
    correct: float
    global_tokens: float
    outputs: dict[str, float]
    grad_norm: float


@dataclass
class Run:
    """One training run: its options (read once: the command line's, or its checkpoint's with the changes a
    resume may make), model, data, roles, optimizer, progress so far, and where it reports and checkpoints."""

    config: TrainConfig
    context: distributed.Context
    model: GraphModel
    roles: Roles
    data: corpus.Corpus
    optimizer: torch.optim.Optimizer
    d_model: int
    out: Path | None
    say: Voice
    epoch: int = 0  # current epoch (0-based)
    batch: int = 0  # batches of the current epoch already trained
    step: int = 0  # optimizer steps taken
    history: list[dict[str, Any]] = field(default_factory=list)
    sums: dict[str, Any] = field(default_factory=dict)  # the epoch's so far: SUMS, and `outputs` by name
    board: tensorboard.Board | None = None  # --tensorboard's writer, on the main process

    def __post_init__(self) -> None:
        if not self.sums:
            self.sums = self.fresh_sums()

    def fresh_sums(self) -> dict[str, Any]:
        return {**dict.fromkeys(SUMS, 0.0), "outputs": dict.fromkeys(self.roles.loss, 0.0)}

    @classmethod
    def start(cls, config: TrainConfig, context: distributed.Context, out: Path | None, say: Voice) -> Run:
        """A new run of `config.spec`: sized for the data, initialised from the seed (or an import's weights)."""
        if config.spec is None:
            raise UsageError(
                Problem("no spec to train", hint="blockgraph train SPEC --data PAIRS.tsv (or --resume DIR)")
            )
        sharded.check(config)
        check_precision(config, context.device)
        imported = model_path.resolve(config.spec).fine_tuned()
        typed, roles, data = _prepare(config) if imported is None else _prepare_imported(config, imported)
        corpus.fit_positions(data, *decode.length_limits(typed, roles))
        torch.manual_seed(config.seed)
        fits.check_training(typed, config, context)  # before allocating: weights, gradients, Adam's moments
        model = compile_graph(typed, device=context.device)
        if config.init == "xavier":
            initialise(model)
        if imported is not None:  # the import's weights over the fresh ones, wherever names and shapes agree
            data.notes.append(_transferred(persist.load_matching(model, imported / pretrained.MODEL), imported))
        if config.strategy == "fsdp":
            sharded.shard(model, config, context)
        torch.manual_seed(config.seed * 7919 + 1 + context.rank)  # dropout streams, one per rank
        d_model = sizes(typed.graph, roles).d_model or _fallback_width(model)
        return cls(config, context, model, roles, data, schedule.adam(model), d_model, out, say)

    @classmethod
    def resume(
        cls, config: TrainConfig, resume: str | Path, context: distributed.Context, out: Path | None, say: Voice
    ) -> Run:
        """The run saved at `resume`, with its options except the resumable ones `config` sets."""
        given = config.model_fields_set
        named = (
            config.source_tokenizer if given & {"tokenizer", "src_tokenizer"} else None,
            config.target_tokenizer if given & {"tokenizer", "tgt_tokenizer"} else None,
        )
        fits.check_checkpoint(resume, context)
        saved = checkpoint.load(resume, device=context.device, tokenizers=named, sharded_ok=True)
        if saved.tgt_vocab is None and any(named):
            raise UsageError(
                Problem("a fine-tuned imported model reads text with its own tokenizer: leave out --tokenizer")
            )
        info = saved.info
        stored = check_record(
            checkpoint.current_config(info["config"]),
            TrainConfig,
            checkpoint.TRAINER_FILE,
            saved.path / checkpoint.TRAINER,
            "config",
        )
        kept = sorted(given - RESUMABLE - {"tokenizer", "src_tokenizer", "tgt_tokenizer"})
        if kept:
            say(f"[yellow]note:[/] --resume keeps the checkpoint's {escape(', '.join(kept))}")
        # the data is read with the vocabularies' tokenizers, resolved by checkpoint.load: never a saved name as is
        changes = {name: getattr(config, name) for name in given & RESUMABLE}
        roles = Roles(**info["roles"])
        model = saved.model
        typed = model.typed_graph
        if saved.tgt_vocab is None:  # a fine-tuned import: its tokenizer came with the checkpoint
            text = pretrained.model_text(saved.path, roles.kind, sizes(typed.graph, roles).out_vocab or 0)
            data = corpus.load(stored.model_copy(update=changes), roles.kind, text=text)
        else:
            changes["src_tokenizer"] = saved.src_vocab.tokenizer if saved.src_vocab is not None else "space"
            changes["tgt_tokenizer"] = saved.tgt_vocab.tokenizer
            vocabs = (saved.src_vocab, saved.tgt_vocab)
            data = corpus.load(stored.model_copy(update=changes), roles.kind, vocabs=vocabs, labels=saved.labels)
        stored = stored.model_copy(update=changes)
        corpus.fit_positions(data, *decode.length_limits(typed, roles))
        sharded.check(stored)
        check_precision(stored, context.device)
        if stored.strategy == "fsdp" and not saved.sharded:
            raise CheckpointError(
                Problem(
                    "this checkpoint is not sharded, but its options say --strategy fsdp",
                    Location(str(saved.path / checkpoint.TRAINER)),
                    hint="the checkpoint is corrupt, or was edited",
                )
            )
        if stored.strategy == "fsdp":
            sharded.shard(model, stored, context)
        optimizer = schedule.adam(model)
        if saved.sharded:
            generators = sharded.load(saved.path, model, optimizer, distributed=True)
        else:
            checkpoint.restore_optimizer(optimizer, info["optimizer"], saved.tensors, saved.path)
            generators = saved.tensors
        if not distributed.restore_rng(context, generators):
            torch.manual_seed(stored.seed * 7919 + 1 + context.rank + info["step"])
        run = cls(stored, context, model, roles, data, optimizer, info["d_model"], out, say)
        run.epoch, run.batch, run.step, run.history = info["epoch"], info["batch"], info["step"], info["history"]
        scaled = info.get("grad_scaler")
        if scaled is not None and run.scaler.is_enabled():  # a 16-mixed run goes on with its loss scale
            state = {**run.scaler.state_dict(), "scale": scaled["scale"], "_growth_tracker": scaled["growth_tracker"]}
            run.scaler.load_state_dict(state)
        sums = check_record(
            info.get("epoch_sums", {}), EpochSums, checkpoint.TRAINER_FILE, saved.path / checkpoint.TRAINER,
            "epoch_sums",
        )  # fmt: skip
        if context.main and run.batch:  # the ranks' sums, counted once
            outputs = {name: sums.outputs.get(name, 0.0) for name in roles.loss}
            run.sums = {**sums.model_dump(), "outputs": outputs}
        return run

    @cached_property
    def io(self) -> ModelIO:
        return ModelIO(self.roles)

    @cached_property
    def wrapped(self) -> nn.Module:
        """The model as training steps call it: under ddp, wrapped to average the ranks' gradients."""
        if self.context.distributed and self.config.strategy == "ddp":
            device_ids = [self.context.device] if self.context.device.type == "cuda" else None
            return nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        return self.model

    @cached_property
    def scaler(self) -> torch.amp.GradScaler:
        """16-mixed's loss scaling, without which small float16 gradients underflow to 0; otherwise disabled,
        a pass-through to the optimizer."""
        return torch.amp.GradScaler(self.context.device.type, enabled=self.config.precision == "16-mixed")

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Where forwards run: under a mixed precision, torch's autocast (under fsdp, the sharding's policy casts
        instead, see trainer.sharded)."""
        compute = self.config.compute_dtype
        if compute is None or self.config.strategy == "fsdp":
            return contextlib.nullcontext()
        return torch.autocast(self.context.device.type, dtype=compute)

    @cached_property
    def lr_factor(self) -> float:
        return schedule.noam_factor(self.d_model, self.config.warmup, self.config.lr)

    @property
    def done(self) -> bool:
        return self.config.max_steps is not None and self.step >= self.config.max_steps

    def introduce(self, resumed: str | Path | None) -> None:
        """Say what is trained, on what, where."""
        if resumed is not None:
            self.say(f"resuming {escape(str(resumed))} at epoch {self.epoch + 1}, step {self.step}")
        self.say(f"[bold]{escape(self.model.typed_graph.graph.name)}[/]: {escape(corpus.describe(self.data))}")
        for note in self.data.notes:
            self.say(f"[yellow]note:[/] {escape(note)}")
        parameters = sum(p.numel() for p in self.model.parameters())
        context = self.context
        self.say(
            f"{parameters:,} parameters on {context.device}"
            + (f", {context.world} processes" if context.distributed else "")
            + f", precision {self.config.precision}"
        )

    def train(self) -> Path | None:
        """Train to the run's last epoch (or step), evaluating, logging and checkpointing each epoch; the last
        checkpoint written."""
        config, context = self.config, self.context
        train_set = self.data.train
        per_epoch = len(batching.plan(train_set, config.batch_size, seed=config.seed, epoch=0))
        remaining = per_epoch * max(0, config.epochs - self.epoch) - self.batch
        if config.max_steps is not None:
            remaining = min(remaining, max(0, config.max_steps - self.step))
        if self.step + remaining < config.warmup:
            self.say(
                f"[yellow]warning:[/] --warmup {config.warmup} outlasts the run ({self.step + remaining} steps): the "
                "learning rate only rises and never reaches its peak; "
                f"try --warmup {max(1, (self.step + remaining) // 10)}"
            )
        saved: Path | None = None
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.3f}"),
            TextColumn("{task.fields[speed]:,.0f} tok/s"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.say.console,
            disable=not self.say.on or not self.say.console.is_terminal,
            transient=True,
        )
        # a resumed run's bar goes on from its steps so far
        task = progress.add_task(
            "training", total=self.step + remaining, completed=self.step, loss=float("nan"), speed=0.0
        )
        self.model.train()
        with progress:
            while self.epoch < config.epochs and not self.done:
                batches = batching.plan(train_set, config.batch_size, seed=config.seed, epoch=self.epoch)
                totals = self.sums  # from 0, or from a resumed epoch's sums before the resume
                started, seen = time.perf_counter(), 0.0
                progress.update(task, description=f"epoch {self.epoch + 1}/{config.epochs}")
                while self.batch < len(batches) and not self.done:
                    figures = self.train_step(batches[self.batch])
                    self.batch += 1
                    totals["loss"] += figures.loss
                    totals["tokens"] += figures.tokens
                    totals["correct"] += figures.correct
                    for name, value in figures.outputs.items():
                        totals["outputs"][name] += value
                    if context.main and math.isfinite(figures.grad_norm):  # 16-mixed: an overflow skips the step
                        totals["grad_norm"] += figures.grad_norm
                        totals["grad_steps"] += 1
                    seen += figures.global_tokens
                    speed = seen / max(time.perf_counter() - started, 1e-9)
                    progress.update(task, advance=1, loss=figures.loss / max(figures.tokens, 1), speed=speed)
                    if config.save_every and self.step % config.save_every == 0 and self.batch < len(batches):
                        saved = self.save() or saved
                finished = self.batch >= len(batches)
                record = self._epoch_record(totals, seen / max(time.perf_counter() - started, 1e-9))
                if finished:
                    self.epoch, self.batch, self.sums = self.epoch + 1, 0, self.fresh_sums()
                if context.main or config.strategy == "fsdp":  # a sharded model's forward takes every rank
                    with self.autocast():
                        metrics = evaluate(self.model, self.io, self.data, _evaluated(config), context.device)
                    record.update(metrics if context.main else {})
                    self.model.train()
                self.history.append(record)
                self.say(_epoch_line(record, config, finished))
                saved = self.save() or saved
                if self.out is not None and context.main:
                    rundir.append_line(self.out / rundir.METRICS, json.dumps(record))
                if self.board is not None:
                    self.board.log(record)
        if saved is not None:
            self.say(f"checkpoint: {escape(str(saved))}")
        return saved

    def _epoch_record(self, totals: dict[str, Any], speed: float) -> dict[str, Any]:
        """The epoch's training figures over all ranks: loss and accuracy per token, each declared loss output's
        mean (weighted by its batches' tokens), the learning rate of its last step and its steps' mean gradient
        norm."""
        names = list(totals["outputs"])
        loss, tokens, correct, grad_norm, grad_steps, *outputs = distributed.all_sum(
            self.context, *(totals[name] for name in SUMS), *totals["outputs"].values()
        )
        record = {
            "epoch": self.epoch + 1,
            "step": self.step,
            "train_loss": loss / max(tokens, 1),
            "train_acc": correct / max(tokens, 1),
        }
        for name, value in zip(names, outputs, strict=True):
            record[f"train_loss_{name}"] = value / max(tokens, 1)
        record["lr"] = self.optimizer.param_groups[0]["lr"]
        if grad_steps:
            record["grad_norm"] = grad_norm / grad_steps
        record["tokens_per_s"] = speed
        return record

    def train_step(self, global_batch: list[int]) -> StepFigures:
        """One optimizer step on this rank's shard of a global batch."""
        context = self.context
        local = batching.shard(global_batch, context.rank, context.world)
        weight = 1.0
        if not local:  # fewer examples than ranks: take part in the gradient all-reduce with a zero-weight example
            local, weight = global_batch[:1], 0.0
        batch = batching.collate([self.data.train[i] for i in local], self.data.specials).to(context.device)
        tokens = batch.tokens * weight
        global_tokens, stops = distributed.all_sum(context, tokens, float(distributed.stop_asked()))
        if stops:  # a rank was asked to stop (trainer.distributed): all stop here, before the step, none left waiting
            raise distributed.Stopped
        self.step += 1
        schedule.set_lr(self.optimizer, schedule.noam_lr(self.step, self.d_model, self.config.warmup, self.lr_factor))
        loss = self.loss(batch, weight * context.world / max(global_tokens, 1.0), weight)
        self.scaler.scale(loss.objective).backward()
        self.scaler.unscale_(self.optimizer)  # the norm of the true gradients (16-mixed; otherwise a no-op)
        norm = nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        if self.config.clip_norm > 0:
            nn.utils.clip_grads_with_norm_(self.model.parameters(), self.config.clip_norm, norm)
        self.scaler.step(self.optimizer)  # 16-mixed: skipped where a gradient overflowed (and the scale halves)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        correct = losses.batch_correct(loss.outputs.log_probs.detach(), batch) * weight
        outputs = {name: float(value.detach()) * tokens for name, value in loss.outputs.losses.items()}
        if self.config.strategy == "fsdp":  # a DTensor: each rank holds its shards' part
            norm = norm.full_tensor()  # type: ignore[attr-defined]
        return StepFigures(float(loss.nll.detach()) * weight, tokens, correct, global_tokens, outputs, float(norm))

    def loss(self, batch: batching.Batch, scale: float, weight: float = 1.0) -> losses.Loss:
        """The loss this rank minimises on `batch`: its summed cross-entropy times `scale`, plus each declared loss
        output times its weight (and `weight`: 0 for a rank that only takes part with a stand-in example)."""
        with self.autocast():  # the log-probabilities and declared losses come out float32 (roles.ModelIO)
            outputs = self.io.outputs(self.wrapped, batch.tgt_in, batch.src, batch.src_pad, batch.tgt_pad)
        weights = {name: weight * declared for name, declared in self.roles.loss.items()}
        return losses.of(outputs, batch, self.config.label_smoothing, self.data.specials.pad, scale, weights)

    def save(self) -> Path | None:
        """Checkpoint on rank 0 (all ranks contribute their random-number states; under fsdp, their shards too)."""
        if self.out is None:
            return None
        context = self.context
        rng = distributed.gather_rng(context)
        outputs = self.sums["outputs"]
        summed = distributed.all_sum(context, *(self.sums[name] for name in SUMS), *outputs.values())
        epoch_sums: dict[str, Any] = dict(zip(SUMS, summed, strict=False))
        epoch_sums["outputs"] = dict(zip(outputs, summed[len(SUMS) :], strict=True))
        info = {
            "config": self.config.model_dump(mode="json"),
            "roles": self.roles.to_json(),
            "epoch": self.epoch,
            "batch": self.batch,
            "step": self.step,
            "world": context.world,
            "d_model": self.d_model,
            "history": self.history,
            "epoch_sums": epoch_sums,
            "optimizer": checkpoint.optimizer_groups(self.optimizer),
        }
        if self.scaler.is_enabled():
            scaler = self.scaler.state_dict()
            info["grad_scaler"] = {"scale": scaler["scale"], "growth_tracker": scaler["_growth_tracker"]}
        data = self.data
        records = checkpoint.Records(
            info, data.src_vocab, data.tgt_vocab, data.labels, data.text.files if data.text is not None else None
        )
        target = self.out / checkpoint.NAME
        if self.config.strategy == "fsdp":
            return sharded.save(
                target, model=self.model, optimizer=self.optimizer, records=records, rng=rng, context=context
            )
        path = None
        if context.main:
            tensors = {**checkpoint.optimizer_state(self.optimizer), **rng}
            path = checkpoint.save(target, model=self.model, records=records, tensors=tensors)
        distributed.barrier(context)
        return path


def train(
    config: TrainConfig,
    out: str | Path | None = None,
    *,
    resume: str | Path | None = None,
    quiet: bool = False,
    console: Console | None = None,
    locked: bool = False,
) -> TrainResult:
    """Train (or, with `resume`, continue training) and write checkpoints to `out`/checkpoint.

    `locked`: the caller holds the run directory's lock for the whole run (`train --nproc`'s launcher does).

    On resume, the checkpoint's options come back, except those `config` sets (its `model_fields_set`: on the
    command line, the options given again) that a run can change midway (`config.RESUMABLE`); tokenizers it
    sets replace the checkpoint's, and a user tokenizer the checkpoint records is used only when set here again.
    """
    context = distributed.setup(config.device)
    say = Voice(console or safe_console(stderr=True), context.main and not quiet)
    try:
        out_dir = Path(out) if out is not None else (checkpoint.locate(resume).parent if resume else None)
        tensorboard.check(config, out_dir)  # before any work (a resumed run's own options are checked as it opens)
        take_lock = out_dir is not None and context.main and not locked
        with rundir.exclusive(out_dir) if take_lock else contextlib.nullcontext():  # type: ignore[arg-type]
            if resume is None and out_dir is not None and (out_dir / checkpoint.NAME).exists():
                raise UsageError(
                    Problem(
                        f"{out_dir} already holds a training run",
                        hint=f"continue it with --resume {out_dir}, or choose another --out",
                    )
                )
            if resume is None:
                run = Run.start(config, context, out_dir, say)
                if out_dir is not None and context.main:
                    (out_dir / rundir.METRICS).unlink(missing_ok=True)
                    tensorboard.clear(out_dir)
            else:
                run = Run.resume(config, resume, context, out_dir, say)
            run.introduce(resume)
            run.board = tensorboard.Board.open(
                run.config, out_dir, main=context.main, step=run.step, resumed=resume is not None
            )
            try:
                saved = run.train()
            finally:
                if run.board is not None:
                    run.board.close()
            return TrainResult(run.model, run.roles, run.data, run.history, run.step, saved, run.optimizer)
    finally:
        distributed.teardown(context)


def check_precision(config: TrainConfig, device: torch.device | str) -> None:
    """16-mixed on CUDA only: float16 is fast there, and its loss scaling is CUDA's; bfloat16 has float32's range,
    needs no scaling and runs anywhere. Checked in each process, and before `--nproc` launches any."""
    if config.precision == "16-mixed" and torch.device(device).type != "cuda":
        raise UsageError(
            Problem(
                f"--precision 16-mixed needs a CUDA device (this run is on {device})",
                hint="on the CPU, train with --precision bf16-mixed (or --device cuda)",
            )
        )


def check_tokenizers(config: TrainConfig) -> None:
    """The tokenizers a run names exist, before any work: each process checks once (a new run here, before it
    reads the spec; `train --nproc`'s launcher before it starts the workers)."""
    check_tokenizer(config.source_tokenizer)
    check_tokenizer(config.target_tokenizer)


def _prepare(config: TrainConfig) -> tuple[TypedGraph, Roles, corpus.Corpus]:
    """The spec sized for the data (its vocabularies, a classifier's labels), its roles, and the data."""
    check_tokenizers(config)
    typed_base = typed_graph(config.spec, config.overrides, allow_external_files=config.allow_external_files)  # type: ignore[arg-type]
    base = typed_base.graph
    roles = find_roles(base, config.input_roles, typed_base.types)
    variables = base.vars
    found_vars = vocab_variables(variables, roles)
    data = corpus.load(config, roles.kind, shared_vocab="shared" in found_vars)
    overrides = dict(config.overrides)
    for role, var in found_vars.items():
        if var not in overrides:
            vocab = data.src_vocab if role == "src" else data.tgt_vocab
            overrides[var] = len(vocab)  # type: ignore[arg-type]
    classes_var = class_variable(variables) if data.labels is not None else None
    if classes_var is not None and classes_var not in overrides:
        overrides[classes_var] = len(data.labels)  # type: ignore[arg-type]
    valid = load_spec(config.spec, overrides, allow_external_files=config.allow_external_files)  # type: ignore[arg-type]
    typed = typed_graph(valid)
    found = sizes(typed.graph, roles)
    where = typed.graph.locate(("vars",))
    problems = check_sizes(
        replace(found, out_vocab=None) if data.labels is not None else found,
        len(data.src_vocab) if data.src_vocab is not None else None,
        len(data.tgt_vocab),  # type: ignore[arg-type]
        where,
    )
    if data.labels is not None:
        classes = _output_classes(typed, roles)
        if classes is not None and classes != len(data.labels):
            problems.append(
                Problem(
                    f"the spec's output has {classes} classes, the training data {len(data.labels)} labels",
                    where,
                    hint=f"--set {classes_var or 'classes'}={len(data.labels)} (or give the spec a `classes` variable)",
                )
            )
    if problems:
        raise SpecError(problems)
    return typed, roles, data


def _prepare_imported(config: TrainConfig, folder: Path) -> tuple[TypedGraph, Roles, corpus.Corpus]:
    """An imported model's spec (as edited, with --set), its roles, and the data read by its tokenizer."""
    pretrained.writer_record(folder)
    spec = folder / pretrained.SPEC if (folder / pretrained.SPEC).is_file() else folder / pretrained.MODEL / "spec.yaml"
    typed = typed_graph(spec, config.overrides, allow_external_files=config.allow_external_files)
    roles = find_roles(typed.graph, config.input_roles, typed.types)
    text = pretrained.model_text(folder, roles.kind, sizes(typed.graph, roles).out_vocab or 0)
    return typed, roles, corpus.load(config, roles.kind, text=text)


def _transferred(transfer: persist.Transfer, folder: Path) -> str:
    """What fine-tuning starts from, in a line: the imported tensors taken, and any the spec's edits changed."""
    total = len(transfer.loaded) + len(transfer.new) + len(transfer.reshaped)
    if not transfer.loaded:
        raise SpecError(
            Problem(
                f"none of the imported model's tensors fit this spec ({folder})",
                hint="fine-tune the spec.yaml of the import, or edit it keeping its node names and sizes",
            )
        )
    line = f"weights: {len(transfer.loaded)} of {total} tensors from the imported model"
    for what, names in (
        ("new", transfer.new),
        ("of another shape or dtype, so new", transfer.reshaped),
        ("left out", transfer.left),
    ):
        if names:
            line += f"; {len(names)} {what}: {persist.names_list(names, 4)}"
    return line


def _output_classes(typed: Any, roles: Roles) -> int | None:
    """The size of a classifier output's last dimension, when it is a number."""
    graph = typed.graph
    out_type = typed.types.get(graph.outputs[roles.output or next(iter(graph.outputs))])
    last = str(out_type.shape[-1]) if out_type is not None and out_type.shape else ""
    return int(last) if last.isdigit() else None


def initialise(model: GraphModel) -> None:
    """Xavier-uniform initialisation of every weight with two or more dimensions (as the Annotated Transformer).

    Blocks' defaults differ (nn.Embedding draws N(0, 1), which `scale: true` multiplies by √d_model, drowning
    the position signal in small models); embeddings loaded from `pretrained` files, frozen tensors and what a
    block initialises as part of its definition (`Block.own_init`: Mamba's decay rates) are kept.
    """
    keep = set()
    for inst in model.typed_graph.graph.nodes.values():
        module = model.get_submodule(inst.module_id)
        if getattr(inst.params, "pretrained", None):
            keep |= {id(p) for p in module.parameters()}
        keep |= {id(module.get_parameter(name)) for name in inst.entry.cls.own_init}
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1 and parameter.requires_grad and id(parameter) not in keep:
                nn.init.xavier_uniform_(parameter)


def _fallback_width(model: nn.Module) -> int:
    """The schedule's d_model when the spec names none: the widest embedding."""
    widths = [m.embedding_dim for m in model.modules() if isinstance(m, nn.Embedding)]
    return max(widths) if widths else 512


def _evaluated(config: TrainConfig) -> TrainConfig:
    """What evaluation computes: under fsdp, no BLEU (decoding step by step needs the whole model)."""
    return config.model_copy(update={"bleu_sentences": 0}) if config.strategy == "fsdp" else config


@torch.no_grad()
def evaluate(
    model: GraphModel, io: ModelIO, data: corpus.Corpus, config: TrainConfig, device: torch.device
) -> dict[str, float]:
    """Held-out loss (plain cross-entropy per scored token: declared loss outputs are training's), perplexity, token
    accuracy and BLEU of greedy translations (a language model's: of greedy continuations of its prompts, when
    its examples have them).

    A classifier's: loss per example and accuracy (no perplexity, no BLEU).
    """
    if not data.valid:
        return {}
    model.eval()
    loss = tokens = correct = 0.0
    for indices in batching.plan(data.valid, config.batch_size, seed=0, epoch=0, shuffle=False):
        batch = batching.collate([data.valid[i] for i in indices], data.specials).to(device)
        log_probs = io(model, batch.tgt_in, batch.src, batch.src_pad, batch.tgt_pad)
        loss += float(losses.batch_nll(log_probs, batch, 0.0, data.specials.pad))
        tokens += batch.tokens
        correct += losses.batch_correct(log_probs, batch)
    result = {
        "valid_loss": loss / tokens,
        "valid_ppl": math.exp(min(loss / tokens, 50.0)),
        "valid_acc": correct / tokens,
    }
    if data.labels is not None:
        del result["valid_ppl"]
    translates = io.roles.kind == "seq2seq" or data.valid[0].prompt is not None
    if translates and config.bleu_sentences > 0:
        result.update(corpus_bleu_of(model, io, data, config.bleu_sentences, config.max_len, device))
    return result


def corpus_bleu_of(
    model: GraphModel, io: ModelIO, data: corpus.Corpus, limit: int, max_len: int, device: torch.device
) -> dict[str, float]:
    """BLEU and chrF of greedy translations of the first `limit` held-out sources (a language model's: greedy
    continuations of their prompts) against their references."""
    examples = data.valid[:limit]
    hypotheses = [""] * len(examples)
    decoder = decode.Decoder(model, io.roles, specials=data.specials)
    groups: dict[int, list[int]] = {}  # prompts decode together when they are as long (decode.greedy's prompts)
    for i, example in enumerate(examples):
        groups.setdefault(len(example.prompt) if example.prompt is not None else -1, []).append(i)
    for read, indices in groups.items():
        for start in range(0, len(indices), 64):
            chunk = indices[start : start + 64]
            if read < 0:
                batch = batching.collate([examples[i] for i in chunk], data.specials).to(device)
                assert batch.src is not None
                length = min(max_len + 1, 2 * batch.src.shape[1] + 10, decoder.most_new(0) or max_len + 1)
                found = decode.greedy(decoder, batch.src, batch.src_pad, max_len=length)
            else:
                prompt = torch.tensor([examples[i].prompt for i in chunk], device=device)
                length = min(max_len + 1, 2 * read + 10, decoder.most_new(read) or max_len + 1)
                found = decode.greedy(decoder, prompt=prompt, max_len=length)
            for i, hyp in zip(chunk, found, strict=True):
                hypotheses[i] = data.target_text(hyp.tokens)
    return bleu.corpus_scores(hypotheses, data.valid_refs[: len(examples)], tokenize=data.bleu_tokenize)


def _epoch_line(record: dict[str, Any], config: TrainConfig, finished: bool) -> str:
    where = f"epoch {record['epoch']}/{config.epochs}" + ("" if finished else f" (stopped at step {record['step']})")
    parts = [f"train loss {record['train_loss']:.3f}", f"acc {100 * record['train_acc']:.1f}%"]
    parts += [f"{key.removeprefix('train_loss_')} {value:.4g}" for key, value in record.items() if "_loss_" in key]
    if "valid_loss" in record:
        parts.append(f"valid loss {record['valid_loss']:.3f}")
        if "valid_ppl" in record:
            parts.append(f"ppl {record['valid_ppl']:.2f}")
        parts.append(f"acc {100 * record['valid_acc']:.1f}%")
    if "bleu" in record:
        parts.append(f"BLEU {record['bleu']:.1f}, chrF {record['chrf']:.1f}")
    parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
    return f"[bold]{where}[/]: " + ", ".join(parts)
