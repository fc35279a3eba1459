"""The `train`, `translate`, `generate` and `import` commands as functions with Typer-annotated parameters,
registered by cli.py.

`train`'s options are generated from `TrainConfig` (trainer.config), the one declaration of them. All raise
`common.errors.BlockgraphError`s for anything the user can fix; cli.py renders those and exits 1.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from blockgraph.common.console import err, write_plain
from blockgraph.common.errors import DataError, Problem, UsageError
from blockgraph.common.files import FileKind, GiB, read_lines, stream_lines
from blockgraph.common.text import excerpt
from blockgraph.trainer.config import MAX_SEED, RESUMABLE, command_parameters

if TYPE_CHECKING:
    from blockgraph.trainer.attention_maps import SentenceAttention
    from blockgraph.trainer.distributed import Ending


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
    _run_option(
        "nproc", int, 1, min=1, max=1024, metavar="N", help="Train data-parallel in N processes (on 127.0.0.1)."
    ),
    _run_option("quiet", bool, False, "--quiet", "-q", help="No progress bar or epoch lines."),
]  # fmt: skip


def _train(
    ctx: typer.Context, *, out_dir: Path | None, resume: Path | None, nproc: int, quiet: bool, **options: Any
) -> None:
    """Train SPEC on tab-separated source/target pairs (or a synthetic task) and write checkpoints."""
    from blockgraph.trainer import distributed, model_path, rundir, tensorboard
    from blockgraph.trainer.config import config_from_command_line
    from blockgraph.trainer.loop import check_precision, check_tokenizers
    from blockgraph.trainer.loop import train as run_training

    given = {name for name in options if getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"}
    config = config_from_command_line({name: options[name] for name in given})
    if config.spec is None and resume is None:
        raise UsageError(Problem("nothing to train", hint="blockgraph train SPEC --data PAIRS.tsv, or --resume RUN"))
    if config.task is not None and config.data is not None:
        raise UsageError(Problem("--task and --data both given", hint="train on one of them"))
    resumed = model_path.resolve(resume).run("--resume") if resume is not None else None
    if out_dir is None:
        out_dir = resumed.parent if resumed is not None else Path("runs") / _run_name(config.spec)
    if nproc > 1:
        check_tokenizers(config)  # here, before any worker starts (a run in this process checks them itself)
        check_precision(config, config.device)
        tensorboard.check(config, out_dir)
        debug = bool(ctx.find_root().params.get("debug"))
        job = distributed.Job.of(config, out_dir, resume, quiet, debug=debug)
        try:
            with rundir.exclusive(out_dir) as lock:  # the workers share it: no other run takes the directory meanwhile
                err.print(f"launching {nproc} processes (127.0.0.1)")
                ending = distributed.launch(nproc, job, lock=lock)
        except KeyboardInterrupt:  # before the launch took the signals over (it kills any worker it started)
            err.print(f"[yellow]interrupted[/]: {escape(_last_checkpoint(out_dir))}")
            raise typer.Exit(130) from None
        _launch_ended(ending, out_dir)
        return
    try:
        with distributed.interruptible():
            run_training(config, out_dir, resume=resume, quiet=quiet, console=err)
    except KeyboardInterrupt as stop:
        if os.environ.get("RANK", "0") in ("", "0"):  # one line for a run torchrun started by hand too
            err.print(f"[yellow]interrupted[/]: {escape(_last_checkpoint(out_dir))}")
        raise typer.Exit(128 + getattr(stop, "signum", 2)) from None  # 130 for SIGINT


def _last_checkpoint(out_dir: Path) -> str:
    from blockgraph.trainer import checkpoint

    saved = out_dir / checkpoint.NAME
    return f"the last complete checkpoint is in {saved}" if checkpoint.is_checkpoint(saved) else "no checkpoint yet"


def _launch_ended(ending: Ending, out_dir: Path) -> None:
    """Say, in one line, why a run of `--nproc N` ended early and where its last checkpoint is; exit non-zero.

    A worker that reported an error of the user's (exit status 1) has said why: only the status follows.
    """
    import signal

    from blockgraph.trainer.distributed import STOPPED

    if ending.killed and err.is_terminal:  # rank 0's progress bar had no time to restore the terminal
        err.file.write("\r\x1b[2K\x1b[?25h")
        err.file.flush()
    if ending.signal is not None and not ending.finished:
        err.print(f"[yellow]interrupted[/]: {escape(_last_checkpoint(out_dir))}")
        raise typer.Exit(128 + ending.signal)
    if ending.failed is None:
        return
    rank, code = ending.failed, ending.codes[ending.failed]
    if code == 1:
        raise typer.Exit(1)
    if code == STOPPED:  # a worker was signalled, not the launcher: all stopped together
        err.print(f"[yellow]interrupted[/]: {escape(_last_checkpoint(out_dir))}")
        raise typer.Exit(130)
    if code < 0:
        try:
            how = f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"was killed by signal {-code}"
    else:
        how = f"failed (exit status {code})"
    processes = len(ending.codes)
    err.print(f"[red]stopped[/]: process {rank} of {processes} {how}; {escape(_last_checkpoint(out_dir))}")
    raise typer.Exit(1)


def _run_name(spec: str | None) -> str:
    """The default run directory's name: the spec's stem, or the folder of an imported model or run."""
    from blockgraph.trainer.checkpoint import NAME

    path = Path(spec or "run").absolute()
    return path.parent.name if path.name == NAME else path.stem


def _command(function: Any, parameters: list[inspect.Parameter]) -> Any:
    """`function` with the signature Typer reads its options from (it takes them as keyword arguments)."""

    @functools.wraps(function)
    def command(**values: Any) -> None:
        function(**values)

    context = inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
    command.__signature__ = inspect.Signature([context, *parameters])  # type: ignore[attr-defined]
    return command


train = _command(_train, [*RUN_OPTIONS, *command_parameters()])


CheckpointArg = Annotated[
    Path,
    typer.Argument(
        metavar="MODEL",
        help="A run directory of `train`, its checkpoint/ or a consolidated checkpoint, or a model of "
        "`blockgraph import`.",
    ),
]
TextArg = Annotated[
    list[str] | None,
    typer.Argument(
        metavar="[SENTENCE]...", help="Sentences ('-': one per line from standard input).", show_default=False
    ),
]
FileOpt = Annotated[Path | None, typer.Option("--file", "-f", metavar="IN.txt", help="Sentences, one per line.")]
MOST_TOKENS = 100_000  # the longest output a flag may ask for (a model's positions cap it further)
BatchOpt = Annotated[int, typer.Option(min=1, max=1_000_000, metavar="N", help="Sentences decoded together.")]
BeamOpt = Annotated[int, typer.Option(min=1, max=1024, metavar="K", help="Beam size; 1 decodes greedily.")]
AlphaOpt = Annotated[
    float, typer.Option(min=0.0, max=10.0, metavar="A", help="GNMT length penalty α of beam search (0: none).")
]
NBestOpt = Annotated[
    int, typer.Option(min=1, max=1024, metavar="N", help="Print this many beam hypotheses with their scores.")
]
DeviceOpt = Annotated[str, typer.Option(metavar="DEVICE", help="cpu or cuda.")]
PrecisionOpt = Annotated[
    str,
    typer.Option(
        metavar="PRECISION",
        help="Decode in float32, bfloat16, float16 (GPU) or int8 (Linear weights, CPU). Lower is faster, within "
        "docs/generation.md's measured agreement with float32.",
    ),
]
CompileOpt = Annotated[
    bool,
    typer.Option("--compile", help="Run the decoding step through torch.compile (the first batch compiles it: slow)."),
]
TokenizerOpt = Annotated[
    str | None,
    typer.Option(
        metavar="NAME",
        help="Tokenizer of both sides instead of the checkpoint's: chars, words, space or MODULE:FUNCTION; "
        "a checkpoint trained with a user tokenizer needs it named here again.",
    ),
]
SrcTokenizerOpt = Annotated[str | None, typer.Option(metavar="NAME", help="As --tokenizer, for the source side only.")]
TgtTokenizerOpt = Annotated[str | None, typer.Option(metavar="NAME", help="As --tokenizer, for the target side only.")]


def translate(
    checkpoint_dir: CheckpointArg,
    text: TextArg = None,
    file: FileOpt = None,
    batch_size: BatchOpt = 32,
    beam: BeamOpt = 1,
    max_len: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=MOST_TOKENS,
            metavar="N",
            help="Longest output in tokens (default: 2 × source + 10; of --features, the model's positions).",
        ),
    ] = None,
    alpha: AlphaOpt = 0.0,
    n_best: NBestOpt = 1,
    device: DeviceOpt = "cpu",
    precision: PrecisionOpt = "float32",
    compile_step: CompileOpt = False,
    tokenizer: TokenizerOpt = None,
    src_tokenizer: SrcTokenizerOpt = None,
    tgt_tokenizer: TgtTokenizerOpt = None,
    features: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE",
            help="Decode the float features of a .npy or .safetensors file into text instead of sentences, one line "
            "per utterance: an imported Whisper's log-mel spectrogram, mel × frames (or utterances × mel × frames).",
        ),
    ] = None,
    attention: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE",
            help="Also draw each sentence's cross-attention weights as heatmaps labelled with the source and target "
            "tokens (per layer and head, and averaged) into FILE.html (self-contained), FILE.svg or FILE.png.",
        ),
    ] = None,
) -> None:
    """Translate sentences with a trained checkpoint (greedy or beam search); a language model continues them.

    One line out per line in, in order, decoded `--batch-size` at a time. A classifier's checkpoint prints
    each text's most likely label and its probability. An imported speech model (Whisper) writes out the text
    of audio features given with --features. With --attention, each sentence is decoded alone and its best
    translation's attention maps are drawn.
    """
    from blockgraph.trainer import checkpoint, model_path, pretrained
    from blockgraph.trainer.features import read_features
    from blockgraph.trainer.generation import Translator
    from blockgraph.trainer.roles import ModelIO, Roles

    if attention is not None:
        from blockgraph.trainer import attention_maps

        attention_maps.check_path(attention)  # before the model is read
        if features is not None or n_best > 1:
            raise UsageError(Problem("--attention draws the best translation of sentences: drop --features/--n-best"))
    given = model_path.resolve(checkpoint_dir).trained("translate")
    if features is not None:
        if text or file is not None:
            raise UsageError(Problem("--features decodes a file of features: give no sentences beside it"))
        if given.imported is None:
            raise UsageError(
                Problem("only an imported model reads float features", hint="import a Whisper directory first")
            )
        _own_tokenizer(tokenizer or src_tokenizer or tgt_tokenizer)
        translator = pretrained.load(
            given.imported, device=device, compiled=compile_step, precision=precision, note=_note
        )
        if not translator.features:
            raise UsageError(Problem("this model reads text, not float features", hint="give it sentences"))
        values = read_features(features, translator.model.typed_graph, translator.roles.src or "")
        decoded = translator.decode_features(
            values, beam=beam, max_len=max_len, alpha=alpha, n_best=n_best, batch_size=batch_size
        )
        _print(decoded, n_best, streamed=False)
        return
    sentences = _sentences(text, file)
    if given.imported is not None:
        _own_tokenizer(tokenizer or src_tokenizer or tgt_tokenizer)
        translator = pretrained.load(
            given.imported, device=device, compiled=compile_step, precision=precision, note=_note
        )
    else:
        saved = checkpoint.load(
            given.run("translate"), device=device, tokenizers=(src_tokenizer or tokenizer, tgt_tokenizer or tokenizer)
        )
        roles = Roles(**saved.info["roles"])
        if roles.kind == "classify" and attention is not None:
            raise UsageError(Problem("a classifier has no translation to draw the attention of: drop --attention"))
        if roles.kind == "classify":
            model, io = saved.model.eval(), ModelIO(roles)
            for sentence in sentences:
                label, probability = classify(model, io, saved.tgt_vocab, saved.labels or [], sentence, device)
                write_plain(f"{label}\t{probability:.3f}")
            return
        translator = Translator.of_checkpoint(saved, compiled=compile_step, precision=precision, note=_note)
    if attention is not None:
        _draw_attention(translator.attention(sentences, beam=beam, max_len=max_len, alpha=alpha), attention)
        return
    results = translator.translate(
        sentences, beam=beam, max_len=max_len, alpha=alpha, n_best=n_best, batch_size=batch_size,
        window=_window(text),
    )  # fmt: skip
    _print(results, n_best, streamed=text in (None, ["-"]))


def generate(
    checkpoint_dir: CheckpointArg,
    text: TextArg = None,
    file: FileOpt = None,
    max_new: Annotated[int, typer.Option(min=1, max=MOST_TOKENS, metavar="N", help="Most new tokens per prompt.")] = 50,
    temperature: Annotated[
        float | None,
        typer.Option(
            min=0.01, max=100.0, metavar="T", help="Sample at this temperature (1: the model's own distribution)."
        ),
    ] = None,
    top_k: Annotated[
        int | None, typer.Option(min=1, max=2**31 - 1, metavar="K", help="Sample among the K most likely tokens only.")
    ] = None,
    top_p: Annotated[
        float | None,
        typer.Option(
            min=0.0, max=1.0, metavar="P", help="Sample among the most likely tokens that make up probability P."
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(min=0, max=MAX_SEED, metavar="SEED", help="Seed of the sampling (default: a fresh one each run)."),
    ] = None,
    beam: BeamOpt = 1,
    alpha: AlphaOpt = 0.0,
    n_best: NBestOpt = 1,
    batch_size: BatchOpt = 32,
    device: DeviceOpt = "cpu",
    precision: PrecisionOpt = "float32",
    compile_step: CompileOpt = False,
    tokenizer: TokenizerOpt = None,
) -> None:
    """Continue prompts with a trained language model: greedily, with beam search, or sampling.

    Sampling (with --temperature, --top-k or --top-p) draws each token from the model's distribution, so the
    same --seed gives the same text. Each prompt's continuation is printed after the prompt, one line per prompt.
    """
    from blockgraph.trainer import model_path, pretrained
    from blockgraph.trainer.generation import Translator

    given = model_path.resolve(checkpoint_dir).trained("generate")
    prompts = _sentences(text, file)
    if given.imported is not None:
        _own_tokenizer(tokenizer)
        translator = pretrained.load(
            given.imported, device=device, compiled=compile_step, precision=precision, note=_note
        )
    else:
        translator = Translator.load(
            given.run("generate"),
            device=device,
            tokenizers=(tokenizer, tokenizer),
            compiled=compile_step,
            precision=precision,
            note=_note,
        )
    if translator.seq2seq:
        raise UsageError(Problem("this checkpoint is an encoder–decoder", hint="translate with `blockgraph translate`"))
    results = translator.generate(
        prompts, max_new=max_new, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
        beam=beam, alpha=alpha, n_best=n_best, batch_size=batch_size, window=_window(text),
    )  # fmt: skip
    _print(results, n_best, streamed=text in (None, ["-"]))


def import_(
    directory: Annotated[
        Path,
        typer.Argument(
            metavar="HF_DIR", help="A Hugging Face-format model directory: config.json and model.safetensors."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="OUT", help="The directory to write.")],
) -> None:
    """Import a pretrained Hugging Face-format model: its spec (variables from config.json), weights, tokenizer.

    config.json's model_type picks a registered family (builder/families/, and plugins'; an unknown one is
    refused with the list). Anything that cannot be reproduced exactly (an option the spec does not implement,
    a tensor left over or missing) is refused; pickle files (pytorch_model.bin) are never opened.
    """
    from blockgraph.builder.families import FAMILIES
    from blockgraph.trainer import pretrained

    with err.status("importing …"):
        report = pretrained.import_pretrained(directory, out)
    family = FAMILIES[report.model_type]
    if family.tokenizer is None:
        missing = "none (the model reads no text)"
    elif family.generates:
        missing = "none (translate and generate need one)"
    else:  # an encoder (BERT, CLIP): its texts are token ids the original's tokenizer makes
        missing = "none (encode texts with the original's tokenizer)"
    err.print(
        f"imported {report.model_type}: {report.tensors} tensors, {report.parameters:,} parameters, "
        f"tokenizer: {report.tokenizer or missing}"
    )
    tokenizer = ", tokenizer/" if report.tokenizer else ""
    err.print(f"wrote {escape(str(out))}: spec.yaml (edit, inspect, build it), model/{tokenizer}, pretrained.json")


def consolidate(
    run: Annotated[
        Path, typer.Argument(metavar="RUN", help="A run of --strategy fsdp: its directory or its checkpoint/.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="DIR", help="The ordinary checkpoint to write.")],
) -> None:
    """Gather a sharded checkpoint (--strategy fsdp) into an ordinary one: the whole model in safetensors.

    The result translates, exports, inspects and resumes as any checkpoint does; it needs the memory of the
    whole model and its optimizer state in this one process.
    """
    from blockgraph.trainer import model_path, sharded

    model_path.resolve(run).run("consolidate")
    with err.status("consolidating …"):
        written = sharded.consolidate(run, out)
    err.print(f"wrote {escape(str(written))}: model/ (safetensors), state.safetensors, trainer.json")


def _own_tokenizer(given: str | None) -> None:
    if given is not None:
        raise UsageError(
            Problem("an imported model decodes with its own tokenizer", hint="leave out --tokenizer options")
        )


def _draw_attention(found: Iterable[SentenceAttention], path: Path) -> None:
    """Print each translation as it is done, then write the attention maps of them all to `path`."""
    from blockgraph.trainer import attention_maps

    drawn = []
    for sentence in found:
        write_plain(sentence.translation)
        drawn.append(sentence)
    attention_maps.write(path, drawn)
    err.print(f"attention maps: {escape(str(path))}")


def _note(text: str) -> None:
    err.print(f"[yellow]note:[/] {escape(text)}")


def _window(text: list[str] | None) -> int:
    """Batches read ahead and decoded sorted by length: 64 of a --file or of arguments; standard input is
    decoded batch by batch, each printed before the next is read."""
    return 1 if text == ["-"] else 64


def _sentences(text: list[str] | None, file: Path | None) -> Iterator[str]:
    """The sentences of the arguments, of standard input ('-') or of --file, one per line (bounded)."""
    if file is not None:
        if text:
            raise UsageError(Problem("sentences given both as arguments and with --file", hint="give one of them"))
        return _lines(read_lines(file, SENTENCES), str(file))
    if not text:
        raise UsageError(Problem("no sentences", hint="give them as arguments, '-' for standard input, or --file"))
    if text == ["-"]:
        import sys

        return _lines(stream_lines(sys.stdin.buffer, "<stdin>", SENTENCES), "<stdin>")
    return iter(text)


def _lines(numbered: Iterable[tuple[int, bytes]], where: str) -> Iterator[str]:
    for number, raw in numbered:
        try:
            yield raw.decode("utf-8").removesuffix("\r")
        except UnicodeDecodeError:
            raise SENTENCES.fail(where, "the line is not UTF-8 text", "give the sentences as UTF-8", number) from None


def _print(results: Iterable[list], n_best: int, *, streamed: bool) -> None:
    """One line per sentence (n_best > 1: each hypothesis with its score), as each batch is done; a progress
    line on a terminal while sentences stream in from a file or standard input."""
    import sys

    progress = None
    if streamed and err.is_terminal and not sys.stdout.isatty():  # the outputs go to a file: show the count
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        columns = (SpinnerColumn(), TextColumn("{task.completed} sentences"), TimeElapsedColumn())
        progress = Progress(*columns, console=err, transient=True)
        task = progress.add_task("decoding", total=None)
        progress.start()
    try:
        for outputs in results:
            for output in outputs:
                write_plain(f"{output.score:.3f}\t{output.text}" if n_best > 1 else output.text)
            if progress is not None:
                progress.advance(task)
    finally:
        if progress is not None:
            progress.stop()


def classify(model, io, vocab, labels: list[str], sentence: str, device: str = "cpu") -> tuple[str, float]:
    """A classifier's most likely label for `sentence` and its probability."""
    import torch

    from blockgraph.trainer.vocab import UNK_ID, tokenize

    ids = vocab.encode_text(sentence)
    if not ids:
        raise DataError(Problem(f"nothing to classify in {excerpt(sentence)}"))
    unknown = [t for t, i in zip(tokenize(sentence, vocab.tokenizer), ids, strict=True) if i == UNK_ID]
    if unknown:
        err.print(f"[yellow]note:[/] not in the vocabulary: {escape(' '.join(unknown))}")
    with torch.no_grad():
        probs = io(model, torch.tensor([ids], device=device))[0].float().exp()
    best = int(probs.argmax())
    label = labels[best] if best < len(labels) else str(best)
    return label, float(probs[best])


SENTENCES = FileKind("sentences", DataError, limit=4 * GiB)
