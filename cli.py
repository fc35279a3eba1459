"""The `blockgraph` command line: build, inspect, validate, blocks, schema. Errors are rendered here, once."""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer
from rich.markup import escape
from rich.syntax import Syntax
from typer.core import TyperGroup

from blockgraph.common.console import err, out, problems_view, report, write_plain
from blockgraph.common.errors import BlockgraphError, Problem, UsageError
from blockgraph.common.memory import SKIP_FLAG, SKIP_HELP, skip_checks
from blockgraph.common.options import EXTERNAL_FILES_HELP, SET_HELP, parse_pairs
from blockgraph.common.text import clean_json

_APP_OPTIONS = {"--plugin": True, "-p": True, "--allow-override": False, SKIP_FLAG: False}  # takes a value?


def _app_options_first(args: list[str]) -> list[str]:
    """The app's `--plugin`/`--allow-override` moved before the command, where the app parses them, so that
    `blockgraph build SPEC --plugin x.py` works as `blockgraph --plugin x.py build SPEC` (up to a `--`)."""
    front: list[str] = []
    rest: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--":
            rest.extend(args[index:])
            break
        name = arg.split("=", 1)[0] if arg.startswith("--") else arg
        takes_value = _APP_OPTIONS.get(name)
        if takes_value is None:
            rest.append(arg)
        elif takes_value and "=" not in arg and index + 1 < len(args):
            front += [arg, args[index + 1]]
            index += 1
        else:
            front.append(arg)
        index += 1
    return front + rest


class _Group(TyperGroup):
    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, _app_options_first(args))


