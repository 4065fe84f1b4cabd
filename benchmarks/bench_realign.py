"""ReAlign throughput and memory: streaming fit+apply against the I/O floor, an in-memory numpy version and,
optionally, the method authors' own script.

    python benchmarks/bench_realign.py                          # full: 200k x 768 timings, RSS at 100k/1M x 1280
    python benchmarks/bench_realign.py --rows 20000 --dim 64 --rss-rows 20000 50000 --rss-dim 64   # quick
    python benchmarks/bench_realign.py --rows 200000 --image-rows 100000 --caches warm --rss-rows \\
        --authors-script /path/to/ReVision/embed_ReAlign.py   # side by side with the authors' script

All inputs are synthetic float32 .npy files on disk (``--rows`` text rows, ``--image-rows`` image rows,
default as many as text). Each variant is timed with a warm page cache (inputs read once before timing: the
floor is then the cost of moving the bytes through this process) and/or cold (``--caches``; the inputs'
cached pages dropped first with ``posix_fadvise(DONTNEED)``, which touches only these files: the floor is
then mostly the disk). Every timed run starts with no output file in place, so deleting a previous output
is counted for no variant. Figures:

- I/O floor: read both inputs once and write a text-sized float32 output once, with our I/O primitives.
- streaming realign: ``fit_files`` (fit + apply, the full ReAlign recipe), as the ``realign`` stage runs it; also
  given as a multiple of the floor.
- plain in-memory numpy: everything loaded, float64, the formulas written out, one ``np.save``.
- authors' script (``--authors-script``, warm cache only): ``embed_ReAlign.py`` from the authors' ReVision
  repository (github.com/Yu-xm/ReVision), run as a subprocess on the same vectors written in the format
  their ``embed.py`` produces (one pickled list of ``{"id", "embed"}`` records per file, at most 200,000
  records a file; the rows stay float32 so both read the same numbers). Its time is the subprocess's wall
  time, interpreter start included (printed separately); "speed-up" is their time / our streaming time,
  both from this run.

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

AUTHORS_RECORDS_PER_FILE = 200_000  # embed.py's --records_per_pkl default
# What in_memory writes out and the authors' script runs: every ReAlign step on (not params.yaml's realign block,
# which may be set to another method). noise_std, seed and shrinkage are unused by method realign.
FULL_REALIGN = Recipe(method="realign", anchor=True, trace=True, centroid=True, noise_std=0.1, seed=0, shrinkage=0.1)


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


def read_bytes(folder: Path) -> int:
    return sum(len(path.read_bytes()) for path in sorted(folder.iterdir()))


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


# ------------------------------------------------------------------------------- the authors' script


def write_authors_pickle(npy: Path, folder: Path, prefix: str) -> Path:
    """``npy`` as their script reads it: files ``<prefix>_<part>.pkl``, each a pickled list of records.

    The only pickle in the project: it writes files for the authors' script to read, and reads none.
    """
    import pickle

    folder.mkdir(parents=True)
    rows = np.load(npy, mmap_mode="r")
    for part, start in enumerate(range(0, len(rows), AUTHORS_RECORDS_PER_FILE), start=1):
        block = np.array(rows[start:start + AUTHORS_RECORDS_PER_FILE])
        records = [{"id": f"{prefix}_{start + i}", "embed": row} for i, row in enumerate(block)]
        with open(folder / f"{prefix}_{part}.pkl", "wb") as handle:
            pickle.dump(records, handle, protocol=pickle.HIGHEST_PROTOCOL)
    return folder


def authors_command(script: Path, text_dir: Path, image_dir: Path, out: Path, chunk_size: int) -> list[str]:
    return [sys.executable, str(script), "--input_dir", str(text_dir), "--img_input_dir", str(image_dir),
            "--output_dir", str(out), "--mean_file_path", str(out / "mean_vector.pkl"),
            "--chunk_size", str(chunk_size)]


def run_authors(command: list[str], out: Path) -> None:
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not any((out / "trace").glob("*.pkl")):  # their script logs its errors and exits 0
        raise RuntimeError(f"the authors' script wrote no output; see {out / 'process_trace.log'}")


def startup_seconds() -> float:
    """What starting their interpreter and its imports costs, without any work."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import numpy, tqdm"], check=True)
    return time.perf_counter() - start


def time_authors(script: Path, work: Path, text: Path, image: Path, chunk_size: int, repeat: int) -> dict:
    """Best wall time of their script over ``repeat`` runs, warm cache; the pickles are written untimed."""
    text_dir = write_authors_pickle(text, work / "authors_text", "text")
    image_dir = write_authors_pickle(image, work / "authors_image", "image")
    out = work / "authors_out"
    command = authors_command(script, text_dir, image_dir, out, chunk_size)

    def before():
        shutil.rmtree(out, ignore_errors=True)
        read_bytes(text_dir), read_bytes(image_dir)

    seconds = best_time(lambda: run_authors(command, out), repeat, before)
    shutil.rmtree(out), shutil.rmtree(text_dir), shutil.rmtree(image_dir)
    return {"authors_warm_s": seconds, "authors_startup_s": startup_seconds(), "authors_command": command}


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


