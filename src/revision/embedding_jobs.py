"""Embed manifests with a frozen encoder, work split across Accelerate processes.

Rows are cut into shards; each process encodes a contiguous run of the shard's batches, the main process
gathers them in rank order and writes the shard, so N processes give exactly the rows of one. Shards are
written as they finish, so a killed run resumes from its last whole shard (``finished_rows``).
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from revision.embedding_sets import EmbeddingSet, EmbeddingWriter, complete_shard_rows
from revision.encoders import batched
from revision.images import read_rows
from revision.layout import EMBEDDED_SETS, TEXT, EmbeddedSet, positions, read_manifest
from revision.outputs import atomic_dir, fingerprint
from revision.stress import STRESS_FILE, class_direction, class_spread, shift_images

if TYPE_CHECKING:
    from revision.tracking import StageRun


@dataclass
class EmbedJob:
    """One embedding set: ids and the items to encode (texts, or image paths with the manifest to blame)."""

    name: str
    modality: str  # "text" | "image"
    ids: list[str]
    items: list
    where: str  # the manifest the rows come from, for errors
    labels: list[str] | None = None  # class per row (the text corpus), for the stress direction

    def __post_init__(self):
        positions(self.ids, self.where)  # a repeated id would make two rows of one name


def jobs_from_manifests(prepared: Path, sets: tuple[EmbeddedSet, ...] = EMBEDDED_SETS) -> list[EmbedJob]:
    """One job per set, by default those of ``layout.EMBEDDED_SETS``: the unpaired text and image pool, the
    images of every other split and the eval captions."""
    return [_job(prepared, spec) for spec in sets]


def _job(prepared: Path, spec: EmbeddedSet) -> EmbedJob:
    table = read_manifest(prepared, spec.manifest)
    values = table[spec.column].tolist()
    if spec.first_item:
        values = [value[0] for value in values]
    items = [prepared / path for path in values] if spec.modality == "image" else values
    labels = table["class_name"].astype(str).tolist() if spec is TEXT else None
    return EmbedJob(spec.name, spec.modality, table["id"].tolist(), items, str(prepared / spec.manifest.file), labels)


RESUME_MARKER = "resume.json"


def _stress(jobs: list[EmbedJob], partial: Path, amount: float, accelerator: Accelerator) -> Callable:
    """The image shift of ``revision.stress``, its direction read from the finished text set (main process,
    recorded in stress.json) and shared with every process."""
    direction = None
    if accelerator.is_main_process:
        text = next(j for j in jobs if j.labels is not None)
        vectors = EmbeddingSet(partial / text.name).load()
        direction = class_direction(vectors, text.labels)
        record = {"shift": amount, "direction_from": text.name,
                  "class_positions": class_spread(vectors, text.labels, direction), "direction": direction.tolist()}
        (partial / STRESS_FILE).write_text(json.dumps(record, indent=1))
    direction = broadcast_object_list([direction])[0]
    return lambda vectors: shift_images(vectors, direction, amount)


def finished_rows(partial: Path, jobs: list[EmbedJob], fingerprint: str, shard_size: int) -> dict[str, int]:
    """Rows per job that an interrupted run with the same ``fingerprint`` left in ``partial``; a folder
    left by a run with other inputs is cleared and marked as this run's."""
    marker = partial / RESUME_MARKER
    if not marker.exists() or json.loads(marker.read_text()).get("fingerprint") != fingerprint:
        shutil.rmtree(partial)
        partial.mkdir()
        marker.write_text(json.dumps({"fingerprint": fingerprint}))
        return {}
    done = {}
    for job in jobs:
        folder = partial / job.name
        if (folder / "index.json").exists():
            done[job.name] = len(job.ids)
        elif folder.exists():
            done[job.name] = complete_shard_rows(folder, shard_size)
    return done


def _encode_fn(encoder, job: EmbedJob, image_shift: Callable | None) -> Callable[[list], torch.Tensor]:
    if job.modality == "text":
        return encoder.encode_text
    encode = lambda rows: encoder.encode_images(read_rows(rows, job.where))  # noqa: E731
    return encode if image_shift is None else lambda rows: image_shift(encode(rows))


