"""The one typer application behind the `netvlad` console script.

Command modules in this package attach their commands to `app`; commands that live outside the
library (training, service) register through the `netvlad.commands` entry-point group, so the
library never imports them.

Usage errors (unknown option, bad choice, value out of range, `typer.BadParameter` raised by a
command) end like library errors: one line `error: <cause>` on stderr, exit code 2.
"""

import sys

import typer
from typer._click.exceptions import ClickException, NoArgsIsHelpError  # typer vendors click since 0.25
from typer.core import TyperGroup


class OneLineErrorGroup(TyperGroup):
    """A typer group that reports click usage errors as one line instead of a usage panel."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except NoArgsIsHelpError as exc:  # `netvlad` or `netvlad train` alone: the help
            exc.show()
            sys.exit(exc.exit_code)
        except ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            typer.echo(f"error: {' '.join(exc.format_message().split())}{hint}", err=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)  # `typer.Exit(code)` returns its code here


app = typer.Typer(
    name="netvlad",
    cls=OneLineErrorGroup,
    help="Image retrieval and visual place recognition with NetVLAD.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
