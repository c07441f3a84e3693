"""`netvlad` command line: `main()` is the console script.

Library errors (`NetVLADError`) and failed file operations print one line `error: <cause>` on
stderr and exit with code 1 (a full disk as `error: disk full: …`).
"""

import sqlite3
import sys
from importlib.metadata import entry_points

import typer

from netvlad.cli.app import app
from netvlad.cli import data_commands, eval_commands, index_commands, model_commands  # noqa: F401  (they register their commands)
from netvlad.errors import NetVLADError
from netvlad.storage import is_disk_full

__all__ = ["app", "main"]

PLUGIN_GROUP = "netvlad.commands"


def register_plugins() -> None:
    """Let `training` and `service` add their commands (`train`, `serve`, …) to `app`."""
    for entry in entry_points(group=PLUGIN_GROUP):
        try:
            register = entry.load()
        except ImportError as exc:  # a partial install must not break the other commands
            typer.echo(f"warning: command '{entry.name}' unavailable: {exc}", err=True)
            continue
        register(app)


def main() -> None:
    """Run the CLI and turn expected errors into one line on stderr."""
    register_plugins()
    try:
        app()  # usage errors: one line and exit code 2 (see netvlad.cli.app)
    except (NetVLADError, OSError, sqlite3.OperationalError) as exc:
        message = f"disk full: {exc}" if is_disk_full(exc) else str(exc)
        typer.echo(f"error: {' '.join(message.split())}", err=True)  # one line, whatever the message
        sys.exit(1)
