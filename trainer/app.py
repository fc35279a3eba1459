"""`python -m trainer` (and `torchrun -m trainer`): the train and translate commands as a small Typer app.

The same functions are meant to be registered on blockgraph's own command line in cli.py.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from trainer import commands


def make_app() -> typer.Typer:
    from cli import State, user_errors

    app = typer.Typer(
        name="trainer",
        help="Train blockgraph specs and translate with the trained models.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )

    @app.callback()
    def options(
        debug: Annotated[bool, typer.Option("--debug", help="Show Python tracebacks for errors.")] = False,
    ) -> None:
        State.debug = debug

    app.command("train")(user_errors(commands.train))
    app.command("translate")(user_errors(commands.translate))
    return app


app = make_app()


def main() -> None:
    sys.exit(app())
