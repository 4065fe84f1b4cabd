"""Modality-gap metrics and plots: how far text embeddings sit from image embeddings, before and after aligning.

All inputs are L2-normalized float arrays (rows = embeddings). Metrics that are O(N^2) run on a seeded
subsample chosen by the caller. Definitions:

- ``centroid_gap``: ``||mu_text - mu_image||``.
- ``trace_ratio``: ``trace_text / trace_image`` (trace = mean squared distance to the mean; 1 = same spread).
- ``mean_cos_to_image_centroid``: mean cosine of the rows to the image mean direction (exact from the
  means, since rows are unit vectors).
- ``js_centroid_cosine``: Jensen-Shannon divergence (bits, 0..1) between the histograms of cosine-to-image-
  centroid of the text rows and of the image rows (50 bins on [-1, 1]); the centroid version, not pairwise.
- ``knn_mixing``: on a balanced subsample (m text + m image), the mean fraction of each point's k nearest
  neighbours (cosine) that come from the other modality: 0 = fully separated, about 0.5 = fully mixed.
- spectrum: eigenvalues of the sample covariance; ``effective_rank`` = exp(entropy of the normalized
  eigenvalues), ``top10_share`` = share of variance in the 10 largest.
- paired (row i of text and image describe one item): ``matched_distance`` = mean ``||t_i - v_i||``;
  ``relative_gap`` = M / (M + W) with M the mean matched cosine distance ``1 - cos(t_i, v_i)`` and W the mean
  within-modality cosine distance over pairs i != j (averaged over both modalities), in the spirit of
  Schrodi et al.'s relative modality gap: 0 when pairs coincide; ``r1``/``r5`` retrieval recall where ties
  count against the match.
- pair geometry (``geometry_before`` / ``geometry_after``, on the eval pairs): ``revision.pair_geometry``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from revision.config import flatten
from revision.embedding_streams import ProjectSetSource, gather_rows, sample_rows
from revision.errors import InputError
from revision.layout import (
    ALIGNED_TEXT,
    EVAL,
    EVAL_IMAGES,
    EVAL_TEXT,
    IMAGE_POOL,
    IMAGE_POOL_IMAGES,
    TEXT,
    TEXT_CORPUS,
    Manifest,
    positions,
    read_manifest,
)
from revision.pair_geometry import pair_geometry
from revision.realign import Moments, RealignStats, transform, transform_images

LABEL_COLUMNS = ("class_name", "colour")

HIST_BINS = 50
TOP_SHARE_K = 10


def centroid_gap(mean_a: np.ndarray, mean_b: np.ndarray) -> float:
    return float(np.linalg.norm(mean_a - mean_b))


def mean_cosine_to(mean_rows: np.ndarray, centroid: np.ndarray) -> float:
    """Mean cosine of unit rows to ``centroid``'s direction, from the rows' mean alone."""
    return float(mean_rows @ centroid / np.linalg.norm(centroid))


def cosine_to_centroid(x: np.ndarray, centroid: np.ndarray) -> np.ndarray:
    return x @ (centroid / np.linalg.norm(centroid))


def js_divergence(a: np.ndarray, b: np.ndarray, bins: int = HIST_BINS, value_range=(-1.0, 1.0)) -> float:
    """Jensen-Shannon divergence in bits between the histograms of two samples on shared bins."""
    p = np.histogram(a, bins=bins, range=value_range)[0].astype(float)
    q = np.histogram(b, bins=bins, range=value_range)[0].astype(float)
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(u, v):
        mask = u > 0
        return float(np.sum(u[mask] * np.log2(u[mask] / v[mask])))

    return max(0.5 * kl(p, m) + 0.5 * kl(q, m), 0.0)


def knn_mixing(a: np.ndarray, b: np.ndarray, k: int, seed: int = 0) -> float:
    """Fraction of k nearest neighbours from the other modality, on a balanced subsample of a and b."""
    rng = np.random.default_rng(seed)
    m = min(len(a), len(b))
    a = a[rng.choice(len(a), m, replace=False)]
    b = b[rng.choice(len(b), m, replace=False)]
    points = np.concatenate([a, b])
    is_b = np.arange(2 * m) >= m
    k = min(k, 2 * m - 1)
    sims = points @ points.T
    np.fill_diagonal(sims, -np.inf)
    neighbours = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    other = is_b[neighbours] != is_b[:, None]
    return float(other.mean())


def eigen_spectrum(x: np.ndarray) -> np.ndarray:
    centred = x - x.mean(axis=0)
    vals = np.linalg.eigvalsh(centred.T @ centred / len(x))[::-1]
    return np.clip(vals, 0, None)


def spectrum_summary(vals: np.ndarray, top_k: int = TOP_SHARE_K) -> dict[str, float]:
    p = vals / vals.sum()
    nz = p[p > 0]
    return {
        "effective_rank": float(np.exp(-np.sum(nz * np.log(nz)))),
        f"top{top_k}_share": float(p[:top_k].sum()),
    }


def distribution_metrics(
    text_mean: np.ndarray, text_trace: float, image_mean: np.ndarray, image_trace: float,
    text_sample: np.ndarray, image_sample: np.ndarray, k: int, seed: int = 0,
) -> dict[str, float]:
    """Gap between a text-side set and the images: exact parts from the moments, the rest from samples."""
    return {
        "centroid_gap": centroid_gap(text_mean, image_mean),
        "trace_ratio": float(text_trace / image_trace) if image_trace > 0 else float("nan"),
        "mean_cos_to_image_centroid": mean_cosine_to(text_mean, image_mean),
        "js_centroid_cosine": js_divergence(
            cosine_to_centroid(text_sample, image_mean), cosine_to_centroid(image_sample, image_mean)
        ),
        "knn_mixing": knn_mixing(text_sample, image_sample, k, seed),
        **spectrum_summary(eigen_spectrum(text_sample)),
    }


def recall_at(sims: np.ndarray, ks=(1, 5)) -> dict[int, float]:
    """Row i's correct column is i; its rank counts every other column scoring at least as high."""
    correct = np.diag(sims)
    at_least_as_high = (sims >= correct[:, None]).sum(axis=1) - 1
    return {k: float(np.mean(at_least_as_high < k)) for k in ks}


