"""The one typer application behind the `netvlad` console script.

Command modules in this package attach their commands to `app`; commands that live outside the
library (training, service) register through the `netvlad.commands` entry-point group, so the
library never imports them.
"""

import typer

app = typer.Typer(
    name="netvlad",
    help="Image retrieval and visual place recognition with NetVLAD.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
