"""`mistral-edge` entry point: the command list, and the exit contract every command keeps.

Contract: a failure prints one line `error: ...` on stderr, never a traceback or a boxed
message. Exit codes: 0 success, 1 bad input (EdgeError: a file, a value, a bundle), 2 a usage
error (an unknown option, a missing argument, a value of the wrong type), 3 refused or judged
unacceptable (`--moderate`, `moderate`), 130 interrupted;
a reader that closes stdout early (`| head`) ends the command quietly with exit 1.
"""

from __future__ import annotations

import os
import sys

import typer

from ..errors import EdgeError
from . import bundle, compare, export, generate, info, moderate, serve

try:  # typer >= 0.22 vendors click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - older typer on the user's click
    from click.exceptions import ClickException, NoArgsIsHelpError, UsageError

BAD_INPUT, USAGE_ERROR, INTERRUPTED = 1, 2, 130

COMMANDS = (
    ("info", info.info),
    ("export", export.export),
    ("inspect", bundle.inspect),
    ("verify", bundle.verify),
    ("generate", generate.generate),
    ("chat", generate.chat),
    ("moderate", moderate.moderate),
    ("compare", compare.compare),
    ("serve", serve.serve),
)
"""Every command, in the order `--help` lists them (the data flow: model -> bundle -> run -> compare)."""

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Export Mistral-architecture models, quantized, to edge devices.")
for _name, _command in COMMANDS:
    app.command(_name)(_command)


def _error(message: str, status: int) -> int:
    typer.secho(f"error: {' '.join(message.split())}", fg="red", err=True)
    return status


def run(argv: list[str] | None = None) -> int:
    """Run one command line (default: sys.argv[1:]) and return its exit status."""
    try:
        status = app(args=argv, prog_name="mistral-edge", standalone_mode=False)
    except NoArgsIsHelpError as e:  # bare `mistral-edge`: the help, as a usage error
        typer.echo(e.format_message(), err=True)
        return USAGE_ERROR
    except UsageError as e:
        where = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
        return _error(e.format_message() + where, USAGE_ERROR)
    except ClickException as e:
        return _error(e.format_message(), BAD_INPUT)
    except EdgeError as e:
        return _error(str(e) or type(e).__name__, BAD_INPUT)
    except typer.Abort:
        return _error("aborted", INTERRUPTED)
    except BrokenPipeError:  # the reader went away (`| head`): nothing left to tell it
        _drop_stdout()
        return BAD_INPUT
    except OSError as e:  # e.g. stdout closed (EBADF); a file error the command did not foresee
        _drop_stdout()
        return _error(f"{e.strerror or type(e).__name__}{f': {e.filename}' if e.filename else ''}", BAD_INPUT)
    return status if isinstance(status, int) else 0


def _drop_stdout() -> None:
    """Point stdout at the null device, so the interpreter's final flush cannot fail again."""
    sys.stdout = open(os.devnull, "w")


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":  # python -m mistral_edge.cli.main, as the benchmarks run it
    main()
