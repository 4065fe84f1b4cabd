"""A user's own data: LLaVA JSON conversations and the ReVision ``dataset.json`` (unpaired lists).

Every malformed entry is an ``InputError`` naming the file and the entry index; a missing or unreadable
image file is named too. Nothing is dropped silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from revision.errors import InputError
from revision.images import read_image
from revision.layout import positions


@dataclass
class UserImage:
    id: str
    path: Path


def _load_json(path: Path):
    if not path.exists():
        raise InputError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None


def _object(entry, where: str) -> dict:
    if not isinstance(entry, dict):
        raise InputError(f"{where}: expected an object, got {type(entry).__name__}")
    return entry


def _field(entry, key: str, where: str) -> str:
    if not isinstance(_object(entry, where).get(key), str) or not entry[key].strip():
        raise InputError(f"{where}: missing or empty '{key}'")
    return entry[key]


def _unique(ids: list[str], path: Path, what: str) -> None:
    positions(ids, path, lambda row: f"{what}[{row}]")


def read_revision_dataset(path: str | Path) -> tuple[list[UserImage], list[dict[str, str]]]:
    """``{"images": [{"id", "image"}], "texts": [{"id", "text"}]}``; image paths relative to the file."""
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("texts"), list):
        raise InputError(f"{path}: expected an object with 'images' and 'texts' lists")
    images = []
    for row, entry in enumerate(data["images"]):
        where = f"{path}: images[{row}]"
        image = UserImage(_field(entry, "id", where), path.parent / _field(entry, "image", where))
        read_image(image.path, where)
        images.append(image)
    texts = [
        {"id": _field(e, "id", f"{path}: texts[{r}]"), "text": _field(e, "text", f"{path}: texts[{r}]").strip()}
        for r, e in enumerate(data["texts"])
    ]
    _unique([i.id for i in images], path, "images")
    _unique([t["id"] for t in texts], path, "texts")
    return images, texts


def read_llava(path: str | Path) -> list[dict]:
    """LLaVA JSON: ``[{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}]``.

    Returns records with the image path resolved against the file's folder and the first assistant
    turn as ``caption``.
    """
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of conversation records")
    records = []
    for row, entry in enumerate(data):
        where = f"{path}: [{row}]"
        record_id = str(_object(entry, where).get("id", ""))
        if not record_id:
            raise InputError(f"{where}: missing 'id'")
        image = path.parent / _field(entry, "image", where)
        turns = entry.get("conversations")
        if not isinstance(turns, list) or len(turns) < 2:
            raise InputError(f"{where} (id {record_id}): 'conversations' must list at least two turns")
        for t, turn in enumerate(turns):
            speaker = turn.get("from") if isinstance(turn, dict) else None
            if speaker not in ("human", "gpt"):
                raise InputError(f"{where}.conversations[{t}]: 'from' must be 'human' or 'gpt'")
            _field(turn, "value", f"{where}.conversations[{t}]")
        if turns[0]["from"] != "human" or not any(t["from"] == "gpt" for t in turns):
            raise InputError(f"{where}: conversation must start with a human turn and contain a gpt turn")
        read_image(image, where)
        caption = next(t["value"] for t in turns if t["from"] == "gpt").strip()
        records.append({"id": record_id, "image": image, "conversations": turns, "caption": caption})
    _unique([r["id"] for r in records], path, "")
    return records
