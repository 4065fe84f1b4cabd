"""How good is a dual encoder? Zero-shot classification of eval images and the modality gap."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from revision.captions import COLOUR_WORDS, GARMENT_WORDS
from revision.encoders import batched
from revision.images import read_rows
from revision.layout import EVAL, read_manifest
from revision.sources import EASYVQA_COLOURS, EASYVQA_SHAPES, FASHION_MNIST_CLASSES

# (task, source, label column, prompt template, labels)
TASKS = [
    ("fashion_mnist_class", "fashion_mnist", "class_name", "A photo of a {}.", FASHION_MNIST_CLASSES),
    ("easyvqa_colour", "easyvqa", "colour", "A {} shape.", sorted(EASYVQA_COLOURS)),
    ("easyvqa_shape", "easyvqa", "class_name", "A {}.", sorted(EASYVQA_SHAPES)),
]


def _prompt_word(label: str) -> str:
    return GARMENT_WORDS.get(label, COLOUR_WORDS.get(label, [label]))[0]


def zero_shot_accuracy(encode_text, image_emb: np.ndarray, table: pd.DataFrame) -> dict[str, float]:
    """Accuracy of nearest class prompt for each task whose source appears in ``table`` (rows = image_emb)."""
    metrics = {}
    for task, source, column, template, labels in TASKS:
        rows = (table["source"] == source).to_numpy()
        if not rows.any():
            continue
        prompts = encode_text([template.format(_prompt_word(label)) for label in labels])
        predicted = np.asarray(labels)[(image_emb[rows] @ prompts.T).argmax(1)]
        metrics[f"zeroshot_{task}"] = float((predicted == table.loc[rows, column].to_numpy()).mean())
    return metrics


def modality_gap(text_emb: np.ndarray, image_emb: np.ndarray) -> float:
    """Distance between the centroids of normalized text and image embeddings."""
    return float(np.linalg.norm(text_emb.mean(0) - image_emb.mean(0)))


def evaluate_encoder(encoder, prepared: Path, batch_size: int) -> dict[str, float]:
    """Zero-shot accuracy on the eval images, and the gap between their first reference captions and them."""
    table = read_manifest(prepared, EVAL)
    if table.empty:
        return {}
    where = prepared / EVAL.file
    rows = [(row, prepared / path) for row, path in enumerate(table["image"])]
    encode = lambda batch: encoder.encode_images(read_rows(batch, where))  # noqa: E731
    images = batched(encode, rows, batch_size, "eval").numpy()
    captions = [c[0] for c in table["captions"]]
    texts = batched(encoder.encode_text, captions, batch_size, quiet=True).numpy()
    encode_text = lambda prompts: encoder.encode_text(prompts).numpy()  # noqa: E731
    return {**zero_shot_accuracy(encode_text, images, table), "modality_gap": modality_gap(texts, images)}
