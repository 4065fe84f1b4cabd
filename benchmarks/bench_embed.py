"""Embed throughput: the `embed` stage's code path versus a bare forward loop of the same encoder.

Both run in this process on the same rows; the stage path also reads image files, gathers across
processes and writes safetensors shards. Needs `dvc repro embed` (or `revision prepare` + `revision
encoder`) to have produced data/prepared and data/encoder.

    python benchmarks/bench_embed.py --images 1000 --texts 4000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from accelerate import Accelerator

from revision.embedding_jobs import EmbedJob, embed_job
from revision.encoders import load_encoder
from revision.images import read_image


def bare_loop(fn, items: list, batch_size: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for s in range(0, len(items), batch_size):
            fn(items[s : s + batch_size])
    return len(items) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--encoder", type=Path, default=Path("data/encoder"))
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--texts", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    encoder, identity = load_encoder(args.encoder)
    pool = pd.read_parquet(args.prepared / "image_pool.parquet").head(args.images)
    texts = pd.read_parquet(args.prepared / "text_corpus.parquet").head(args.texts)
    paths = [args.prepared / p for p in pool["image"]]
    accelerator = Accelerator()
    print(f"encoder {identity['name']} ({identity['id']}), {torch.get_num_threads()} threads, batch {args.batch_size}")
    with tempfile.TemporaryDirectory() as tmp:
        for modality, ids, items in (("text", texts["id"], texts["text"].tolist()), ("image", pool["id"], paths)):
            job = EmbedJob(modality, modality, ids.astype(str).tolist(), items, "bench")
            stage = embed_job(encoder, identity, job, Path(tmp), args.batch_size, 4096, accelerator)
            if modality == "text":
                bare = bare_loop(encoder.encode_text, items, args.batch_size)
            else:
                images = [read_image(p, "bench") for p in paths]  # decoded up front: the loop is pure compute
                bare = bare_loop(encoder.encode_images, images, args.batch_size)
            print(f"{modality:5s} rows={len(items):6d}  stage {stage:8.1f}/s  bare loop {bare:8.1f}/s  ratio {stage / bare:.2f}")


if __name__ == "__main__":
    main()
