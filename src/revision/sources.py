"""The real datasets that ship inside packages: easy-VQA (pip) and Fashion-MNIST (Debian).

Each source yields ``Item``s: one image with its attributes (the ground truth captions and questions are
generated from) and, for easy-VQA, the dataset's own questions.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from revision.errors import InputError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
]
EASYVQA_COLOURS = {"red", "green", "blue", "yellow", "teal", "brown", "black", "gray"}
EASYVQA_SHAPES = {"circle", "rectangle", "triangle"}


@dataclass
class Item:
    id: str
    source: str
    attrs: dict[str, str]
    pixels: np.ndarray  # HxW (grey) or HxWx3 uint8
    questions: list[tuple[str, str]] = field(default_factory=list)

    def image(self) -> Image.Image:
        return Image.fromarray(self.pixels)


def _shape_geometry(pixels: np.ndarray) -> dict[str, str]:
    """Size and position of the single shape, from pixels that differ from the background corner."""
    ys, xs = np.nonzero(_shape_mask(pixels))
    if len(xs) == 0:
        return {"size": "medium", "position": "center"}
    h, w = pixels.shape[:2]
    area = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1) / (h * w)
    size = "small" if area < 0.12 else "large" if area > 0.3 else "medium"
    cx, cy = xs.mean() / w, ys.mean() / h
    col = "left" if cx < 0.4 else "right" if cx > 0.6 else ""
    row = "top" if cy < 0.4 else "bottom" if cy > 0.6 else ""
    position = f"{row} {col}".strip() or "center"
    return {"size": size, "position": position}


def _named(attribute: str, words: set[str]) -> dict[str, str]:
    """``{attribute: word}`` when a question names exactly one such word (easy-VQA questions never name two)."""
    return {attribute: next(iter(words))} if len(words) == 1 else {}


def _easyvqa_attrs(questions: list[tuple[str, str]]) -> dict[str, str]:
    """Colour and shape from the answers, and from the shape or colour a question names ("what color is
    the triangle?" tells the shape, "what is the blue shape?" the colour)."""
    attrs: dict[str, str] = {}
    absent: set[str] = set()
    for question, answer in questions:
        words = set(question.rstrip("?").split())
        if answer in EASYVQA_COLOURS:
            attrs["colour"] = answer
            attrs.update(_named("shape", words & EASYVQA_SHAPES))
        elif answer in EASYVQA_SHAPES:
            attrs["shape"] = answer
            attrs.update(_named("colour", words & EASYVQA_COLOURS))
        elif (answer == "yes") != bool(words & {"not", "no"}):  # a true statement names what is there
            attrs.update(_named("colour", words & EASYVQA_COLOURS))
            attrs.update(_named("shape", words & EASYVQA_SHAPES))
        else:
            absent.update(words & EASYVQA_SHAPES)
    if "shape" not in attrs and len(EASYVQA_SHAPES - absent) == 1:
        attrs["shape"] = next(iter(EASYVQA_SHAPES - absent))
    return attrs


def _shape_mask(pixels: np.ndarray) -> np.ndarray:
    return np.abs(pixels.astype(int) - pixels[0, 0].astype(int)).sum(-1) > 60


def _pixel_features(pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Mean shape colour, and how much of its bounding box the shape fills (rectangle > circle > triangle)."""
    mask = _shape_mask(pixels)
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return {}
    box = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
    return {"colour": pixels[mask].mean(0), "shape": np.array([mask.sum() / box])}


def _fill_missing(items: list[Item], where: Path) -> None:
    """Some images' questions never name the colour or the shape: take the label whose mean pixel feature
    over the labelled images is nearest."""
    feats = {item.id: _pixel_features(item.pixels) for item in items}
    for attr, labels in (("colour", EASYVQA_COLOURS), ("shape", EASYVQA_SHAPES)):
        means = {
            label: np.mean([feats[i.id][attr] for i in items if i.attrs.get(attr) == label and feats[i.id]], axis=0)
            for label in labels
        }
        for item in items:
            if attr not in item.attrs and feats[item.id]:
                item.attrs[attr] = min(means, key=lambda label: np.linalg.norm(means[label] - feats[item.id][attr]))
            if attr not in item.attrs:
                raise InputError(f"{where}: image {item.id}: no {attr} in its questions and no shape in its pixels")


def load_easyvqa(split: str) -> list[Item]:
    """easy-VQA ``train`` (4,000 images) or ``test`` (1,000): coloured shapes with questions."""
    import easy_vqa

    root = Path(easy_vqa.__file__).parent / "data" / split
    questions: dict[int, list[tuple[str, str]]] = {}
    for text, answer, image_id in json.loads((root / "questions.json").read_text()):
        questions.setdefault(image_id, []).append((text, answer))
    items = []
    for image_id in sorted(questions):
        pixels = np.asarray(Image.open(root / "images" / f"{image_id}.png").convert("RGB"))
        attrs = _easyvqa_attrs(questions[image_id])
        attrs.update(_shape_geometry(pixels))
        items.append(Item(f"easyvqa-{split}-{image_id}", "easyvqa", attrs, pixels, questions[image_id]))
    _fill_missing(items, root / "questions.json")
    for item in items:
        item.attrs["class_name"] = item.attrs["shape"]
    return items


def _read_idx(path: Path, offset: int) -> np.ndarray:
    if not path.exists():
        raise InputError(f"{path}: not found; install the Debian package dataset-fashion-mnist")
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def _garment_tone(pixels: np.ndarray) -> str:
    on = pixels[pixels > 20]
    level = on.mean() if len(on) else 0
    return "dark" if level < 90 else "light" if level > 150 else "mid-grey"


def _garment_extent(pixels: np.ndarray) -> str:
    """How much of the frame the garment covers (share of lit pixels; train-set tertiles ~0.36 / 0.54)."""
    share = float((pixels > 20).mean())
    return "small" if share < 0.36 else "large" if share > 0.54 else "medium"


def _garment_texture(pixels: np.ndarray) -> str:
    """Plain or patterned: the mean jump between neighbouring lit pixels (train-set tertiles ~25 / 34)."""
    lit = pixels > 20
    jumps = np.abs(np.diff(pixels.astype(np.float32), axis=1))[lit[:, 1:] & lit[:, :-1]]
    level = float(jumps.mean()) if len(jumps) else 0.0
    return "plain" if level < 25 else "textured" if level > 34 else "patterned"


def load_fashion_mnist(split: str, limit: int | None = None) -> list[Item]:
    """Fashion-MNIST ``train`` (60,000) or ``t10k`` (10,000) 28x28 grey images, 10 classes."""
    labels = _read_idx(FASHION_MNIST_DIR / f"{split}-labels-idx1-ubyte.gz", 8)
    images = _read_idx(FASHION_MNIST_DIR / f"{split}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    n = len(labels) if limit is None else min(limit, len(labels))
    items = []
    for i in range(n):
        attrs = {
            "class_name": FASHION_MNIST_CLASSES[labels[i]],
            "tone": _garment_tone(images[i]),
            "extent": _garment_extent(images[i]),
            "texture": _garment_texture(images[i]),
        }
        items.append(Item(f"fmnist-{split}-{i}", "fashion_mnist", attrs, images[i]))
    return items