app = typer.Typer(
    name="blockgraph",
    cls=_Group,
    help="Turn an architecture written as a YAML/JSON spec into a runnable PyTorch model.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
blocks_app = typer.Typer(help="List the registered blocks or show one in detail.", no_args_is_help=False)
app.add_typer(blocks_app, name="blocks")

F = TypeVar("F", bound=Callable[..., Any])

_TYPE_NAMES = {
    "str": "TEXT",
    "int": "N",
    "int range": "N",
    "float": "X",
    "float range": "X",
    "Path": "PATH",
    "bool": "",
}


def _readable_types() -> None:
    """Help shows what an option takes as the classic upper-case metavars (`PATH`, `INTEGER`, `[yaml|json]`),
    a flag nothing: Typer 0.29 prints Python types instead (`--strict <bool>`, `<list[Path]>`)."""
    from typer import core

    def display(self: Any, ctx: Any) -> str:
        if getattr(self, "is_flag", False):
            return ""
        if self.metavar is not None:
            return self.metavar
        shown = self.display_type(ctx).strip("<>")
        if shown.startswith("list[") and shown.endswith("]"):
            shown = shown[5:-1]
        return f"[{shown}]" if "|" in shown else _TYPE_NAMES.get(shown, shown.upper())

    def usage(self: Any) -> str:
        """`SPEC`, `[SENTENCE]...`, `SPECS...` in usage lines (Typer 0.29 writes `{spec}`, `[[SENTENCE]...]...`)."""
        name = self.metavar or (self.name or "").upper()
        if not self.required and not name.startswith("["):
            name = f"[{name}]"
        return name if self.nargs == 1 or name.endswith("...") else f"{name}..."

    core.TyperOption.display_type_rich = display  # type: ignore[method-assign]
    core.TyperArgument.display_type_rich = display  # type: ignore[method-assign]
    core.TyperArgument._usage_display_name = usage  # type: ignore[method-assign]


_readable_types()


class State:
    """The app's own options (given before the command), for every command."""

    debug = False
    plugins: list[str] = []
    allow_override = False


def user_errors(fn: F) -> F:
    """Load the plugins, then run the command; render `BlockgraphError`s as located messages and exit 1
    (`--debug` shows the traceback instead)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            use_plugins()
            return fn(*args, **kwargs)
        except BlockgraphError as exc:
            if State.debug:
                raise
            report(exc)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        from importlib import metadata

        write_plain(f"blockgraph {metadata.version('blockgraph')}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show Python tracebacks for errors.")] = False,
    plugin: Annotated[
        list[str],
        typer.Option(
            "--plugin",
            "-p",
            metavar="FILE_OR_MODULE",
            help="Load blocks from a .py file or an importable module, for any command (repeatable).",
        ),
    ] = [],  # noqa: B006 - Typer reads the default
    allow_override: Annotated[
        bool,
        typer.Option(
            "--allow-override", help="Let plugins replace blocks and model families (model_type) already registered."
        ),
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    skip_memory_check: Annotated[bool, typer.Option(SKIP_FLAG, help=SKIP_HELP)] = False,
) -> None:
    State.debug, State.plugins, State.allow_override = debug, plugin, allow_override
    skip_checks(skip_memory_check)  # for every command, those of the trainer included (common.memory)


def parse_dims(values: list[str]) -> dict[str, int]:
    from blockgraph.builder.spec import MAX_DIM

    dims = {}
    for name, raw in parse_pairs(values, "--dim", typed=False).items():
        text = raw.strip()
        if not (text.isascii() and text.isdigit()) or len(text) > 12 or not 0 < int(text) <= MAX_DIM:
            raise UsageError(Problem(f"--dim {name}={raw[:20]}: sizes are integers from 1 to {MAX_DIM:,}"))
        dims[name] = int(text)
    return dims


def warn(items: list[Problem], strict: bool) -> None:
    from blockgraph.common.errors import SpecError

    if not items:
        return
    if strict:
        raise SpecError([Problem(p.message, p.location, p.hint, "error", p.node) for p in items])
    err.print(problems_view(items))


MODEL_HELP = (
    "A spec file (.yaml, .yml or .json), or a model directory: saved by build --out, a training run or its "
    "checkpoint/, a consolidated checkpoint, an imported model."
)
SpecArg = Annotated[Path, typer.Argument(help=MODEL_HELP, show_default=False)]
SetOpt = Annotated[list[str], typer.Option("--set", "-s", metavar="NAME=VALUE", help=SET_HELP)]
DimOpt = Annotated[
    list[str],
    typer.Option("--dim", "-d", metavar="NAME=SIZE", help="Size of a named dimension: --dim batch=2 (repeatable)."),
]
StrictOpt = Annotated[
    bool, typer.Option("--strict", help="Treat warnings (unused nodes, inputs, variables) as errors.")
]
ExternalOpt = Annotated[
    bool,
    typer.Option("--allow-external-files", help=EXTERNAL_FILES_HELP),
]


def model_path(path: Path) -> Any:
    """What `path` holds (trainer.model_path): a spec file or a model directory, each command takes its part."""
    from blockgraph.trainer.model_path import resolve

    return resolve(path)


def use_plugins() -> None:
    """Installed plugin packages, $BLOCKGRAPH_PLUGINS and --plugin: named ones must load, packages only warn."""
    from blockgraph.builder.plugins import activate

    warn(activate(State.plugins, allow_override=State.allow_override), strict=False)


class Strategy(str, Enum):
    ddp = "ddp"
    fsdp = "fsdp"


class InspectFormat(str, Enum):
    tree = "tree"
    table = "table"
    json = "json"
    mermaid = "mermaid"
    dot = "dot"
    html = "html"
    svg = "svg"
    png = "png"


DtypeOpt = Annotated[
    str | None, typer.Option(help="Floating dtype of the weights: float32, bfloat16, float16, ...", show_default=False)
]


@app.command()
@user_errors
def build(
    spec: SpecArg,
    set_: SetOpt = [],  # noqa: B006 - Typer reads the default
    dim: DimOpt = [],  # noqa: B006
    device: Annotated[str, typer.Option(help="Where the weights live: cpu, cuda, cuda:1, meta.")] = "cpu",
    dtype: DtypeOpt = None,
    strict: StrictOpt = False,
    allow_external_files: ExternalOpt = False,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Save the model (weights, resolved spec, manifest) to this directory."),
    ] = None,
) -> None:
    """Validate SPEC, compile it, run one forward pass on dummy inputs, and print a summary.

    A model directory is loaded with its saved weights (in --dtype, when given) instead.
    """
    import torch

    from blockgraph.builder import footprint, persist, pipeline, trial, views

    weights = pipeline.parse_dtype(dtype)
    given = model_path(spec)
    if out_dir is not None:
        persist.check_destination(out_dir)
    started = time.perf_counter()
    overrides = parse_pairs(set_, "--set", typed=True)
    saved = given.saved_model()
    if saved is None:
        typed = pipeline.typed_graph(given.load_spec(overrides, allow_external_files=allow_external_files))
        warn(typed.graph.warnings, strict)
        checked = time.perf_counter()
        _check_device(device)
        dims = trial.resolve_dims(typed.graph, parse_dims(dim))
        if footprint.checking(device):  # before allocating anything
            need = footprint.build_need(typed, dims, device=device, dtype=weights)
            footprint.check(need, hint=footprint.build_advice(spec))
        measured = time.perf_counter()
        model = pipeline.compile_graph(typed, device=device, dtype=weights)
        built = time.perf_counter()
        seconds = {"validate": checked - started, "memory check": measured - checked, "compile": built - measured}
    else:
        given.no_overrides(overrides)
        _check_device(device)
        model = persist.load(saved, device=device)
        if dtype is not None:
            model.to(pipeline.parse_dtype(dtype))
        typed = model.typed_graph
        warn(typed.graph.warnings, strict)
        dims = trial.resolve_dims(typed.graph, parse_dims(dim))
        held = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        if footprint.checking(device):
            need = footprint.trial_need(typed, dims, device=device, dtype=held)
            footprint.check(need, hint=footprint.build_advice(spec))
        built = time.perf_counter()
        seconds = {"load": built - started}
    inputs = trial.dummy_inputs(typed.graph, dims, device=device, dtype=pipeline.parse_dtype(dtype))
    model.eval()
    outputs = trial.trial_run(model, inputs, dims)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    ran = time.perf_counter()
    seconds["forward"] = ran - built
    weights_dtype = next((p.dtype for p in model.parameters()), torch.float32)
    out.print(views.build_summary(model, outputs, device=device, dtype=weights_dtype, seconds=seconds))
    if out_dir is not None:
        persist.save(model, out_dir)
        out.print(f"saved to {escape(str(out_dir))} (load with builder.load)")


def _check_device(device: str) -> None:
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError as exc:
        raise UsageError(Problem(f"--device {device!r} is not a device", hint="use cpu, cuda, cuda:N or meta")) from exc
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(Problem("--device cuda: no CUDA device is available here", hint="use --device cpu"))
    if parsed.type == "meta":
        raise UsageError(
            Problem("build runs a forward pass, which needs real weights", hint="use `blockgraph inspect` for meta")
        )


@app.command()
@user_errors
def inspect(
    spec: SpecArg,
    set_: SetOpt = [],  # noqa: B006
    dim: DimOpt = [],  # noqa: B006
    depth: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=1000,
            metavar="N",
            help="Collapse repeats and sub-graphs below this depth (tree, table, graphs; graphs draw each repeat "
            "once without it).",
        ),
    ] = None,
    format: Annotated[
        InspectFormat,
        typer.Option(
            "--format",
            "-f",
            help="tree, table, json, mermaid, dot; html (an interactive page), svg or png (a picture of the graph).",
        ),
    ] = InspectFormat.tree,
    output: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Write json, mermaid, dot, html, svg or png to this file (png needs it).",
            show_default=False,
        ),
    ] = None,
    dtype: Annotated[
        str | None, typer.Option(help="Floating dtype activation and training memory are counted in (default float32).")
    ] = None,
    code: Annotated[bool, typer.Option("--code", help="Print the compiled forward as Python.")] = False,
    params: Annotated[
        bool,
        typer.Option(
            "--params",
            help="List every parameter and buffer by its state_dict key (the names tie: takes), with shape and size.",
        ),
    ] = False,
    ranks: Annotated[
        int,
        typer.Option(
            min=1, max=65536, metavar="N", help="Also show what each of N training processes holds (with --strategy)."
        ),
    ] = 1,
    strategy: Annotated[
        Strategy | None,
        typer.Option(help="How the processes share the model: ddp (each holds it all) or fsdp (sharded)."),
    ] = None,
    allow_external_files: ExternalOpt = False,
) -> None:
    """Show the architecture (blocks, shapes, parameters, FLOPs, memory) without allocating any weight."""
    from blockgraph.builder import pipeline, views

    if code and params:
        raise UsageError(Problem("--code and --params print different things", hint="give one of them"))
    if output is not None and (code or params or format in (InspectFormat.tree, InspectFormat.table)):
        shown = "--code" if code else "--params" if params else f"--format {format.value}"
        raise UsageError(
            Problem(f"--out writes a file of the graph; {shown} prints to the terminal", hint="redirect it: > FILE")
        )
    if format is InspectFormat.png and output is None and not params:
        raise UsageError(Problem("--format png is an image, not text", hint="give --out FILE.png"))
    if output is not None:  # refused now (a FIFO, a device, a directory), not after the analysis
        from blockgraph.common.atomic import check_file_target

        check_file_target(output, what=f"{format.value} file")
    valid = model_path(spec).load_spec(
        parse_pairs(set_, "--set", typed=True), allow_external_files=allow_external_files
    )
    typed = pipeline.typed_graph(valid)
    warn(typed.graph.warnings, False)
    if params:  # before compiling: the listing is what a broken `tie:` needs, and it builds the model untied
        listing = views.params_report(typed, format.value)
        if isinstance(listing, str):
            write_plain(listing, json=True)
        else:
            out.print(listing)
        return
    model = pipeline.compile_graph(typed, device="meta")
    if code:
        if out.is_terminal:  # colours on a terminal, long lines folded; plain text into a pipe or a file
            out.print(Syntax(model.code, "python", theme="ansi_dark", word_wrap=True))
        else:
            write_plain(model.code)
        return
    compute_dtype = pipeline.parse_dtype(dtype)
    per_rank = None  # the table of --ranks: after the tree or the table, in the HTML page's totals
    per_process = None  # the same in JSON
    if ranks > 1 or strategy is not None:
        from blockgraph.builder.views import per_rank as shares

        chosen: Literal["ddp", "fsdp"] = "ddp" if strategy is Strategy.ddp else "fsdp"  # fsdp by default
        size = compute_dtype.itemsize if compute_dtype is not None else 4  # float32
        if format is InspectFormat.json:
            per_process = shares.ranks_json(model, ranks, chosen, size)
        elif format in (InspectFormat.tree, InspectFormat.table, InspectFormat.html):
            per_rank = shares.ranks_table(model, ranks, chosen, size)
    report = views.inspect_report(
        typed, model, depth=depth, fmt=format.value, dims=parse_dims(dim), dtype=compute_dtype, per_rank=per_rank
    )
    if per_process is not None:
        assert isinstance(report, str)  # json is text
        report = json.dumps({**json.loads(report), "per_process": per_process})
    if output is not None:
        from blockgraph.common.atomic import write_file

        data = report if isinstance(report, bytes) else (str(report).rstrip("\n") + "\n").encode()
        write_file(output, lambda tmp: tmp.write_bytes(data), what=f"{format.value} file")
        err.print(f"wrote {output}", markup=False)
        return
    if isinstance(report, str):  # json, mermaid, dot, html, svg: as is, never wrapped or read as Rich markup
        write_plain(report, json=format is InspectFormat.json)
        return
    assert not isinstance(report, bytes)  # png needs --out, checked first
    out.print(report)
    if per_rank is not None:
        out.print(per_rank)


class ResolvedFormat(str, Enum):
    yaml = "yaml"
    json = "json"


@app.command()
@user_errors
def validate(
    specs: Annotated[
        list[Path],
        typer.Argument(help="Spec files to check, or model directories (their saved specs).", show_default=False),
    ],
    set_: SetOpt = [],  # noqa: B006
    strict: StrictOpt = False,
    resolved: Annotated[
        ResolvedFormat | None,
        typer.Option(
            help="Print the resolved spec: standalone (extends merged, variables substituted); it validates and "
            "builds the same model."
        ),
    ] = None,
    allow_external_files: ExternalOpt = False,
) -> None:
    """Check specs without allocating weights: exit 0 when all are valid, 1 otherwise."""
    from blockgraph.builder import pipeline
    from blockgraph.builder.source import dump_json, dump_yaml

    overrides = parse_pairs(set_, "--set", typed=True)
    failed = False
    printed = False  # a resolved YAML document: the next one starts with ---
    for path in specs:
        try:
            valid = model_path(path).load_spec(overrides, allow_external_files=allow_external_files)
            typed = pipeline.typed_graph(valid)
            warn(typed.graph.warnings, strict)
            pipeline.compile_graph(typed, device="meta")
        except BlockgraphError as exc:
            if State.debug:
                raise
            failed = True
            err.print(problems_view(exc.problems))
            err.print(f"[red]✗[/] {escape(str(path))}")
            continue
        if resolved is None:
            out.print(f"[green]✓[/] {escape(str(path))}: {len(typed.graph.nodes)} blocks")
        elif resolved is ResolvedFormat.json:
            write_plain(dump_json(valid.resolved()), json=True)
        else:
            write_plain(("---\n" if printed else "") + dump_yaml(valid.resolved()))
            printed = True
    if failed:
        raise typer.Exit(1)


@app.command()
@user_errors
def schema(
    output: Annotated[Path | None, typer.Option("--out", "-o", help="Write to this file instead of stdout.")] = None,
    markdown: Annotated[
        bool, typer.Option("--markdown", help="Print the spec keys as Markdown tables instead.")
    ] = False,
) -> None:
    """Print the JSON Schema of spec files (every registered block's params included) for editors."""
    from blockgraph.builder.schema import fields_markdown, spec_schema

    if markdown:
        write_plain(fields_markdown())
        return

    text = clean_json(json.dumps(spec_schema(), indent=2, ensure_ascii=False))
    if output is None:
        write_plain(text)
    else:
        from blockgraph.common.atomic import write_text

        write_text(output, text + "\n", what="schema file")
        err.print(f"wrote {output}", markup=False)


class ExportFormat(str, Enum):
    exported_program = "exported-program"
    onnx = "onnx"
    hf = "hf"


@app.command()
@user_errors
def export(
    spec: Annotated[Path, typer.Argument(help=MODEL_HELP + " A directory's weights are exported.", show_default=False)],
    format: Annotated[
        ExportFormat,
        typer.Option(
            "--format", "-f", help="exported-program (torch.export, .pt2), onnx, or hf (a Hugging Face directory)."
        ),
    ],
    out_file: Annotated[
        Path, typer.Option("--out", "-o", help="File to write (.pt2 or .onnx), or hf's directory.", show_default=False)
    ],
    set_: SetOpt = [],  # noqa: B006
    dim: DimOpt = [],  # noqa: B006
    with_optional: Annotated[
        bool, typer.Option("--with-optional", help="Make the optional inputs (masks) inputs of the exported model.")
    ] = False,
    max_shard_size: Annotated[
        str | None,
        typer.Option(
            "--max-shard-size",
            metavar="SIZE",
            help="hf only: split the weights into files of at most SIZE (5GB, 500MB, 1GiB) with an index. "
            "Default 5GB, as transformers.",
            show_default=False,
        ),
    ] = None,
    dtype: DtypeOpt = None,
    strict: StrictOpt = False,
    allow_external_files: ExternalOpt = False,
) -> None:
    """Export SPEC (or a model directory's weights) for deployment, its named dimensions (batch, seq, ...) dynamic."""
    from blockgraph.builder import export as exporting
    from blockgraph.builder import footprint, hf_export, persist, pipeline, trial

    if max_shard_size is not None and format is not ExportFormat.hf:
        raise UsageError(
            Problem(
                f"--max-shard-size splits a Hugging Face directory's weights; --format {format.value} is one file",
                hint="leave out --max-shard-size, or export with --format hf",
            )
        )
    shard_limit = hf_export.MAX_SHARD_SIZE if max_shard_size is None else hf_export.shard_size(max_shard_size)
    weights = pipeline.parse_dtype(dtype)
    given = model_path(spec)
    overrides = parse_pairs(set_, "--set", typed=True)
    saved = given.saved_model()
    if saved is not None:
        given.no_overrides(overrides)
        model = persist.load(saved)
        typed = model.typed_graph
        dims = trial.resolve_dims(typed.graph, parse_dims(dim))
        if footprint.checking("cpu"):
            footprint.check(footprint.trial_need(typed, dims), hint=footprint.build_advice(spec, dtype=False))
    else:
        typed = pipeline.typed_graph(given.load_spec(overrides, allow_external_files=allow_external_files))
        warn(typed.graph.warnings, strict)
        dims = trial.resolve_dims(typed.graph, parse_dims(dim))
        if footprint.checking("cpu"):
            footprint.check(footprint.build_need(typed, dims), hint=footprint.build_advice(spec, dtype=False))
        model = pipeline.compile_graph(typed, device="cpu")
    if weights is not None:
        model.to(weights)
    model.eval()
    if format is ExportFormat.hf:
        from blockgraph.trainer import pretrained

        def note(text: str) -> None:
            warn([Problem(text, severity="warning")], strict=False)

        report = pretrained.export(model, given.imported, out_file, note, max_shard_size=shard_limit)
        out.print(
            f"wrote {out_file}: {report.model_type}, {report.tensors} tensors: {', '.join(report.files)}", markup=False
        )
        return
    inputs = trial.dummy_inputs(typed.graph, dims, dtype=weights)
    trial.trial_run(model, inputs, dims)  # what `build` refuses is not exported
    result = exporting.export(
        model, typed, dims, format.value, out_file, include_optional=with_optional, torch_output=State.debug
    )
    warn(result.warnings, strict=False)
    for line in exporting.describe(result, typed):
        out.print(line, markup=False)


@blocks_app.callback(invoke_without_command=True)
@user_errors
def blocks_default(
    ctx: typer.Context,
    markdown: Annotated[
        bool, typer.Option("--markdown", help="Print the built-in block reference as Markdown.")
    ] = False,
) -> None:
    """With no subcommand, list every block (built-in and from plugins)."""
    if markdown:
        from blockgraph.builder import blockdoc

        write_plain(blockdoc.markdown_reference())
    elif ctx.invoked_subcommand is None:
        blocks_list()


@blocks_app.command("list")
@user_errors
def blocks_list(
    pattern: Annotated[
        str,
        typer.Argument(
            help="A word matches the block names and families holding it (attention); a wildcard whole names or "
            "families ('*attn*', 'rnn_?').",
        ),
    ] = "*",
) -> None:
    """Every registered block: name, family, source and summary."""
    from blockgraph.builder import blockdoc

    out.print(blockdoc.list_table(pattern))


@blocks_app.command("show")
@user_errors
def blocks_show(
    name: Annotated[str, typer.Argument(help="Block name.")],
) -> None:
    """A block's parameters, ports, state_dict keys, documentation and an example spec snippet."""
    from blockgraph.builder import blockdoc

    out.print(blockdoc.render_block(blockdoc.lookup(name)))


def _register_training() -> None:
    """`train`, `translate`, `generate`, `import` and `consolidate` live in the trainer package; their errors
    render here like every command's."""
    from blockgraph.trainer import commands

    app.command("train")(user_errors(commands.train))
    app.command("translate")(user_errors(commands.translate))
    app.command("generate")(user_errors(commands.generate))
    app.command("import")(user_errors(commands.import_))
    app.command("consolidate")(user_errors(commands.consolidate))


_register_training()


def main() -> None:
    """Console-script entry point."""
    sys.exit(app())


if __name__ == "__main__":
    main()
