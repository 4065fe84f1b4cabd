"""Held-out pair geometry: each measure reads what it should on pairs built to have it, with standard errors."""

from __future__ import annotations

import numpy as np
import pytest

from revision.pair_geometry import pair_geometry
from tests.helpers import unit

N, DIM = 120, 16


def _images(seed: int = 0) -> np.ndarray:
    return unit(np.random.default_rng(seed).normal(size=(N, DIM)))


def test_text_that_is_its_image_is_perfectly_aligned():
    images = _images()
    geometry = pair_geometry(images, images, k=5)
    assert geometry["phi"] == pytest.approx(1.0) and geometry["psi"] == pytest.approx(1.0)
    assert geometry["omega_k"] == pytest.approx(1.0) and geometry["delta_mu"] == pytest.approx(0.0, abs=1e-12)
    assert geometry["pairs"] == N and geometry["k"] == 5


def test_a_shifted_text_keeps_its_structure_but_not_its_place():
    images = _images()
    shifted = unit(images + 2.0 * np.eye(DIM)[0])  # every caption pushed the same way: a modality gap
    geometry = pair_geometry(shifted, images, k=5)
    assert geometry["delta_mu"] > 0.5 and geometry["phi"] < 0.7
    assert geometry["psi"] > 0.5  # neighbourhoods survive the shift
    assert geometry["mixing_text"] < 0.2 and geometry["mixing_image"] < 0.5  # the two clouds stay apart
    close = pair_geometry(unit(images + 0.05 * np.random.default_rng(1).normal(size=images.shape)), images, k=5)
    assert close["mixing_text"] > 0.8 and close["mixing_image"] > 0.8


def test_a_residual_along_one_direction_is_anisotropic():
    images, rng = _images(), np.random.default_rng(2)
    one_way = unit(images + 0.3 * rng.normal(size=(N, 1)) * np.eye(DIM)[3])
    every_way = unit(images + 0.3 * rng.normal(size=(N, DIM)) / np.sqrt(DIM))
    narrow, broad = pair_geometry(one_way, images, k=5), pair_geometry(every_way, images, k=5)
    assert narrow["residual_anisotropy"] > 5 * broad["residual_anisotropy"]
    assert narrow["residual_rank"] < 0.3 < broad["residual_rank"]


def test_every_measure_has_a_standard_error_and_the_bootstrap_is_seeded():
    images = _images()
    text = unit(images + 0.5 * np.random.default_rng(3).normal(size=images.shape))
    geometry = pair_geometry(text, images, k=5, seed=7)
    measures = [name for name in geometry if f"{name}_se" in geometry]
    assert set(measures) == {"delta_mu", "phi", "psi", "omega_k", "mixing_text", "mixing_image",
                             "residual_anisotropy", "residual_rank"}
    assert all(0 < geometry[f"{name}_se"] < 1 for name in measures)
    assert pair_geometry(text, images, k=5, seed=7) == geometry
    assert pair_geometry(text, images, k=5, seed=8)["psi_se"] != geometry["psi_se"]


def test_too_few_or_unmatched_pairs_are_refused():
    images = _images()
    with pytest.raises(ValueError, match="same shape"):
        pair_geometry(images[:6], images[:6], k=5)
    with pytest.raises(ValueError, match="same shape"):
        pair_geometry(images, images[:-1], k=5)