def remove(*paths: Path) -> None:
    for path in paths:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def timing_run(work: Path, args: argparse.Namespace) -> dict:
    text = write_synthetic(work / "text.npy", args.rows, args.dim, seed=0)
    image = write_synthetic(work / "image.npy", args.image_rows, args.dim, seed=1)
    outputs = {"io_floor": work / "floor.npy", "streaming": work / "stream", "in_memory": work / "memory.npy"}
    variants = {
        "io_floor": lambda: io_floor(text, image, outputs["io_floor"], args.chunk_rows),
        "streaming": lambda: fit_files(text, image, outputs["streaming"], FULL_REALIGN, args.chunk_rows),
        "in_memory": lambda: in_memory(text, image, outputs["in_memory"]),
    }
    caches = {"warm": lambda: (read_all(text, args.chunk_rows), read_all(image, args.chunk_rows)),
              "cold": lambda: evict(text, image)}
    results = {}
    for cache in args.caches:
        for name, fn in variants.items():
            before = lambda out=outputs[name], warm_or_evict=caches[cache]: (remove(out), warm_or_evict())  # noqa: E731
            results[f"{name}_{cache}_s"] = best_time(fn, args.repeat, before)
    if args.authors_script:
        results.update(time_authors(args.authors_script, work, text, image, args.authors_chunk_size,
                                    args.authors_repeat))
    streamed, loaded = np.load(outputs["streaming"] / "aligned_text.npy"), np.load(outputs["in_memory"])
    results["max_abs_diff_streaming_vs_in_memory"] = float(np.abs(streamed - loaded).max())
    remove(text, image, *outputs.values())
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
    fit_files(text, image, out, FULL_REALIGN, chunk_rows)
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


def report_timings(t: dict, args: argparse.Namespace) -> None:
    print(f"fit+apply, {args.rows} text + {args.image_rows} image rows x {args.dim}, float32 .npy, "
          f"chunk_rows={args.chunk_rows}, best of {args.repeat}:")
    for cache in args.caches:
        floor, stream, memory = (t[f"{n}_{cache}_s"] for n in ("io_floor", "streaming", "in_memory"))
        print(f"  {cache} page cache:")
        print(f"    I/O floor (read inputs once, write output once): {floor:7.2f} s")
        print(f"    streaming realign (fit_files):                   {stream:7.2f} s  "
              f"= {stream / floor:.1f}x floor")
        print(f"    plain in-memory numpy (load, compute, save):     {memory:7.2f} s  "
              f"-> streaming / in-memory = {stream / memory:.2f}")
    if "authors_warm_s" in t:
        stream = t["streaming_warm_s"]
        print(f"  authors' embed_ReAlign.py, warm page cache, best of {args.authors_repeat}:")
        print(f"    {' '.join(t['authors_command'])}")
        print(f"    their wall time: {t['authors_warm_s']:7.2f} s (of which interpreter start + imports "
              f"{t['authors_startup_s']:.2f} s)")
        print(f"    ours (streaming): {stream:6.2f} s  -> speed-up {t['authors_warm_s'] / stream:.1f}x;  "
              f"ours = {stream / t['io_floor_warm_s']:.1f}x the I/O floor ({t['io_floor_warm_s']:.2f} s)")
    print(f"  max |streaming - in-memory| = {t['max_abs_diff_streaming_vs_in_memory']:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000, help="text rows for the timings")
    parser.add_argument("--image-rows", type=int, default=None, help="image rows for the timings (default: --rows)")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--rss-rows", type=int, nargs="*", default=[100_000, 1_000_000], help="sizes for peak RSS")
    parser.add_argument("--rss-dim", type=int, default=1280)
    parser.add_argument("--chunk-rows", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=2, help="timings keep the best of this many runs")
    parser.add_argument("--caches", nargs="+", choices=("warm", "cold"), default=["warm", "cold"])
    parser.add_argument("--workdir", type=Path, default=None, help="where the synthetic files go (default: a temp dir)")
    parser.add_argument("--authors-script", type=Path, default=None,
                        help="the authors' embed_ReAlign.py, to time side by side (warm cache)")
    parser.add_argument("--authors-chunk-size", type=int, default=10_000, help="their --chunk_size (their default)")
    parser.add_argument("--authors-repeat", type=int, default=1, help="their time is the best of this many runs")
    parser.add_argument("--rss-child", nargs=4, metavar=("TEXT", "IMAGE", "OUT", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        text, image, out, chunk = args.rss_child
        return rss_child(text, image, out, int(chunk))
    args.image_rows = args.rows if args.image_rows is None else args.image_rows
    if args.authors_script and "warm" not in args.caches:
        parser.error("--authors-script compares warm-cache times: keep warm in --caches")

    work = Path(tempfile.mkdtemp(prefix="bench_realign_", dir=args.workdir))
    try:
        if args.rows:
            report_timings(timing_run(work, args), args)
        for rows in args.rss_rows:
            r = rss_run(work, rows, args.rss_dim, args.chunk_rows)
            print(f"peak RSS, {rows} + {rows} rows x {args.rss_dim} ({r['input_gib']:.1f} GiB of inputs): "
                  f"{r['peak_rss_mib']:.0f} MiB (after imports {r['baseline_rss_mib']:.0f} MiB), {r['seconds']:.1f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
