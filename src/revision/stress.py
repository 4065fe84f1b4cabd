"""A controlled modality-gap stress: every image embedding moved along the direction the text classes use.

The direction is the first principal axis of the text class centroids, the axis a model reading text
embeddings relies on most to tell classes apart. Shifting images by ``amount`` along it (then re-normalizing)
widens the gap exactly where it hurts: a reader trained on raw text misreads the shifted images, while an
alignment that matches the image mean undoes most of it. The encoder is unchanged, so every other step runs
as it would on an encoder with a large gap.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

STRESS_FILE = "stress.json"


def class_direction(vectors: np.ndarray, labels: Sequence[str]) -> np.ndarray:
    """Unit vector of the first principal axis of the per-class means (sign fixed: largest entry positive)."""
    labels = np.asarray(labels)
    classes = sorted(set(labels.tolist()))
    if len(classes) < 2:
        raise ValueError(f"the stress direction needs at least two text classes, got {classes}")
    centroids = np.stack([vectors[labels == c].astype(np.float64).mean(axis=0) for c in classes])
    axis = np.linalg.svd(centroids - centroids.mean(axis=0), full_matrices=False)[2][0]
    return axis * np.sign(axis[np.argmax(np.abs(axis))])


def shift_images(vectors: torch.Tensor, direction: np.ndarray, amount: float) -> torch.Tensor:
    """``normalize(x + amount * direction)`` row by row."""
    moved = vectors + amount * torch.as_tensor(direction, dtype=vectors.dtype, device=vectors.device)
    return torch.nn.functional.normalize(moved, dim=-1)


def class_spread(vectors: np.ndarray, labels: Sequence[str], direction: np.ndarray) -> dict[str, float]:
    """Where each class centroid lies along ``direction`` (for the record of how big the shift is)."""
    labels = np.asarray(labels)
    return {c: float(vectors[labels == c].mean(axis=0) @ direction) for c in sorted(set(labels.tolist()))}
