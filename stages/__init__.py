"""Thin Typer stage commands: read params, call the library, write outputs, log to MLflow."""

import sys
from pathlib import Path


def _import_the_working_copy() -> None:
    """DVC runs a queued experiment in a temporary copy of the repository, while the editable install points
    `revision` (and `python -m stages`' library imports) at the workspace's code: code edited after queueing
    would run under the commit's hashes. When the working folder holds the project, its own code is imported."""
    here = Path.cwd()
    if (here / "stages" / "__init__.py").is_file() and (here / "src" / "revision" / "__init__.py").is_file():
        sys.path[:0] = [str(here), str(here / "src")]
        __path__[:] = [str(here / "stages")]


_import_the_working_copy()
