"""ReAlign: a training-free map of text embeddings into the image embedding distribution.

Everything works on L2-normalized rows with float64 accumulators, streaming chunk by chunk so memory stays
flat however many rows there are. A fit is one pass over each modality (for unit vectors the mean and the
trace come from one pass: trace = mean ||x||^2 - ||mu||^2), plus one more text pass for ``mu_hat`` when the
centroid step is on; writing the aligned text is one final pass. The means are taken in float64; the
``realign`` map itself (the ``mu_hat`` pass and the output) runs on float32 rows through per-row scalars
(``RealignRows``), its sums still in float64: the output is float32 either way.

Methods (``Recipe.method``):

- ``realign``: the paper's three steps, each a switch. ``target`` is the image mean when ``anchor`` is on and
  the text's own mean when off; ``s`` is ``sqrt(trace_img / trace_txt)`` when ``trace`` is on, else 1::

      h   = normalize((t - mu_txt) * s + target)          # anchor / trace
      out = normalize(h - mu_hat + target)                # centroid; mu_hat = mean of h over the fitted text

  so every switch keeps one meaning in all 8 combinations (all off is the identity).
- ``none``: the normalized text, unchanged.
- ``mean_shift`` (Unicorn): ``normalize(t - mu_txt)``.
- ``c3``: ``normalize(t - mu_txt + noise)``; images are centred too *at use time* (``normalize(i - mu_img)``,
  recorded in the stats as ``image_transform``; see ``transform_images``). Files of images are never changed.
- ``block_cov``: whiten the text with its covariance, colour with the image covariance (both shrunk toward a
  scaled identity), add the image mean, normalize.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, get_args

import numpy as np

from revision.config import RealignMethod
from revision.embedding_sets import EmbeddingWriter
from revision.embedding_streams import (
    EmbeddingSource,
    ProjectSetSource,
    checked_chunks,
    normalized_chunks,
    open_embeddings,
)
from revision.encoder_identity import require_same_encoder
from revision.errors import InputError
from revision.outputs import atomic_file, write_json

METHODS: tuple[str, ...] = get_args(RealignMethod)  # realign.method's choices, as its config declares them
STATS_FORMAT = "revision-realign-stats/1"
TRANSFORM_FILE = "block_cov_transform.safetensors"
NOISE_BLOCK_ROWS = 4096  # c3 noise is drawn per fixed block of rows, so it does not depend on the chunking


# --------------------------------------------------------------------------------------------- statistics


class Moments:
    """Streaming float64 mean of unit rows, hence their trace (1 - ||mu||^2); optionally the covariance."""

    def __init__(self, dim: int, covariance: bool = False):
        self.count = 0
        self.sum = np.zeros(dim)
        self.outer = np.zeros((dim, dim)) if covariance else None

    def add(self, x: np.ndarray) -> None:
        self.count += len(x)
        self.sum += x.sum(axis=0)
        if self.outer is not None:
            self.outer += x.T @ x

    def add_weighted(self, weights: np.ndarray, x: np.ndarray, offset: np.ndarray | None = None) -> None:
        """Add rows ``weights[i] * x[i] (+ offset)`` without forming them (no covariance)."""
        self.count += len(x)
        self.sum += np.einsum("i,ij->j", weights, x)  # einsum, not BLAS: BLAS threads cost more than they give here
        if offset is not None:
            self.sum += offset

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.count, 1)

    @property
    def trace(self) -> float:
        """Mean squared distance to the mean: for unit rows, mean ||x||^2 - ||mu||^2 = 1 - ||mu||^2."""
        mean = self.mean
        return max(1.0 - float(mean @ mean), 0.0)

    @property
    def covariance(self) -> np.ndarray:
        mean = self.mean
        return self.outer / self.count - np.outer(mean, mean)


def moments_of(source: EmbeddingSource, chunk_rows: int, covariance: bool = False) -> Moments:
    moments = Moments(source.dim, covariance)
    if covariance:
        for _, x in normalized_chunks(source, chunk_rows):
            moments.add(x)
    else:
        for _, x, norms in checked_chunks(source, chunk_rows):
            moments.add_weighted(1 / norms, x)
    if moments.count == 0:
        raise InputError(f"{source.path}: no embeddings")
    return moments


# --------------------------------------------------------------------------------------------- the fit


@dataclass(frozen=True)
class Recipe:
    """What to fit: the method and its settings (the ``realign`` params minus the report's). No defaults: the
    values come from params.yaml (``recipe_from(RealignConfig)``) or from a stats file."""

    method: RealignMethod
    anchor: bool
    trace: bool
    centroid: bool
    noise_std: float
    seed: int
    shrinkage: float

    def __post_init__(self):
        if self.method not in METHODS:
            raise InputError(f"realign.method: {self.method!r} is not one of {', '.join(METHODS)}")


@dataclass
class RealignStats:
    """Everything needed to apply a fitted alignment to any text from the same encoder."""

    recipe: Recipe
    dim: int
    encoder: dict | None
    counts: dict[str, int]
    mu_txt: np.ndarray
    mu_img: np.ndarray
    trace_txt: float
    trace_img: float
    mu_hat: np.ndarray | None = None
    text_to_image: np.ndarray | None = field(default=None, repr=False)  # block_cov only

    @property
    def scale(self) -> float:
        return float(np.sqrt(self.trace_img / self.trace_txt)) if self.trace_txt > 0 else float("inf")

    @property
    def target(self) -> np.ndarray:
        """The mean the realign steps move the text onto."""
        return self.mu_img if self.recipe.anchor else self.mu_txt

    @property
    def image_transform(self) -> dict | None:
        if self.recipe.method == "c3":
            return {"subtract": "mu_img", "then": "l2_normalize", "note": "c3 centres images at use time"}
        return None


def check_encoders(text: EmbeddingSource, image: EmbeddingSource) -> None:
    if text.dim != image.dim:
        raise InputError(f"{image.path}: dim {image.dim} but {text.path} has dim {text.dim}")
    require_same_encoder(image.encoder, image.path, text.encoder, text.path, "embed both with one encoder")


def fit(text: EmbeddingSource, image: EmbeddingSource, recipe: Recipe, chunk_rows: int) -> RealignStats:
    """Fit the statistics: one pass per modality, plus one text pass for ``mu_hat`` when the centroid step is on."""
    check_encoders(text, image)
    covariance = recipe.method == "block_cov"
    txt = moments_of(text, chunk_rows, covariance)
    img = moments_of(image, chunk_rows, covariance)
    stats = RealignStats(
        recipe=recipe, dim=text.dim, encoder=text.encoder or image.encoder,
        counts={"text": txt.count, "image": img.count},
        mu_txt=txt.mean, mu_img=img.mean, trace_txt=txt.trace, trace_img=img.trace,
    )
    if recipe.method == "realign" and recipe.trace and txt.trace <= 0:
        raise InputError(f"{text.path}: all text embeddings are identical (trace 0), so the trace step is undefined")
    if covariance:
        stats.text_to_image = block_cov_matrix(txt.covariance, img.covariance, recipe.shrinkage, text.path)
    if recipe.method == "realign" and recipe.centroid:
        stats.mu_hat = _mean_after_first_step(text, stats, chunk_rows)
    return stats


def _mean_after_first_step(text: EmbeddingSource, stats: RealignStats, chunk_rows: int) -> np.ndarray:
    moments = Moments(stats.dim)
    steps = RealignRows(stats, centroid=False)
    for _, x, norms in checked_chunks(text, chunk_rows, np.float32):
        coefficients = steps.coefficients(x, norms)
        if coefficients is None:
            moments.add(_anchor_trace(_unit64(x, norms), stats))
        else:
            moments.add_weighted(*steps.sum_terms(*coefficients, x))
    return moments.mean


def _shrunk(cov: np.ndarray, shrinkage: float) -> np.ndarray:
    dim = len(cov)
    return (1 - shrinkage) * cov + shrinkage * (np.trace(cov) / dim) * np.eye(dim)


def block_cov_matrix(cov_txt: np.ndarray, cov_img: np.ndarray, shrinkage: float, text_path: Path) -> np.ndarray:
    """``C_txt^-1/2 C_img^1/2`` for row vectors: whiten by the (shrunk) text covariance, colour by the image's."""
    vals_t, vecs_t = np.linalg.eigh(_shrunk(cov_txt, shrinkage))
    if vals_t.min() <= 1e-12 * max(vals_t.max(), 1e-300):
        raise InputError(
            f"{text_path}: the text covariance is singular (fewer independent rows than dimensions?); "
            "set realign.shrinkage > 0"
        )
    vals_i, vecs_i = np.linalg.eigh(_shrunk(cov_img, shrinkage))
    whiten = (vecs_t / np.sqrt(vals_t)) @ vecs_t.T
    colour = (vecs_i * np.sqrt(np.clip(vals_i, 0, None))) @ vecs_i.T
    return whiten @ colour


# --------------------------------------------------------------------------------------------- the map


def _normalize_rows(y: np.ndarray) -> np.ndarray:
    norms = np.sqrt(np.einsum("ij,ij->i", y, y))
    zero = np.flatnonzero(~(norms > 0))
    if len(zero):
        raise InputError(f"row {int(zero[0])} of a chunk maps to the zero vector; cannot normalize it")
    y /= norms[:, None]
    return y


def _anchor_trace(x: np.ndarray, stats: RealignStats) -> np.ndarray:
    """``normalize((x - mu_txt) * s + target)`` for normalized rows ``x``."""
    y = x - stats.mu_txt
    if stats.recipe.trace:
        y *= stats.scale
    y += stats.target
    return _normalize_rows(y)


class RealignRows:
    """The realign steps as per-row scalars, so a chunk is mapped without full-width temporaries.

    For a raw row ``r`` with unit ``t = r / |r|``: ``y = s t + c`` with ``c = target - s mu_txt``, and as
    ``|t| = 1``, ``|y|^2 = s^2 + 2 s (t.c) + c.c``; then ``h = y / |y|`` and, with ``d = target - mu_hat``,
    ``|h + d|^2 = 1 + 2 (h.d) + d.d``. So ``out = alpha r + k @ [c; d]``, where the per-row ``alpha`` and
    ``k`` come from the dot products of ``r`` with ``c`` and ``d``. The rows may be float32 (the per-row
    scalars and all sums stay float64). Rows whose intermediate norm is tiny (cancellation) get ``None``:
    the caller then takes the direct float64 path, which also reports zero vectors.
    """

    TINY = 1e-6

    def __init__(self, stats: RealignStats, centroid: bool):
        self.scale = stats.scale if stats.recipe.trace else 1.0
        c = stats.target - self.scale * stats.mu_txt
        self.basis = np.stack([c, stats.target - stats.mu_hat]) if centroid else c[None]
        self.gram = self.basis @ self.basis.T

    def coefficients(self, x: np.ndarray, norms: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """``(alpha, k)`` for raw rows ``x`` with L2 norms ``norms``, or None where the direct path is needed."""
        s, norms = self.scale, norms.astype(np.float64)
        dots = np.einsum("ij,kj->ik", x, self.basis.astype(x.dtype)) / norms[:, None]  # t.c (and t.d)
        y2 = s * s + 2 * s * dots[:, 0] + self.gram[0, 0]
        if not (y2 > self.TINY).all():
            return None
        inv_y = 1 / np.sqrt(y2)
        alpha, k = s * inv_y, inv_y[:, None]  # h = alpha t + k @ [c]
        if len(self.basis) == 2:
            z2 = 1 + 2 * (alpha * dots[:, 1] + inv_y * self.gram[0, 1]) + self.gram[1, 1]
            if not (z2 > self.TINY).all():
                return None
            inv_z = 1 / np.sqrt(z2)
            alpha, k = alpha * inv_z, np.column_stack([inv_y * inv_z, inv_z])
        return alpha / norms, k

    def sum_terms(self, alpha: np.ndarray, k: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Arguments for ``Moments.add_weighted``: the mapped rows' sum without forming them."""
        return alpha, x, k.sum(axis=0) @ self.basis

    def apply(self, alpha: np.ndarray, k: np.ndarray, x: np.ndarray) -> np.ndarray:
        """The mapped rows, computed in ``x``'s memory."""
        x *= alpha.astype(x.dtype)[:, None]
        x += np.einsum("ik,kj->ij", k.astype(x.dtype), self.basis.astype(x.dtype))
        return x


def c3_noise(seed: int, first_row: int, rows: int, dim: int, std: float) -> np.ndarray:
    """Gaussian noise for rows [first_row, first_row + rows), identical however the rows are chunked."""
    out = np.empty((rows, dim))
    block = first_row // NOISE_BLOCK_ROWS
    row = first_row
    while row < first_row + rows:
        block_start = block * NOISE_BLOCK_ROWS
        noise = np.random.default_rng([seed, block]).normal(0.0, std, size=(NOISE_BLOCK_ROWS, dim))
        take_from, take_to = row - block_start, min(NOISE_BLOCK_ROWS, first_row + rows - block_start)
        out[row - first_row:row - first_row + take_to - take_from] = noise[take_from:take_to]
        row += take_to - take_from
        block += 1
    return out


def transform(x: np.ndarray, stats: RealignStats, first_row: int = 0) -> np.ndarray:
    """Map normalized text rows ``x`` (float64) to aligned rows; ``first_row`` positions c3's noise."""
    recipe = stats.recipe
    if x.shape[1] != stats.dim:
        raise InputError(f"embeddings have dim {x.shape[1]} but the stats were fitted at dim {stats.dim}")
    if recipe.method == "none":
        return x.copy()
    if recipe.method == "mean_shift":
        return _normalize_rows(x - stats.mu_txt)
    if recipe.method == "c3":
        noise = c3_noise(recipe.seed, first_row, len(x), stats.dim, recipe.noise_std)
        return _normalize_rows(x - stats.mu_txt + noise)
    if recipe.method == "block_cov":
        return _normalize_rows((x - stats.mu_txt) @ stats.text_to_image + stats.mu_img)
    h = _anchor_trace(x, stats)
    if recipe.centroid:
        h -= stats.mu_hat
        h += stats.target
        _normalize_rows(h)
    return h


def transform_images(x: np.ndarray, stats: RealignStats) -> np.ndarray:
    """What a consumer applies to normalized image rows: identity, except c3 centres the images too."""
    if stats.recipe.method == "c3":
        return _normalize_rows(x - stats.mu_img)
    return x


def check_applicable(stats: RealignStats, text: EmbeddingSource, stats_path: str | Path = "stats") -> None:
    if text.dim != stats.dim:
        raise InputError(f"{text.path}: dim {text.dim} but {stats_path} was fitted at dim {stats.dim}")
    require_same_encoder(text.encoder, text.path, stats.encoder, stats_path, "fit the stats on this encoder's embeddings")


def align_stream(
    text: EmbeddingSource, stats: RealignStats, chunk_rows: int, write: Callable[[int, np.ndarray], None]
) -> Moments:
    """One pass: align every text chunk, hand it to ``write(first_row, float32 rows)``; returns the output's moments.

    The rows handed to ``write`` are a reused buffer: a ``write`` that keeps them must copy them."""
    check_applicable(stats, text)
    out = Moments(stats.dim)
    steps = RealignRows(stats, stats.recipe.centroid) if stats.recipe.method == "realign" else None
    for first_row, x, norms in checked_chunks(text, chunk_rows, np.float32 if steps else np.float64):
        coefficients = steps.coefficients(x, norms) if steps else None
        if coefficients is None:
            aligned = _transform_checked(_unit64(x, norms), stats, first_row, text.path)
            out.add(aligned)
        else:
            out.add_weighted(*steps.sum_terms(*coefficients, x))
            aligned = steps.apply(*coefficients, x)
        write(first_row, aligned.astype(np.float32, copy=False))
    return out


def _unit64(x: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """Checked rows L2-normalized in float64; narrower rows get their norms again in float64."""
    if x.dtype != np.float64:
        x = x.astype(np.float64)
        norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    return x / norms[:, None]


def _transform_checked(x: np.ndarray, stats: RealignStats, first_row: int, path: Path) -> np.ndarray:
    try:
        return transform(x, stats, first_row)
    except InputError as err:
        raise InputError(f"{path}: rows from {first_row}: {err}") from None


class NpyRowWriter:
    """Write a rows x dim float32 .npy sequentially, chunk by chunk, with plain writes."""

    def __init__(self, path: Path, count: int, dim: int):
        self.handle = open(path, "wb")
        self.path, self.expected, self.written = path, count, 0
        header = {"descr": "<f4", "fortran_order": False, "shape": (count, dim)}
        np.lib.format.write_array_header_1_0(self.handle, header)

    def __call__(self, first_row: int, rows: np.ndarray) -> None:
        if first_row != self.written:
            raise RuntimeError(f"{self.path}: rows out of order ({first_row} after {self.written})")
        self.handle.write(memoryview(np.ascontiguousarray(rows, dtype="<f4")).cast("B"))
        self.written += len(rows)

    def close(self) -> None:
        self.handle.close()
        if self.written != self.expected:
            raise RuntimeError(f"{self.path}: wrote {self.written} of {self.expected} rows")


def align_to_npy(text: EmbeddingSource, stats: RealignStats, out_path: str | Path, chunk_rows: int) -> Moments:
    """Aligned text as one float32 .npy, same row order, replaced atomically."""
    with atomic_file(out_path) as tmp:
        writer = NpyRowWriter(tmp, text.count, text.dim)
        try:
            moments = align_stream(text, stats, chunk_rows, writer)
        finally:
            writer.handle.close()
        writer.close()
    return moments


def align_to_embedding_set(
    text: ProjectSetSource, stats: RealignStats, out_dir: str | Path, chunk_rows: int
) -> Moments:
    """Aligned text as a project embedding set: same ids, order, encoder identity and shard size as ``text``."""
    ids = text.set.ids()
    shard_size = max((s.rows for s in text.set.shards), default=4096) or 4096
    writer = EmbeddingWriter(out_dir, text.encoder, text.dim, shard_size=shard_size)
    moments = align_stream(text, stats, chunk_rows, lambda first, rows: writer.add(ids[first:first + len(rows)], rows.copy()))
    writer.close()
    return moments


def recipe_from(settings) -> Recipe:
    """A Recipe from any object carrying its fields (e.g. ``RealignConfig``)."""
    return Recipe(**{name: getattr(settings, name) for name in Recipe.__dataclass_fields__})


# --------------------------------------------------------------------------------------------- stats files


def stats_to_json(stats: RealignStats) -> dict:
    recipe = stats.recipe
    return {
        "format": STATS_FORMAT,
        "method": recipe.method,
        "switches": {"anchor": recipe.anchor, "trace": recipe.trace, "centroid": recipe.centroid},
        "noise_std": recipe.noise_std,
        "seed": recipe.seed,
        "shrinkage": recipe.shrinkage,
        "dim": stats.dim,
        "encoder": stats.encoder,
        "counts": stats.counts,
        "mu_txt": stats.mu_txt.tolist(),
        "mu_img": stats.mu_img.tolist(),
        "mu_hat": None if stats.mu_hat is None else stats.mu_hat.tolist(),
        "trace_txt": stats.trace_txt,
        "trace_img": stats.trace_img,
        "scale": stats.scale,
        "image_transform": stats.image_transform,
        "transform_file": TRANSFORM_FILE if stats.text_to_image is not None else None,
    }


def save_stats(stats: RealignStats, directory: str | Path) -> Path:
    """``<directory>/stats.json`` (+ the block_cov matrix beside it); returns the JSON's path."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if stats.text_to_image is not None:
        with atomic_file(directory / TRANSFORM_FILE) as tmp:
            save_file({"text_to_image": np.ascontiguousarray(stats.text_to_image)}, str(tmp))
    write_json(directory / "stats.json", stats_to_json(stats))
    return directory / "stats.json"


def _vector(data: dict, key: str, dim: int, path: Path) -> np.ndarray:
    values = np.asarray(data.get(key), dtype=np.float64)
    if values.shape != (dim,) or not np.isfinite(values).all():
        raise InputError(f"{path}: '{key}' must be {dim} finite numbers")
    return values


def load_stats(path: str | Path) -> RealignStats:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot read realign stats: {err}") from None
    if not isinstance(data, dict) or data.get("format") != STATS_FORMAT:
        raise InputError(f"{path}: not a realign stats file (format {STATS_FORMAT!r} expected)")
    try:
        switches = data["switches"]
        recipe = Recipe(method=data["method"], anchor=bool(switches["anchor"]), trace=bool(switches["trace"]),
                        centroid=bool(switches["centroid"]), noise_std=float(data["noise_std"]),
                        seed=int(data["seed"]), shrinkage=float(data["shrinkage"]))
        dim = int(data["dim"])
        stats = RealignStats(
            recipe=recipe, dim=dim, encoder=data.get("encoder"), counts=dict(data["counts"]),
            mu_txt=_vector(data, "mu_txt", dim, path), mu_img=_vector(data, "mu_img", dim, path),
            trace_txt=float(data["trace_txt"]), trace_img=float(data["trace_img"]),
        )
    except (KeyError, TypeError) as err:
        raise InputError(f"{path}: missing or malformed key {err}") from None
    if recipe.method == "realign" and recipe.centroid:
        stats.mu_hat = _vector(data, "mu_hat", dim, path)
    if recipe.method == "block_cov":
        stats.text_to_image = _load_transform(path.parent / str(data.get("transform_file") or TRANSFORM_FILE), dim)
    return stats


def _load_transform(path: Path, dim: int) -> np.ndarray:
    from safetensors.numpy import load_file

    if not path.exists():
        raise InputError(f"{path}: block_cov stats need this matrix file beside stats.json")
    matrix = load_file(str(path)).get("text_to_image")
    if matrix is None or matrix.shape != (dim, dim):
        raise InputError(f"{path}: expected tensor 'text_to_image' of shape ({dim}, {dim})")
    return matrix.astype(np.float64)


# --------------------------------------------------------------------------------------------- on files


def fit_files(text_path, image_path, output_dir, recipe: Recipe, chunk_rows: int) -> tuple[RealignStats, Moments]:
    """Fit on the user's files; write ``output_dir/aligned_text.npy`` (same row order) and ``stats.json``."""
    text, image = open_embeddings(text_path), open_embeddings(image_path)
    stats = fit(text, image, recipe, chunk_rows)
    return stats, _write_npy_and_stats(text, stats, Path(output_dir), chunk_rows)


def apply_files(stats_path, text_path, output_dir, chunk_rows: int) -> tuple[RealignStats, Moments]:
    """Apply fitted stats (mu_hat included: no refit) to new text; the stats are copied beside the output."""
    stats = load_stats(stats_path)
    text = open_embeddings(text_path)
    check_applicable(stats, text, stats_path)
    return stats, _write_npy_and_stats(text, stats, Path(output_dir), chunk_rows)


def _write_npy_and_stats(text: EmbeddingSource, stats: RealignStats, output_dir: Path, chunk_rows: int) -> Moments:
    created = not output_dir.exists()
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        moments = align_to_npy(text, stats, output_dir / "aligned_text.npy", chunk_rows)
    except BaseException:
        if created:  # a bad row found while writing leaves no empty output folder behind
            shutil.rmtree(output_dir, ignore_errors=True)
        raise
    save_stats(stats, output_dir)
    return moments


