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

