"""The ``revision`` command: one subcommand per pipeline stage."""

from __future__ import annotations

import functools
import sys

import typer

from revision.errors import InputError
from revision.tracking import apply_offline_defaults
from stages import embed, encoder, prepare

apply_offline_defaults()

app = typer.Typer(
    help="ReVision pipeline: each subcommand is one DVC stage reading its block of params.yaml.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def clean_errors(fn):
    """Bad input ends with one clear line on stderr and exit code 2, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InputError as err:
            typer.echo(f"error: {err}", err=True)
            sys.exit(2)

    return wrapper


for module in (prepare, encoder, embed):
    app.command(module.NAME, help=module.HELP)(clean_errors(module.main))
