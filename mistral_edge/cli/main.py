"""`mistral-edge` entry point: registers the commands and turns EdgeError into one line + exit 1."""

from __future__ import annotations

import sys

import typer

from ..errors import EdgeError
from . import commands

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Export Mistral-architecture models, quantized, to edge devices.")


@app.callback()
def _root() -> None:
    """Export Mistral-architecture models, quantized, to edge devices."""


for _name, _fn in commands.COMMANDS.items():
    app.command(_name)(_fn)


def main() -> None:
    try:
        app()
    except EdgeError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
