"""Embed manifests with a frozen encoder, work split across Accelerate processes.

Rows are cut into shards; each process encodes a contiguous slice of the shard, the main process gathers
the slices in rank order and writes the shard, so N processes give exactly the rows of one.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from revision.embeddings import EmbeddingWriter
from revision.encoders import batched
from revision.images import read_image


@dataclass
class EmbedJob:
    """One embedding set: ids and the items to encode (texts, or image paths with the manifest to blame)."""

    name: str
    modality: str  # "text" | "image"
    ids: list[str]
    items: list
    where: str = ""


def jobs_from_manifests(prepared: Path) -> list[EmbedJob]:
    """The unpaired text and image pool, plus the images of every other split and the eval captions."""
    jobs = []

    def images(name: str, table: pd.DataFrame, manifest: str) -> EmbedJob:
        paths = [prepared / p for p in table["image"]]
        return EmbedJob(name, "image", table["id"].astype(str).tolist(), paths, str(prepared / manifest))

    text = pd.read_parquet(prepared / "text_corpus.parquet")
    jobs.append(EmbedJob("text", "text", text["id"].astype(str).tolist(), text["text"].tolist()))
    for name, manifest in [
        ("image_pool", "image_pool.parquet"),
        ("encoder_images", "encoder_pairs.parquet"),
        ("pretrain_images", "pretrain_pairs.parquet"),
        ("eval_images", "eval.parquet"),
    ]:
        jobs.append(images(name, pd.read_parquet(prepared / manifest), manifest))
    sft = pd.DataFrame(json.loads((prepared / "sft.json").read_text()), columns=["id", "image"])
    jobs.append(images("sft_images", sft, "sft.json"))
    evals = pd.read_parquet(prepared / "eval.parquet")
    jobs.append(EmbedJob("eval_text", "text", evals["id"].astype(str).tolist(), [c[0] for c in evals["captions"]]))
    return jobs


def _encode_fn(encoder, job: EmbedJob) -> Callable[[list], torch.Tensor]:
    if job.modality == "text":
        return encoder.encode_text
    return lambda rows: encoder.encode_images([read_image(path, f"{job.where}: row {i}") for i, path in rows])


def embed_job(
    encoder, identity: dict, job: EmbedJob, out: Path, batch_size: int, shard_size: int, accelerator: Accelerator
) -> float:
    """Write ``job`` as an embedding set under ``out`` (main process); returns rows per second."""
    writer = EmbeddingWriter(out / job.name, identity, identity["dim"], shard_size) if accelerator.is_main_process else None
    items = job.items if job.modality == "text" else list(enumerate(job.items))
    start_time = time.perf_counter()
    for start in range(0, len(items), shard_size):
        shard = items[start : start + shard_size]
        with accelerator.split_between_processes(list(range(len(shard)))) as mine:
            part = [shard[i] for i in mine]
            fn = _encode_fn(encoder, job)
            quiet = not accelerator.is_local_main_process
            vectors = batched(fn, part, batch_size, f"{job.name} {start // shard_size}", quiet).numpy()
        gathered = gather_object([vectors.reshape(-1, identity["dim"]).astype(np.float32)])
        if writer:
            writer.add(job.ids[start : start + len(shard)], np.concatenate(gathered))
    if writer:
        writer.close()
    return len(items) / max(time.perf_counter() - start_time, 1e-9)
