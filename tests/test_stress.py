"""The gap stress: the direction it finds, the shift it applies, and `revision embed` with it on."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from revision.embedding_sets import EmbeddingSet
from revision.stress import class_direction, shift_images
from stages.cli import app
from tests.helpers import edit_params


def test_class_direction_finds_the_axis_the_classes_differ_on():
    rng = np.random.default_rng(0)
    axis = np.zeros(8)
    axis[3] = 1.0
    labels = np.repeat(["a", "b", "c"], 200)
    offsets = {"a": -1.0, "b": 0.2, "c": 0.8}
    vectors = rng.normal(scale=0.1, size=(600, 8)) + np.array([offsets[c] for c in labels])[:, None] * axis
    found = class_direction(vectors, labels)
    assert abs(found @ axis) > 0.99 and found[3] > 0  # sign fixed by the largest entry
    np.testing.assert_allclose(np.linalg.norm(found), 1.0)


def test_shift_moves_images_along_the_direction_and_keeps_unit_norm():
    rng = np.random.default_rng(1)
    images = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(50, 8))).float(), dim=-1)
    direction = np.eye(8)[0]
    moved = shift_images(images, direction, 0.8)
    np.testing.assert_allclose(moved.norm(dim=-1).numpy(), 1.0, rtol=1e-6)
    assert float(moved[:, 0].mean()) > float(images[:, 0].mean()) + 0.3
    torch.testing.assert_close(shift_images(images, direction, 0.0), images)


@pytest.mark.slow
def test_embed_with_stress_shifts_every_image_set_and_no_text(tiny_repo, tmp_path):
    edit_params(tiny_repo / "params.yaml", "embed", tmp_path / "params.yaml", stress_shift=0.8)
    out = tmp_path / "emb"
    with contextlib.chdir(tiny_repo):
        result = CliRunner().invoke(app, ["embed", "--params", str(tmp_path / "params.yaml"), "--out", str(out),
                                          "--metrics", str(tmp_path / "embed.json")])
    assert result.exit_code == 0, result.output[-2000:]
    plain = tiny_repo / "data" / "embeddings"
    record = json.loads((out / "stress.json").read_text())
    text_ids = EmbeddingSet(plain / "text").ids()
    corpus = pd.read_parquet(tiny_repo / "data" / "prepared" / "text_corpus.parquet").set_index("id")
    direction = class_direction(EmbeddingSet(plain / "text").load(), corpus.loc[text_ids, "class_name"].tolist())
    np.testing.assert_allclose(record["direction"], direction, atol=1e-6)
    for name in ("text", "eval_text"):
        np.testing.assert_array_equal(EmbeddingSet(out / name).load(), EmbeddingSet(plain / name).load())
    for name in ("image_pool", "eval_images", "sft_images", "pretrain_images"):
        expected = shift_images(torch.from_numpy(EmbeddingSet(plain / name).load()), direction, 0.8).numpy()
        np.testing.assert_allclose(EmbeddingSet(out / name).load(), expected, atol=1e-5)
    pool_mean = lambda folder: EmbeddingSet(folder / "image_pool").load().mean(0)  # noqa: E731
    assert (pool_mean(out) - pool_mean(plain)) @ direction > 0.2
    assert json.loads((tmp_path / "embed.json").read_text())["stress_shift"] == 0.8