def embed_job(
    encoder,
    identity: dict,
    job: EmbedJob,
    out: Path,
    batch_size: int,
    shard_size: int,
    accelerator: Accelerator,
    done: int = 0,
    image_shift: Callable | None = None,
) -> float:
    """Write ``job`` as an embedding set under ``out`` (main process), after the ``done`` rows already
    there; returns rows per second."""
    writer = None
    tokens = getattr(encoder, "tokens", 1)  # a GridFeatures view: rows of several tokens
    if accelerator.is_main_process and not (out / job.name / "index.json").exists():
        writer = EmbeddingWriter(out / job.name, identity, encoder.dim, shard_size, job.ids[:done], tokens)
    items = job.items if job.modality == "text" else list(enumerate(job.items))
    fn = _encode_fn(encoder, job, image_shift)
    start_time = time.perf_counter()
    for start in range(done, len(items), shard_size):
        shard = items[start : start + shard_size]
        # processes split whole batches, so every row is encoded in the same batch as with one process
        batch_starts = list(range(0, len(shard), batch_size))
        with accelerator.split_between_processes(batch_starts) as mine:
            part = shard[mine[0] : mine[-1] + batch_size] if mine else []
            quiet = not accelerator.is_local_main_process
            vectors = batched(fn, part, batch_size, f"{job.name} {start // shard_size}", quiet).numpy()
        gathered = gather_object([vectors.reshape(-1, encoder.dim).astype(np.float32)])
        if writer:
            writer.add(job.ids[start : start + len(shard)], np.concatenate(gathered))
    if writer:
        writer.close()
    return (len(items) - done) / max(time.perf_counter() - start_time, 1e-9)


def embed_jobs(
    encoder,
    identity: dict,
    jobs: list[EmbedJob],
    partial: Path,
    batch_size: int,
    shard_size: int,
    accelerator: Accelerator,
    stress_shift: float = 0.0,
) -> dict[str, float]:
    """Every job into ``partial`` (the main process's temporary output folder), after the whole shards an
    interrupted run with the same inputs left there; returns rows per second per job. With ``stress_shift``
    the image sets are moved along the text class direction (``revision.stress``), found once the text set
    is written."""
    job_inputs = [(j.name, j.ids, [str(i) for i in j.items]) for j in jobs]
    inputs = fingerprint(identity, encoder.dim, batch_size, shard_size, stress_shift, job_inputs)  # dim: grid size too
    plan = finished_rows(partial, jobs, inputs, shard_size) if accelerator.is_main_process else None
    done = broadcast_object_list([plan])[0]
    if any(done.values()) and accelerator.is_main_process:
        print("embed: resuming an interrupted run; rows already embedded: " + json.dumps(done), flush=True)
    rates, image_shift = {}, None
    for job in jobs:
        if job.modality == "image" and stress_shift and image_shift is None:
            image_shift = _stress(jobs, partial, stress_shift, accelerator)
        rows_done = done.get(job.name, 0)
        rates[job.name] = embed_job(encoder, identity, job, partial, batch_size, shard_size, accelerator, rows_done, image_shift)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / RESUME_MARKER).unlink()
    return rates


def embed_into(
    out: Path, encoder, identity: dict, jobs: list[EmbedJob], batch_size: int, shard_size: int,
    accelerator: Accelerator, run: StageRun, stress_shift: float = 0.0, records: dict[str, str] | None = None,
) -> dict[str, int]:
    """Every job's set written into ``out`` as a whole (the main process writes; a killed run resumes), with
    ``records`` (file name -> text) beside them; logs the rows and rows per second of each set to ``run`` and
    returns the rows."""
    is_main = accelerator.is_main_process
    with atomic_dir(out, keep_partial=True) if is_main else nullcontext(out) as tmp:
        rates = embed_jobs(encoder, identity, jobs, tmp, batch_size, shard_size, accelerator, stress_shift)
        if is_main:
            for name, text in (records or {}).items():
                (tmp / name).write_text(text)
    rows = {f"rows_{job.name}": len(job.ids) for job in jobs}
    run.log_metrics(rows | {f"rows_per_s_{name}": rate for name, rate in rates.items()})
    return rows
