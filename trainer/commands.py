"""The `train` and `translate` commands as plain functions with Typer-annotated parameters.

They raise `common.errors.BlockgraphError`s for anything the user can fix; the command line (cli.py, or
`python -m trainer`) renders those as located messages and exits 1.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from common.console import err, write_plain
from common.errors import DataError, Problem, UsageError
from common.text import excerpt


class Task(str, Enum):
    copy = "copy"
    reverse = "reverse"


class Init(str, Enum):
    xavier = "xavier"
    spec = "spec"


def train(
    spec: Annotated[
        Path | None,
        typer.Argument(metavar="SPEC", help="Spec file of an encoder–decoder or a language model.", show_default=False),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help="Training data: source<TAB>target lines (a text file for a language model, label<TAB>text lines "
            "for a classifier)."
        ),
    ] = None,
    task: Annotated[
        Task | None, typer.Option(help="Train on a synthetic task instead of --data: copy or reverse.")
    ] = None,
    task_options: Annotated[
        str | None,
        typer.Option(help="Synthetic task sizes: symbols=10,min_len=3,max_len=8,train=2000,valid=200."),
    ] = None,
    set_: Annotated[
        list[str], typer.Option("--set", "-s", help="Override a spec variable: --set d_model=256 (repeatable).")
    ] = [],  # noqa: B006 - Typer reads the default
    input_roles: Annotated[
        str | None,
        typer.Option(help="Which inputs are which: src=NAME,tgt=NAME,src_pad=NAME,tgt_pad=NAME,output=NAME."),
    ] = None,
    epochs: Annotated[int, typer.Option(min=1, help="Epochs to train (in all, when resuming).")] = 10,
    max_steps: Annotated[int | None, typer.Option(min=1, help="Stop after this many optimizer steps in all.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Sentences per (global) batch, across all processes.")] = 32,
    lr: Annotated[
        float | None,
        typer.Option(
            min=0.0, help="Peak learning rate, reached after --warmup steps (default: d_model^-0.5 schedule)."
        ),
    ] = None,
    warmup: Annotated[int, typer.Option(min=1, help="Warm-up steps of the learning-rate schedule.")] = 4000,
    label_smoothing: Annotated[float, typer.Option(min=0.0, max=0.99, help="Label smoothing ε.")] = 0.1,
    clip_norm: Annotated[float, typer.Option(min=0.0, help="Clip the gradient norm (0: no clipping).")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of weights, data split, batch order and dropout.")] = 0,
    out_dir: Annotated[
        Path | None, typer.Option("--out", "-o", help="Run directory for checkpoints (default runs/SPEC-NAME).")
    ] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue a run from its directory or checkpoint; its options are reused.")
    ] = None,
    skip_bad_lines: Annotated[
        bool, typer.Option("--skip-bad-lines", help="Leave out unreadable data lines (and count them).")
    ] = False,
    valid: Annotated[Path | None, typer.Option(help="Held-out data file (default: a split of --data).")] = None,
    valid_fraction: Annotated[
        float, typer.Option(min=0.0, max=0.9, help="Share of --data held out for evaluation.")
    ] = 0.05,
    max_len: Annotated[int, typer.Option(min=1, help="Leave out sentences longer than this (tokens).")] = 100,
    min_freq: Annotated[int, typer.Option(min=1, help="Rarer tokens become <unk>.")] = 1,
    max_vocab: Annotated[int | None, typer.Option(min=5, help="At most this many tokens per vocabulary.")] = None,
    tokenizer: Annotated[
        str | None,
        typer.Option(
            help="Tokenizer of both sides: chars (Chinese), words, space, auto (guess from the data), or "
            "MODULE:FUNCTION, a Python callable str -> list[str] (default: auto)."
        ),
    ] = None,
    src_tokenizer: Annotated[str | None, typer.Option(help="As --tokenizer, for the source side only.")] = None,
    tgt_tokenizer: Annotated[
        str | None, typer.Option(help="As --tokenizer, for the target side only (a classifier's text).")
    ] = None,
    save_every: Annotated[
        int, typer.Option(min=0, help="Also checkpoint every N steps within an epoch (0: per epoch).")
    ] = 0,
    bleu_sentences: Annotated[
        int, typer.Option(min=0, help="Held-out sentences translated for BLEU each epoch (0: none).")
    ] = 200,
    init: Annotated[
        Init, typer.Option(help="xavier: Xavier-uniform weight matrices; spec: the blocks' own initialisation.")
    ] = Init.xavier,
    device: Annotated[str, typer.Option(help="cpu or cuda (each process takes cuda:LOCAL_RANK).")] = "cpu",
    nproc: Annotated[
        int, typer.Option(min=1, help="Train data-parallel in N processes (runs torchrun on 127.0.0.1).")
    ] = 1,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or epoch lines.")] = False,
    allow_external_files: Annotated[
        bool,
        typer.Option(
            "--allow-external-files", help="Let the spec name files outside its own folder (docs/security.md)."
        ),
    ] = False,
) -> None:
    """Train SPEC on tab-separated source/target pairs (or a synthetic task) and write checkpoints."""
    from cli import parse_pairs
    from trainer import checkpoint, distributed, rundir, tasks
    from trainer.loop import TrainConfig
    from trainer.loop import train as run_training
    from trainer.roles import parse_roles
    from trainer.vocab import check_tokenizer

    if spec is None and resume is None:
        raise UsageError(Problem("nothing to train", hint="blockgraph train SPEC --data PAIRS.tsv, or --resume RUN"))
    if task is not None and data is not None:
        raise UsageError(Problem("--task and --data both given", hint="train on one of them"))
    src_tok = check_tokenizer(src_tokenizer or tokenizer or "auto")
    tgt_tok = check_tokenizer(tgt_tokenizer or tokenizer or "auto")
    if out_dir is None:
        out_dir = checkpoint.locate(resume).parent if resume is not None else Path("runs") / spec.stem  # type: ignore[union-attr]
    if nproc > 1:
        with rundir.exclusive(out_dir):  # fail now, not in a worker, when another run holds the directory
            pass
        args = _forward_args(locals(), out_dir)
        err.print(f"launching {nproc} processes with torchrun (127.0.0.1)")
        code = distributed.launch(nproc, args)
        if code:
            raise typer.Exit(code)
        return
    config = TrainConfig(
        spec=str(spec) if spec is not None else None,
        overrides=parse_pairs(set_, "--set", typed=True),
        input_roles=parse_roles(input_roles),
        data=str(data.resolve()) if data is not None else None,
        valid_data=str(valid.resolve()) if valid is not None else None,
        task=task.value if task is not None else None,
        task_options=tasks.parse_options(task_options).to_json(),
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        lr=lr,
        warmup=warmup,
        label_smoothing=label_smoothing,
        clip_norm=clip_norm,
        seed=seed,
        valid_fraction=valid_fraction,
        max_len=max_len,
        min_freq=min_freq,
        max_vocab=max_vocab,
        src_tokenizer=src_tok,
        tgt_tokenizer=tgt_tok,
        skip_bad_lines=skip_bad_lines,
        save_every=save_every,
        bleu_sentences=bleu_sentences,
        device=device,
        init=init.value,
        allow_external_files=allow_external_files,
    )
    if resume is not None and (set_ or spec is not None or task is not None):
        err.print("[yellow]note:[/] --resume continues with the checkpoint's spec, --set values and data options")
    try:
        named = (src_tokenizer or tokenizer, tgt_tokenizer or tokenizer)
        run_training(config, out_dir, resume=resume, tokenizers=named, quiet=quiet, console=err)
    except KeyboardInterrupt:
        saved = out_dir / checkpoint.NAME
        where = (
            f"the last complete checkpoint is in {saved}" if checkpoint.is_checkpoint(saved) else "no checkpoint yet"
        )
        err.print(f"[yellow]interrupted[/]: {escape(where)}")
        raise typer.Exit(130) from None


_VALUE_OPTIONS = {
    "data": "--data",
    "task_options": "--task-options",
    "input_roles": "--input-roles",
    "epochs": "--epochs",
    "max_steps": "--max-steps",
    "batch_size": "--batch-size",
    "lr": "--lr",
    "warmup": "--warmup",
    "label_smoothing": "--label-smoothing",
    "clip_norm": "--clip-norm",
    "seed": "--seed",
    "resume": "--resume",
    "valid": "--valid",
    "valid_fraction": "--valid-fraction",
    "max_len": "--max-len",
    "min_freq": "--min-freq",
    "max_vocab": "--max-vocab",
    "tokenizer": "--tokenizer",
    "src_tokenizer": "--src-tokenizer",
    "tgt_tokenizer": "--tgt-tokenizer",
    "save_every": "--save-every",
    "bleu_sentences": "--bleu-sentences",
    "device": "--device",
    "task": "--task",
    "init": "--init",
}


def _forward_args(values: dict, out_dir: Path) -> list[str]:
    """The `train` command line for the worker processes (everything but --nproc)."""
    args = ["train"]
    if values["spec"] is not None:
        args.append(str(values["spec"]))
    for name, flag in _VALUE_OPTIONS.items():
        value = values[name]
        if value is not None:
            args += [flag, str(value.value if isinstance(value, Enum) else value)]
    for item in values["set_"]:
        args += ["--set", item]
    args += ["--out", str(out_dir)]
    if values["skip_bad_lines"]:
        args.append("--skip-bad-lines")
    if values["quiet"]:
        args.append("--quiet")
    if values["allow_external_files"]:
        args.append("--allow-external-files")
    return args


def translate(
    checkpoint_dir: Annotated[
        Path, typer.Argument(metavar="CHECKPOINT", help="A run directory of `train`, or its checkpoint/.")
    ],
    text: Annotated[
        list[str], typer.Argument(help="Sentences to translate ('-': read lines from stdin).", show_default=False)
    ],
    beam: Annotated[int, typer.Option(min=1, help="Beam size; 1 decodes greedily.")] = 1,
    max_len: Annotated[
        int | None, typer.Option(min=1, help="Longest output in tokens (default: 2 × source + 10).")
    ] = None,
    alpha: Annotated[float, typer.Option(min=0.0, help="GNMT length penalty α of beam search (0: none).")] = 0.0,
    n_best: Annotated[int, typer.Option(min=1, help="Print this many beam hypotheses with their scores.")] = 1,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    tokenizer: Annotated[
        str | None,
        typer.Option(
            help="Tokenizer of both sides instead of the checkpoint's: chars, words, space or MODULE:FUNCTION; "
            "a checkpoint trained with a user tokenizer needs it named here again."
        ),
    ] = None,
    src_tokenizer: Annotated[str | None, typer.Option(help="As --tokenizer, for the source side only.")] = None,
    tgt_tokenizer: Annotated[str | None, typer.Option(help="As --tokenizer, for the target side only.")] = None,
) -> None:
    """Translate sentences with a trained checkpoint (greedy or beam search); a language model continues them.

    A classifier's checkpoint prints each text's most likely label and its probability.
    """
    import sys

    import torch

    from trainer import checkpoint, decode
    from trainer.roles import ModelIO, Roles
    from trainer.vocab import EOS_ID, UNK_ID

    saved = checkpoint.load(
        checkpoint_dir, device=device, tokenizers=(src_tokenizer or tokenizer, tgt_tokenizer or tokenizer)
    )
    roles = Roles(**saved.info["roles"])
    io = ModelIO(roles)
    model = saved.model.eval()
    sentences = [line.rstrip("\n") for line in sys.stdin] if text == ["-"] else text
    if roles.kind == "classify":
        for sentence in sentences:
            label, probability = classify(model, io, saved.tgt_vocab, saved.labels or [], sentence, device)
            write_plain(f"{label}\t{probability:.3f}")
        return
    src_most, tgt_most = decode.length_limits(model.typed_graph, roles)
    capped = False
    for sentence in sentences:
        src = prefix = None
        if saved.src_vocab is not None:
            ids = saved.src_vocab.encode_text(sentence)
            if not ids:
                raise DataError(Problem(f"nothing to translate in {excerpt(sentence)}"))
            if src_most is not None and len(ids) + 1 > src_most:
                raise DataError(
                    Problem(
                        f"{excerpt(sentence)} has {len(ids)} tokens; the model reads at most {src_most - 1}",
                        hint="split the sentence",
                    )
                )
            unknown = [t for t, i in zip(_tokens(saved.src_vocab, sentence), ids, strict=True) if i == UNK_ID]
            if unknown:
                err.print(f"[yellow]note:[/] not in the source vocabulary: {escape(' '.join(unknown))}")
            src = torch.tensor([[*ids, EOS_ID]], device=device)
            length = max_len or 2 * len(ids) + 10
        else:
            prefix = saved.tgt_vocab.encode_text(sentence)
            length = max_len or 50
        most = None if tgt_most is None else tgt_most - len(prefix or [])
        if most is not None and length > most:
            if most < 1:
                raise DataError(Problem(f"the prompt fills all {tgt_most} positions of the model", hint="shorten it"))
            if not capped:
                err.print(f"[yellow]note:[/] outputs are capped at {most} tokens: the model has {tgt_most} positions")
                capped = True
            length = most
        if beam == 1:
            hypotheses = decode.greedy(model, io, src, max_len=length, prefix=prefix)
        else:
            hypotheses = decode.beam_search(
                model, io, src, beam=beam, max_len=length, alpha=alpha, prefix=prefix, n_best=min(n_best, beam)
            )
        for hyp in hypotheses[:n_best]:
            words = saved.tgt_vocab.decode_text([*(prefix or []), *hyp.tokens])
            write_plain(f"{hyp.normalized:.3f}\t{words}" if n_best > 1 else words)


def _tokens(vocab, sentence: str) -> list[str]:
    from trainer.vocab import tokenize

    return tokenize(sentence, vocab.tokenizer)


def classify(model, io, vocab, labels: list[str], sentence: str, device: str = "cpu") -> tuple[str, float]:
    """A classifier's most likely label for `sentence` and its probability."""
    import torch

    from trainer.vocab import UNK_ID

    ids = vocab.encode_text(sentence)
    if not ids:
        raise DataError(Problem(f"nothing to classify in {excerpt(sentence)}"))
    unknown = [t for t, i in zip(_tokens(vocab, sentence), ids, strict=True) if i == UNK_ID]
    if unknown:
        err.print(f"[yellow]note:[/] not in the vocabulary: {escape(' '.join(unknown))}")
    with torch.no_grad():
        probs = io(model, torch.tensor([ids], device=device))[0].float().exp()
    best = int(probs.argmax())
    label = labels[best] if best < len(labels) else str(best)
    return label, float(probs[best])
