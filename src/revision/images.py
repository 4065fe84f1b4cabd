"""Reading image files, with errors that name the file and the manifest row it came from."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from revision.errors import InputError


def read_image(path: str | Path, where: str) -> Image.Image:
    """Open and fully decode ``path`` as RGB (so a truncated file fails here, not mid-batch)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{where}: image file not found: {path}")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:
        raise InputError(f"{where}: unreadable image {path}: {err}") from None



def read_rows(rows: list[tuple[int, str | Path]], where: str | Path) -> list[Image.Image]:
    """The images of manifest rows given as (row index, path); an error names ``where`` and the row."""
    return [read_image(path, f"{where}: row {row}") for row, path in rows]