def paired_metrics(text: np.ndarray, image: np.ndarray) -> dict[str, float]:
    """Gap and retrieval on pairs: row i of ``text`` and of ``image`` describe the same item."""
    if text.shape != image.shape:
        raise ValueError(f"paired sets differ in shape: {text.shape} vs {image.shape}")
    n = len(text)
    sims = text @ image.T
    matched_cos = np.diag(sims)
    matched = float(np.mean(1 - matched_cos))
    within = [(1 - (x @ x.T)).sum() / (n * (n - 1)) for x in (text, image)] if n > 1 else [0.0, 0.0]
    within_mean = float(np.mean(within))
    t2i, i2t = recall_at(sims), recall_at(sims.T)
    return {
        "matched_distance": float(np.mean(np.linalg.norm(text - image, axis=1))),
        "matched_cosine": float(np.mean(matched_cos)),
        "relative_gap": matched / (matched + within_mean) if matched + within_mean > 0 else 0.0,
        "t2i_r1": t2i[1], "t2i_r5": t2i[5], "i2t_r1": i2t[1], "i2t_r5": i2t[5],
    }


def probe_accuracy(train_x, train_y, test_x, test_y, seed: int = 0) -> float:
    """Logistic regression trained on one modality, scored on another (modality substitution)."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=10.0, max_iter=2000, random_state=seed)
    model.fit(train_x, train_y)
    return float(np.mean(model.predict(test_x) == np.asarray(test_y)))


def substitution_probe(
    train_sets: dict[str, tuple[np.ndarray, list, np.ndarray]], test_y: list, seed: int = 0
) -> dict[str, float]:
    """Accuracy on the test images of one classifier per training set, plus the majority-class baseline.

    ``train_sets``: name -> (train rows, train labels, the test rows as that classifier sees them).
    Rows whose label is missing (None/NaN) are dropped; a set with fewer than two classes is skipped.
    """
    test_keep = _labelled(test_y)
    test_y = np.asarray(test_y, dtype=object)[test_keep].astype(str)
    if len(set(test_y)) < 2:
        return {}
    _, counts = np.unique(test_y, return_counts=True)
    result = {"majority_baseline": float(counts.max() / counts.sum())}
    for name, (x, y, test_x) in train_sets.items():
        keep = _labelled(y)
        labels = np.asarray(y, dtype=object)[keep].astype(str)
        if len(set(labels)) >= 2:
            result[name] = probe_accuracy(x[keep], labels, test_x[test_keep], test_y, seed)
    return result


def _labelled(labels) -> np.ndarray:
    return np.array([v is not None and not (isinstance(v, float) and np.isnan(v)) for v in labels], dtype=bool)


# --------------------------------------------------------------------------------------------- plots


def _figure(width=6.0, height=4.5):
    from matplotlib.figure import Figure  # object API: renders with Agg, touches no global backend state

    fig = Figure(figsize=(width, height), dpi=110)
    return fig, fig.subplots()


def plot_pca(sets: dict[str, np.ndarray], path: Path, seed: int = 0) -> None:
    """2-D PCA fitted on all sets together, one colour per set."""
    stacked = np.concatenate(list(sets.values()))
    centre = stacked.mean(axis=0)
    _, _, vt = np.linalg.svd(stacked - centre, full_matrices=False)
    fig, ax = _figure()
    for name, x in sets.items():
        xy = (x - centre) @ vt[:2].T
        ax.scatter(xy[:, 0], xy[:, 1], s=4, alpha=0.4, label=name)
    ax.set(title="2-D PCA of the embeddings", xlabel="PC1", ylabel="PC2")
    ax.legend(markerscale=3)
    fig.savefig(path)


def plot_cosine_histograms(sets: dict[str, np.ndarray], image_mean: np.ndarray, path: Path) -> None:
    fig, ax = _figure()
    for name, x in sets.items():
        ax.hist(cosine_to_centroid(x, image_mean), bins=HIST_BINS, range=(-1, 1), alpha=0.5, density=True, label=name)
    ax.set(title="cosine to the image centroid", xlabel="cosine", ylabel="density")
    ax.legend()
    fig.savefig(path)


def plot_spectra(spectra: dict[str, np.ndarray], path: Path) -> None:
    fig, ax = _figure()
    for (name, vals), style in zip(spectra.items(), ["-", "--", ":", "-."] * len(spectra)):
        share = vals / vals.sum()
        ax.semilogy(np.arange(1, len(share) + 1), np.clip(share, 1e-12, None), style, label=name)
    ax.set(title="covariance spectrum", xlabel="component", ylabel="share of variance")
    ax.legend()
    fig.savefig(path)


# --------------------------------------------------------------------------------------------- the report


@dataclass
class LabelledRows:
    x: np.ndarray
    labels: dict[str, list] = field(default_factory=dict)  # label column -> one label per row


@dataclass
class ReportInputs:
    """Samples (normalized rows) the report is computed from; moments over the full sets live in the stats."""

    image: np.ndarray  # image-pool sample
    text: np.ndarray  # text sample, raw
    aligned: np.ndarray  # the same text rows, aligned
    aligned_moments: Moments  # over all aligned text (exact)
    eval_text: np.ndarray | None = None  # row i pairs with eval_images row i
    eval_images: np.ndarray | None = None
    probe_train: dict[str, LabelledRows] = field(default_factory=dict)  # text_raw / text_aligned / image_pool
    probe_test: LabelledRows | None = None  # eval images


def _moments_of(x: np.ndarray) -> Moments:
    moments = Moments(x.shape[1])
    moments.add(x)
    return moments


def realign_report(stats: RealignStats, inputs: ReportInputs, k: int, seed: int, plot_dir: Path | None) -> dict:
    """Before/after gap metrics, paired eval metrics, the substitution probe and (if ``plot_dir``) the plots."""
    image_after = transform_images(inputs.image, stats)
    image_after_moments = _moments_of(image_after) if stats.recipe.method == "c3" else None
    report = {
        "method": stats.recipe.method,
        "scale": stats.scale,
        "image": spectrum_summary(eigen_spectrum(inputs.image)),
        "before": distribution_metrics(
            stats.mu_txt, stats.trace_txt, stats.mu_img, stats.trace_img, inputs.text, inputs.image, k, seed
        ),
        "after": distribution_metrics(
            inputs.aligned_moments.mean, inputs.aligned_moments.trace,
            image_after_moments.mean if image_after_moments else stats.mu_img,
            image_after_moments.trace if image_after_moments else stats.trace_img,
            inputs.aligned, image_after, k, seed,
        ),
        "samples": {"image": len(inputs.image), "text": len(inputs.text)},
    }
    if stats.recipe.method == "realign":
        first_norm_mean = stats.mu_hat if stats.recipe.centroid else inputs.aligned_moments.mean
        report["phantom_drift"] = centroid_gap(first_norm_mean, stats.mu_img)
    if inputs.eval_text is not None:
        report["eval_before"] = paired_metrics(inputs.eval_text, inputs.eval_images)
        report["eval_after"] = paired_metrics(
            transform(inputs.eval_text, stats), transform_images(inputs.eval_images, stats)
        )
        report["samples"]["eval_pairs"] = len(inputs.eval_text)
        if len(inputs.eval_text) > k + 1:  # the neighbour measures need k others
            report["geometry_before"] = pair_geometry(inputs.eval_text, inputs.eval_images, k, seed)
            report["geometry_after"] = pair_geometry(
                transform(inputs.eval_text, stats), transform_images(inputs.eval_images, stats), k, seed
            )
    if inputs.probe_test is not None:
        report.update(_probes(stats, inputs, seed))
    if plot_dir is not None:
        _plots(inputs, stats, plot_dir)
    return report


def _probes(stats: RealignStats, inputs: ReportInputs, seed: int) -> dict:
    test = inputs.probe_test
    out = {}
    for column in LABEL_COLUMNS:
        if column not in test.labels:
            continue
        train = {
            name: (rows.x, rows.labels[column], _probe_test_x(name, test.x, stats))
            for name, rows in inputs.probe_train.items() if column in rows.labels
        }
        result = substitution_probe(train, test.labels[column], seed)
        if result:
            out[f"probe_{column}"] = result
    return out


def _probe_test_x(train_name: str, test_x: np.ndarray, stats: RealignStats) -> np.ndarray:
    # a classifier trained on aligned text sees images as the method's consumer would (c3 centres them)
    return transform_images(test_x, stats) if train_name == "text_aligned" else test_x


def _plots(inputs: ReportInputs, stats: RealignStats, plot_dir: Path) -> None:
    sets = {"image": inputs.image, "text": inputs.text, f"text aligned ({stats.recipe.method})": inputs.aligned}
    plot_pca(sets, plot_dir / "pca.png")
    plot_cosine_histograms(sets, stats.mu_img, plot_dir / "cosine_hist.png")
    plot_spectra({name: eigen_spectrum(x) for name, x in sets.items()}, plot_dir / "spectra.png")


def flat_metrics(report: dict) -> dict[str, float]:
    """Numeric leaves as dotted keys (for MLflow)."""
    numeric = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    return {key: float(value) for key, value in flatten(report).items() if numeric(value)}


def json_safe(report):
    """Non-finite floats become null, so the metrics file is strict JSON that DVC can read."""
    if isinstance(report, dict):
        return {k: json_safe(v) for k, v in report.items()}
    if isinstance(report, float) and not np.isfinite(report):
        return None
    return report


# --------------------------------------------------------------------------------------------- inputs from disk


def labels_for(ids: list[str], prepared: Path, manifest: Manifest) -> dict[str, list]:
    """Label columns of a prepared manifest for ``ids``, in order; every id must be there."""
    table = prepared / manifest.file
    frame = read_manifest(prepared, manifest, needs=("id",))
    positions(frame["id"].tolist(), table)
    frame = frame.set_index("id")
    missing = pd.Index(ids).difference(frame.index)
    if len(missing):
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise InputError(f"{table}: no row for id {missing[0]!r}{more}")
    rows = frame.loc[ids]
    return {c: [None if pd.isna(v) else v for v in rows[c]] for c in LABEL_COLUMNS if c in rows.columns}


def check_paired(text: ProjectSetSource, images: ProjectSetSource) -> list[str]:
    text_ids, image_ids = text.set.ids(), images.set.ids()
    if text_ids != image_ids:
        shorter = min(len(text_ids), len(image_ids))
        row = next((i for i, (a, b) in enumerate(zip(text_ids, image_ids)) if a != b), shorter)
        raise InputError(
            f"{text.path}: row {row} is not paired with row {row} of {images.path} (ids must match in order)"
        )
    return image_ids


def layout_report_inputs(
    stats: RealignStats, aligned_moments: Moments, sets: dict[str, ProjectSetSource], prepared: Path,
    sample: int, probe_rows: int, seed: int, chunk_rows: int,
) -> ReportInputs:
    """Samples and labels from the pipeline layout: ``sets`` holds the text, aligned text, image pool, eval
    text and eval image sets under their ``revision.layout`` names."""
    text, image = sets[TEXT.name], sets[IMAGE_POOL_IMAGES.name]
    text_rows = sample_rows(text.count, max(sample, probe_rows), seed)
    image_rows = sample_rows(image.count, max(sample, probe_rows), seed + 1)
    raw = gather_rows(text, text_rows, chunk_rows)
    aligned = gather_rows(sets[ALIGNED_TEXT], text_rows, chunk_rows)
    images = gather_rows(image, image_rows, chunk_rows)
    gap_text, gap_image = sample_rows(len(raw), sample, seed + 2), sample_rows(len(images), sample, seed + 3)
    probe_text = sample_rows(len(raw), probe_rows, seed + 4)
    probe_image = sample_rows(len(images), probe_rows, seed + 5)

    text_labels = labels_for(_ids_at(text, text_rows[probe_text]), prepared, TEXT_CORPUS)
    image_labels = labels_for(_ids_at(image, image_rows[probe_image]), prepared, IMAGE_POOL)
    eval_ids = check_paired(sets[EVAL_TEXT.name], sets[EVAL_IMAGES.name])
    eval_rows = sample_rows(len(eval_ids), probe_rows, seed + 6)
    eval_text = gather_rows(sets[EVAL_TEXT.name], eval_rows, chunk_rows)
    eval_images = gather_rows(sets[EVAL_IMAGES.name], eval_rows, chunk_rows)
    pairs = sample_rows(len(eval_rows), sample, seed + 7)
    return ReportInputs(
        image=images[gap_image], text=raw[gap_text], aligned=aligned[gap_text], aligned_moments=aligned_moments,
        eval_text=eval_text[pairs], eval_images=eval_images[pairs],
        probe_train={
            "text_raw": LabelledRows(raw[probe_text], text_labels),
            "text_aligned": LabelledRows(aligned[probe_text], text_labels),
            "image_pool": LabelledRows(images[probe_image], image_labels),
        },
        probe_test=LabelledRows(eval_images, labels_for([eval_ids[i] for i in eval_rows], prepared, EVAL)),
    )


def _ids_at(source: ProjectSetSource, rows: np.ndarray) -> list[str]:
    ids = source.set.ids()
    return [ids[i] for i in rows]
