"""The ``revision`` command: one subcommand per pipeline stage."""

from __future__ import annotations

import functools
import importlib
import sys
from pathlib import Path

import typer

from revision.config import apply_profile
from revision.errors import InputError
from revision.tracking import apply_offline_defaults

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


STAGES = (
    "prepare", "encoder", "embed", "visual", "realign", "lm", "pretrain", "finetune", "evaluate", "chat", "export", "lmms_task",
    "study",
)


def stages_to_register(argv: list[str]) -> tuple[str, ...]:
    """Only the stage being run: each stage imports its own heavy libraries (open_clip, transformers, ...),
    and a DVC stage should not pay seconds for the others'. ``--help`` and anything else get them all."""
    module = argv[1].replace("-", "_") if len(argv) > 1 else ""
    return (module,) if module in STAGES else STAGES


for name in stages_to_register(sys.argv):
    module = importlib.import_module(f"stages.{name}")
    app.command(module.NAME, help=module.HELP)(clean_errors(module.main))


@app.command("profile")
@clean_errors
def profile(
    name: str = typer.Argument(..., help="a profile under profiles/, e.g. 'tiny'"),
    params: Path = typer.Option(Path("params.yaml"), help="params file to rewrite"),
) -> None:
    """Merge profiles/NAME.yaml over params.yaml (e.g. `revision profile tiny` for a 1-minute smoke run)."""
    path = Path("profiles") / f"{name}.yaml"
    if not path.exists():
        raise InputError(f"{path}: no such profile (have: {', '.join(p.stem for p in Path('profiles').glob('*.yaml'))})")
    apply_profile(path, params)
    typer.echo(f"{params}: merged {path}")
