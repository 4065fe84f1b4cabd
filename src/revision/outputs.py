"""Atomic outputs: a stage writes into a temporary sibling and renames it into place only when done,
so a crash never leaves half a result for DVC to cache."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from revision.errors import InputError


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def _replace(tmp: Path, path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    os.replace(tmp, path)


@contextmanager
def atomic_dir(path: str | Path, keep_partial: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces ``path`` on success and is removed on error.

    ``keep_partial`` keeps the temporary directory (an existing one and, unless the error is bad input,
    the one being written) so a resumable writer can pick up the pieces an interrupted run finished.
    """
    path = Path(path)
    tmp = _tmp_sibling(path)
    if tmp.exists() and not keep_partial:
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
    except BaseException as err:
        if not keep_partial or isinstance(err, InputError):
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace(tmp, path)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file path that replaces ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_json(path: str | Path, obj) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def fingerprint(*parts) -> str:
    """Identifies a run's inputs, so its partial output or checkpoint is only resumed by a run with the same inputs."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tree_digest(folder: str | Path) -> str:
    """sha256 over every file's relative path and bytes under ``folder``."""
    content = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        content.update(str(path.relative_to(folder)).encode())
        with path.open("rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                content.update(block)
    return content.hexdigest()
