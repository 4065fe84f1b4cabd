"""What the MLLM stages train on: (embedding, LLaVA-style conversation) pairs.

Stage 1 pairs each embedding with a caption request whose answer is the very text the embedding came from
(ReVision: the embedding is aligned text standing in for an image); ``stage1_samples`` is where
``pretrain.source`` picks that embedding. Stage 2 pairs real image embeddings with the SFT conversations.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from revision.captions import CAPTION_PROMPTS, TEXT_ONLY_PROMPTS
from revision.embedding_sets import EmbeddingSet
from revision.errors import InputError
from revision.layout import (
    ALIGNED_TEXT,
    PRETRAIN_IMAGES,
    PRETRAIN_PAIRS,
    SFT,
    TEXT,
    TEXT_CORPUS,
    Manifest,
    positions,
    read_manifest,
)
from revision.objectives import Batch


class EmbeddingConversations(Dataset):
    """(embedding, conversation) samples; ``images`` are the (manifest row, path) of each sample's image where it
    has one (stage-1 text has none). Two optional per-sample fields travel into each ``Batch`` when set:
    ``targets`` (Ross's target tokens) and ``has_image`` (VoRA's mix of text-only samples)."""

    def __init__(
        self, vectors: np.ndarray, conversations: list[list[dict[str, str]]],
        images: list[tuple[int, Path]] | None = None,
    ):
        if len(vectors) != len(conversations):
            raise ValueError(f"{len(vectors)} embeddings for {len(conversations)} conversations")
        self.vectors, self.conversations = torch.from_numpy(np.ascontiguousarray(vectors, np.float32)), conversations
        self.images = images
        self.targets: torch.Tensor | None = None
        self.has_image: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, index: int) -> dict:
        item = {"vectors": self.vectors[index], "conversations": self.conversations[index]}
        for name in ("targets", "has_image"):
            if getattr(self, name) is not None:
                item[name] = getattr(self, name)[index]
        return item

    def lengths(self) -> list[int]:
        """Characters per conversation, which track its tokens closely enough to batch by length."""
        return [sum(len(turn["value"]) for turn in conversation) for conversation in self.conversations]

    def digest(self) -> str:
        """Changes whenever any vector, conversation or target does (so a stale checkpoint is never resumed)."""
        content = hashlib.sha256(self.vectors.numpy().tobytes())
        content.update(json.dumps(self.conversations, sort_keys=True).encode())
        for extra in (self.targets, self.has_image):
            if extra is not None:
                content.update(extra.numpy().tobytes())
        return content.hexdigest()


def collate(rows: list[dict]) -> Batch:
    """The samples' fields, stacked (conversations as a list)."""
    stacked = {name: torch.stack([row[name] for row in rows]) for name in rows[0] if name != "conversations"}
    return Batch(conversations=[row["conversations"] for row in rows], **stacked)


def vectors_by_id(embeddings: EmbeddingSet, ids: list[str], manifest: Path, rows: list[int] | None = None) -> np.ndarray:
    """Rows of ``embeddings`` in the order of ``ids``; every id must be there. ``rows`` are the manifest rows
    the ids come from (0, 1, ... unless a subsample), so an error points at the right entry."""
    position = positions(embeddings.ids(), embeddings.dir / "ids.parquet")
    rows = list(range(len(ids))) if rows is None else rows
    missing = [(row, i) for row, i in zip(rows, ids) if i not in position]
    if missing:
        row, id_ = missing[0]
        raise InputError(f"{manifest}: row {row}: id {id_!r} has no embedding in {embeddings.dir} ({len(missing)} missing)")
    return embeddings.load()[[position[i] for i in ids]]


def subsample(n: int, max_samples: int | None, seed: int) -> list[int]:
    if max_samples is None or max_samples >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), max_samples))


def caption_samples(
    embeddings: EmbeddingSet, table: pd.DataFrame, text_column: str, manifest: Path, max_samples: int | None, seed: int
) -> EmbeddingConversations:
    """Stage 1: "<image> + caption request" -> the text itself, for each row of ``table``."""
    keep = subsample(len(table), max_samples, seed)
    table = table.iloc[keep]
    vectors = vectors_by_id(embeddings, table["id"].astype(str).tolist(), manifest, keep)
    rng = random.Random(seed)
    conversations = [
        [{"from": "human", "value": f"<image>\n{rng.choice(CAPTION_PROMPTS)}"}, {"from": "gpt", "value": text}]
        for text in table[text_column]
    ]
    return EmbeddingConversations(vectors, conversations, _image_rows(table, keep, manifest.parent))


