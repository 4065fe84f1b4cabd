"""ReAlign throughput and memory: streaming fit+apply against the I/O floor and an in-memory numpy version.

    python benchmarks/bench_realign.py                          # full: 200k x 768 timings, RSS at 100k/1M x 1280
    python benchmarks/bench_realign.py --rows 20000 --dim 64 --rss-rows 20000 50000 --rss-dim 64   # quick

All inputs are synthetic float32 .npy files on disk (text and images, ``--rows`` each). Each variant is
timed twice over: with a warm page cache (inputs read once before timing: the floor is then the cost of
moving the bytes through this process) and cold (the inputs' cached pages dropped first with
``posix_fadvise(DONTNEED)``, which touches only these files: the floor is then mostly the disk).

Peak RSS is measured in a fresh subprocess per size from ``VmHWM`` in ``/proc/self/status`` (the resident
high-water mark of this process image), falling back to ``getrusage`` where there is no /proc: ``ru_maxrss``
alone would also count the parent's pages at the fork.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from revision.realign import NpyRowWriter, Recipe, fit_files, open_embeddings


def write_synthetic(path: Path, rows: int, dim: int, seed: int, chunk_rows: int = 65536) -> Path:
    """Anisotropic, unnormalized float32 rows, generated and written chunk by chunk (flat memory)."""
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=dim).astype(np.float32)
    scales = np.linspace(1.5, 0.1, dim, dtype=np.float32) * (0.5 + seed)
    writer = NpyRowWriter(path, rows, dim)
    for start in range(0, rows, chunk_rows):
        n = min(chunk_rows, rows - start)
        block = np.random.default_rng([seed, start]).standard_normal((n, dim), dtype=np.float32)
        writer(start, centre + block * scales)
    writer.close()
    return path


def read_all(path: Path, chunk_rows: int) -> int:
    return sum(len(c.values) for c in open_embeddings(path).chunks(chunk_rows))


def io_floor(text: Path, image: Path, out: Path, chunk_rows: int) -> None:
    """Read both inputs once and write a text-sized float32 output once, with the same I/O primitives."""
    source = open_embeddings(text)
    writer = NpyRowWriter(out, source.count, source.dim)
    for chunk in source.chunks(chunk_rows):
        writer(chunk.row, chunk.values)
    writer.close()
    read_all(image, chunk_rows)


def in_memory(text: Path, image: Path, out: Path) -> None:
    """The plain numpy version: everything loaded, float64, the formulas written out, one np.save."""
    t = np.load(text).astype(np.float64)
    v = np.load(image).astype(np.float64)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    mu_t, mu_v = t.mean(0), v.mean(0)
    scale = np.sqrt(((v - mu_v) ** 2).sum(1).mean() / ((t - mu_t) ** 2).sum(1).mean())
    h = (t - mu_t) * scale + mu_v
    h /= np.linalg.norm(h, axis=1, keepdims=True)
    h += mu_v - h.mean(0)
    h /= np.linalg.norm(h, axis=1, keepdims=True)
    np.save(out, h.astype(np.float32))


def evict(*paths: Path) -> None:
    """Drop these files' pages from the page cache (written pages are flushed first, else they stay)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def best_time(fn, repeat: int, before=lambda: None) -> float:
    times = []
    for _ in range(repeat):
        before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def timing_run(work: Path, rows: int, dim: int, chunk_rows: int, repeat: int) -> dict:
    text = write_synthetic(work / "text.npy", rows, dim, seed=0)
    image = write_synthetic(work / "image.npy", rows, dim, seed=1)
    variants = {
        "io_floor": lambda: io_floor(text, image, work / "floor.npy", chunk_rows),
        "streaming": lambda: fit_files(text, image, work / "stream", Recipe(), chunk_rows),
        "in_memory": lambda: in_memory(text, image, work / "memory.npy"),
    }
    results = {}
    for cache, before in (("warm", lambda: (read_all(text, chunk_rows), read_all(image, chunk_rows))),
                          ("cold", lambda: evict(text, image))):
        for name, fn in variants.items():
            results[f"{name}_{cache}_s"] = best_time(fn, repeat, before)
    streamed, loaded = np.load(work / "stream" / "aligned_text.npy"), np.load(work / "memory.npy")
    results["max_abs_diff_streaming_vs_in_memory"] = float(np.abs(streamed - loaded).max())
    for name in ("text.npy", "image.npy", "floor.npy", "memory.npy"):
        (work / name).unlink()
    shutil.rmtree(work / "stream")
    return results


