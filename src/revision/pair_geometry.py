"""How well an alignment places text where its images are, measured on held-out pairs, without an MLLM.

Row i of ``text`` (aligned captions) and of ``image`` describe the same item; both are L2-normalised. The
measures (AnisoAlign's diagnostics, docs/methods.md):

- ``delta_mu``: distance between the two centroids;
- ``phi``: mean cosine of a caption and its own image;
- ``psi``: correlation, over every pair of items, of their image-image and caption-caption cosines (does the
  text keep the images' neighbourhood structure);
- ``omega_k``: overlap of an item's k nearest neighbours among the images and among the captions;
- ``mixing_text`` / ``mixing_image``: entropy of the other modality's share among a point's k neighbours in
  the pooled set, over the same entropy with the modality labels shuffled (1: fully mixed, 0: apart);
- ``residual_anisotropy`` and ``residual_rank``: of the pair residual r = (t - mean t) - (y - mean y), the
  largest eigenvalue over the mean one, and the effective rank (tr S)^2 / tr(S^2) as a fraction of the dimension.

Each comes with its standard error (``<name>_se``): the exact one for a mean over items (phi, omega_k, the
mixings), a seeded bootstrap over items for the rest.
"""

from __future__ import annotations

import numpy as np

BOOTSTRAP = 200


def pair_geometry(text: np.ndarray, image: np.ndarray, k: int = 10, seed: int = 0) -> dict[str, float]:
    """Every measure above and its standard error, for ``len(text)`` pairs (at least ``k + 2``)."""
    text, image = np.asarray(text, dtype=np.float64), np.asarray(image, dtype=np.float64)
    if text.shape != image.shape or len(text) < k + 2:
        raise ValueError(f"pair geometry needs two sets of the same shape with more than {k + 1} rows: "
                         f"{text.shape} and {image.shape}")
    rng = np.random.default_rng(seed)
    text_sims, image_sims = text @ text.T, image @ image.T
    measures = {
        **_mean_with_se("phi", np.einsum("ij,ij->i", text, image)),
        **_mean_with_se("omega_k", _neighbour_overlap(text_sims, image_sims, k)),
        **_mixing(text, image, k, rng),
    }
    resamples = [rng.integers(0, len(text), len(text)) for _ in range(BOOTSTRAP)]
    for name, statistic in _BOOTSTRAPPED.items():
        value = statistic(text, image, text_sims, image_sims, np.arange(len(text)))
        spread = [statistic(text, image, text_sims, image_sims, rows) for rows in resamples]
        measures.update({name: value, f"{name}_se": float(np.std(spread, ddof=1))})
    return {**measures, "pairs": float(len(text)), "k": float(k)}


def _mean_with_se(name: str, values: np.ndarray) -> dict[str, float]:
    return {name: float(values.mean()), f"{name}_se": float(values.std(ddof=1) / np.sqrt(len(values)))}


def _neighbours(sims: np.ndarray, k: int) -> np.ndarray:
    """Each row's k most similar other rows."""
    sims = sims.copy()
    np.fill_diagonal(sims, -np.inf)
    return np.argpartition(-sims, k - 1, axis=1)[:, :k]


def _neighbour_overlap(text_sims: np.ndarray, image_sims: np.ndarray, k: int) -> np.ndarray:
    text_nn, image_nn = _neighbours(text_sims, k), _neighbours(image_sims, k)
    return np.array([len(np.intersect1d(a, b)) / k for a, b in zip(text_nn, image_nn)])


def _mixing(text: np.ndarray, image: np.ndarray, k: int, rng: np.random.Generator) -> dict[str, float]:
    points = np.concatenate([text, image])
    is_image = np.arange(len(points)) >= len(text)
    neighbours = _neighbours(points @ points.T, k)
    entropy = _binary_entropy(is_image[neighbours].mean(axis=1))
    shuffled = _binary_entropy(rng.permutation(is_image)[neighbours].mean(axis=1))
    out = {}
    for name, rows in (("mixing_text", ~is_image), ("mixing_image", is_image)):
        scale = shuffled[rows].mean()
        out.update({name: float(entropy[rows].mean() / scale),
                    f"{name}_se": float(entropy[rows].std(ddof=1) / np.sqrt(rows.sum()) / scale)})
    return out


def _binary_entropy(share: np.ndarray) -> np.ndarray:
    p = np.clip(share, 1e-12, 1 - 1e-12)
    return -(p * np.log(p) + (1 - p) * np.log(1 - p)) * ((share > 0) & (share < 1))


def _delta_mu(text, image, text_sims, image_sims, rows) -> float:
    return float(np.linalg.norm(text[rows].mean(axis=0) - image[rows].mean(axis=0)))


def _psi(text, image, text_sims, image_sims, rows) -> float:
    a, b = np.triu_indices(len(rows), 1)
    distinct = rows[a] != rows[b]  # a bootstrap draws some items twice: a pair of one item with itself says nothing
    first, second = rows[a][distinct], rows[b][distinct]
    return float(np.corrcoef(image_sims[first, second], text_sims[first, second])[0, 1])


def _residual_spectrum(text, image, rows) -> np.ndarray:
    residual = (text[rows] - text[rows].mean(axis=0)) - (image[rows] - image[rows].mean(axis=0))
    return np.clip(np.linalg.eigvalsh(residual.T @ residual / len(rows)), 0, None)


def _residual_anisotropy(text, image, text_sims, image_sims, rows) -> float:
    values = _residual_spectrum(text, image, rows)
    return float(values.max() / values.mean()) if values.any() else float("nan")  # no residual: no direction


def _residual_rank(text, image, text_sims, image_sims, rows) -> float:
    values = _residual_spectrum(text, image, rows)
    return float(values.sum() ** 2 / (values**2).sum() / len(values)) if values.any() else float("nan")


_BOOTSTRAPPED = {"delta_mu": _delta_mu, "psi": _psi, "residual_anisotropy": _residual_anisotropy,
                 "residual_rank": _residual_rank}