# pretrain.source -> (the embedding set stage 1 reads, given the embeddings and realign folders; the manifest
# and column holding each embedding's text)
STAGE1_SOURCES: dict[str, tuple[Callable[[Path, Path], Path], Manifest, str]] = {
    "aligned": (lambda embeddings, realign: realign / ALIGNED_TEXT, TEXT_CORPUS, "text"),  # ReVision
    "raw": (lambda embeddings, realign: embeddings / TEXT.name, TEXT_CORPUS, "text"),  # the same text, unaligned
    "paired": (lambda embeddings, realign: embeddings / PRETRAIN_IMAGES.name, PRETRAIN_PAIRS, "caption"),  # LLaVA-style
    "none": (lambda embeddings, realign: embeddings / TEXT.name, TEXT_CORPUS, "text"),  # no stage 1: identity only
}


def stage1_samples(
    source: str, prepared: Path, embeddings: Path, realign: Path, max_samples: int | None, seed: int,
    visual: Path | None = None,
) -> tuple[EmbeddingConversations | None, EmbeddingSet]:
    """Stage 1's samples for ``pretrain.source`` (None for ``none``) and the embedding set they come from (its
    encoder, and its shape for a new projector). ``visual``: read the paired images' rows from this folder (the
    visual stage's: grid features or pixels) instead of their pooled embeddings; only paired or none sources."""
    vectors_of, manifest, column = STAGE1_SOURCES[source]
    vectors = EmbeddingSet(vectors_of(embeddings, realign) if visual is None else visual / PRETRAIN_IMAGES.name)
    if source == "none":
        return None, vectors
    table = read_manifest(prepared, manifest)
    return caption_samples(vectors, table, column, prepared / manifest.file, max_samples, seed), vectors


def with_text_only(samples: EmbeddingConversations, prepared: Path, share: float, seed: int) -> EmbeddingConversations:
    """VoRA's stage-1 mix: ``samples`` (each with an image) and text-only ones from the unpaired text corpus,
    ``share`` of the whole. A text-only sample is a caption request without a placeholder answered by a corpus
    text, with zero pixels the model never reads; every sample carries its has-image flag."""
    table = read_manifest(prepared, TEXT_CORPUS, needs=("text",))
    wanted = round(len(samples) * share / (1 - share))
    if wanted > len(table):
        raise InputError(f"{prepared / TEXT_CORPUS.file}: a text share of {share} next to {len(samples)} image samples "
                         f"needs {wanted} texts; the corpus has {len(table)}")
    texts = table["text"].iloc[subsample(len(table), wanted, seed)]
    rng = random.Random(seed)
    conversations = [
        [{"from": "human", "value": rng.choice(TEXT_ONLY_PROMPTS)}, {"from": "gpt", "value": text}] for text in texts
    ]
    vectors = samples.vectors.numpy()
    mixed = EmbeddingConversations(
        np.concatenate([vectors, np.zeros((wanted, vectors.shape[1]), np.float32)]), samples.conversations + conversations
    )
    mixed.has_image = torch.arange(len(mixed)) < len(samples)
    return mixed


def sft_samples(images: EmbeddingSet, prepared: Path, max_samples: int | None, seed: int) -> EmbeddingConversations:
    """Stage 2: the SFT conversations with their images' embeddings."""
    records = read_manifest(prepared, SFT)
    keep = subsample(len(records), max_samples, seed)
    records = records.iloc[keep]
    vectors = vectors_by_id(images, records["id"].tolist(), prepared / SFT.file, keep)
    return EmbeddingConversations(vectors, records["conversations"].tolist(), _image_rows(records, keep, prepared))


def _image_rows(table: pd.DataFrame, rows: list[int], prepared: Path) -> list[tuple[int, Path]] | None:
    """(manifest row, image path) of each sample, for a manifest with images."""
    if "image" not in table.columns:
        return None
    return [(row, prepared / path) for row, path in zip(rows, table["image"])]