def peak_rss_mib() -> float:
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_child(text: str, image: str, out: str, chunk_rows: int) -> None:
    """Runs in a fresh process: fit + apply once, print peak RSS (MiB) before and after as JSON."""
    baseline = peak_rss_mib()
    start = time.perf_counter()
    fit_files(text, image, out, Recipe(), chunk_rows)
    seconds = time.perf_counter() - start
    peak = peak_rss_mib()
    print(json.dumps({"baseline_rss_mib": baseline, "peak_rss_mib": peak, "seconds": seconds}))


def rss_run(work: Path, rows: int, dim: int, chunk_rows: int) -> dict:
    text = write_synthetic(work / "rss_text.npy", rows, dim, seed=0)
    image = write_synthetic(work / "rss_image.npy", rows, dim, seed=1)
    cmd = [sys.executable, __file__, "--rss-child", str(text), str(image), str(work / "rss_out"), str(chunk_rows)]
    result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    result["input_gib"] = 2 * rows * dim * 4 / 2**30
    text.unlink(), image.unlink()
    shutil.rmtree(work / "rss_out")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000, help="text rows and image rows for the timings")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--rss-rows", type=int, nargs="*", default=[100_000, 1_000_000], help="sizes for peak RSS")
    parser.add_argument("--rss-dim", type=int, default=1280)
    parser.add_argument("--chunk-rows", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=2, help="timings keep the best of this many runs")
    parser.add_argument("--workdir", type=Path, default=None, help="where the synthetic files go (default: a temp dir)")
    parser.add_argument("--rss-child", nargs=4, metavar=("TEXT", "IMAGE", "OUT", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        text, image, out, chunk = args.rss_child
        return rss_child(text, image, out, int(chunk))

    work = Path(tempfile.mkdtemp(prefix="bench_realign_", dir=args.workdir))
    try:
        if args.rows:
            t = timing_run(work, args.rows, args.dim, args.chunk_rows, args.repeat)
            print(f"fit+apply, {args.rows} text + {args.rows} image rows x {args.dim}, float32 .npy, "
                  f"chunk_rows={args.chunk_rows}, best of {args.repeat}:")
            for cache in ("warm", "cold"):
                floor, stream, memory = (t[f"{n}_{cache}_s"] for n in ("io_floor", "streaming", "in_memory"))
                print(f"  {cache} page cache:")
                print(f"    I/O floor (read inputs once, write output once): {floor:7.2f} s")
                print(f"    streaming realign (3 text passes + 1 image):     {stream:7.2f} s  "
                      f"= {stream / floor:.1f}x floor")
                print(f"    plain in-memory numpy (load, compute, save):     {memory:7.2f} s  "
                      f"-> streaming / in-memory = {stream / memory:.2f}")
            print(f"  max |streaming - in-memory| = {t['max_abs_diff_streaming_vs_in_memory']:.2e}")
        for rows in args.rss_rows:
            r = rss_run(work, rows, args.rss_dim, args.chunk_rows)
            print(f"peak RSS, {rows} + {rows} rows x {args.rss_dim} ({r['input_gib']:.1f} GiB of inputs): "
                  f"{r['peak_rss_mib']:.0f} MiB (after imports {r['baseline_rss_mib']:.0f} MiB), {r['seconds']:.1f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
