"""The `train` and `translate` commands as functions with Typer-annotated parameters, registered by cli.py.

`train`'s options are generated from `TrainConfig` (trainer.config), the one declaration of them. Both raise
`common.errors.BlockgraphError`s for anything the user can fix; cli.py renders those and exits 1.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from common.console import err, write_plain
from common.errors import DataError, Problem, UsageError
from common.files import FileKind, GiB, stream_lines
from common.text import excerpt
from trainer.config import RESUMABLE, command_parameters


def _run_option(name: str, kind: Any, default: Any, *flags: str, **option: Any) -> inspect.Parameter:
    marker = typer.Option(*flags, rich_help_panel="Run", **option)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, marker])


RUN_OPTIONS = [  # how this invocation runs, not what the run is: not saved, not handed to workers
    _run_option(
        "out_dir", Path | None, None, "--out", "-o", metavar="DIR",
        help="Run directory for checkpoints (default runs/SPEC-NAME).",
    ),
    _run_option(
        "resume", Path | None, None, metavar="RUN",
        help="Continue a run from its directory or checkpoint: its options come back; given again, "
        + ", ".join(f"--{name.replace('_', '-')}" for name in sorted(RESUMABLE))
        + " and the tokenizers replace them.",
    ),
    _run_option("nproc", int, 1, min=1, metavar="N", help="Train data-parallel in N processes (torchrun, 127.0.0.1)."),
    _run_option("quiet", bool, False, "--quiet", "-q", help="No progress bar or epoch lines."),
]  # fmt: skip


def _train(
    ctx: typer.Context, *, out_dir: Path | None, resume: Path | None, nproc: int, quiet: bool, **options: Any
) -> None:
    """Train SPEC on tab-separated source/target pairs (or a synthetic task) and write checkpoints."""
    from trainer import checkpoint, distributed, rundir
    from trainer.config import config_from_command_line
    from trainer.loop import train as run_training
    from trainer.vocab import check_tokenizer

    given = {name for name in options if getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"}
    config = config_from_command_line({name: options[name] for name in given})
    if config.spec is None and resume is None:
        raise UsageError(Problem("nothing to train", hint="blockgraph train SPEC --data PAIRS.tsv, or --resume RUN"))
    if config.task is not None and config.data is not None:
        raise UsageError(Problem("--task and --data both given", hint="train on one of them"))
    check_tokenizer(config.source_tokenizer)
    check_tokenizer(config.target_tokenizer)
    if out_dir is None:
        out_dir = checkpoint.locate(resume).parent if resume is not None else Path("runs") / Path(config.spec).stem  # type: ignore[arg-type]
    if nproc > 1:
        with rundir.exclusive(out_dir):  # held until the workers end: no other run takes the directory meanwhile
            err.print(f"launching {nproc} processes with torchrun (127.0.0.1)")
            code = distributed.launch(nproc, distributed.Job.of(config, out_dir, resume, quiet))
        if code:
            raise typer.Exit(code)
        return
    try:
        run_training(config, out_dir, resume=resume, quiet=quiet, console=err)
    except KeyboardInterrupt:
        saved = out_dir / checkpoint.NAME
        where = (
            f"the last complete checkpoint is in {saved}" if checkpoint.is_checkpoint(saved) else "no checkpoint yet"
        )
        err.print(f"[yellow]interrupted[/]: {escape(where)}")
        raise typer.Exit(130) from None


def _command(function: Any, parameters: list[inspect.Parameter]) -> Any:
    """`function` with the signature Typer reads its options from (it takes them as keyword arguments)."""

    @functools.wraps(function)
    def command(**values: Any) -> None:
        function(**values)

    context = inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
    command.__signature__ = inspect.Signature([context, *parameters])  # type: ignore[attr-defined]
    return command


train = _command(_train, [*RUN_OPTIONS, *command_parameters()])


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
    sentences = _stdin_lines() if text == ["-"] else text
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


STDIN = FileKind("standard input", DataError, limit=GiB)


def _stdin_lines() -> Iterator[str]:
    """Sentences from standard input, one per line, translated as they come (each line bounded, as in files)."""
    import sys

    for number, raw in stream_lines(sys.stdin.buffer, "<stdin>", STDIN):
        try:
            yield raw.decode("utf-8").removesuffix("\r")
        except UnicodeDecodeError:
            raise STDIN.fail("<stdin>", "the line is not UTF-8 text", "give the sentences as UTF-8", number) from None
