"""Modality-gap metrics on cases with known answers, the report, and the realign stage's pipeline mode."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from revision import gap
from revision.embedding_sets import EmbeddingSet
from revision.realign import Moments, RealignStats, Recipe, transform
from stages.cli import app
from tests.helpers import committed_params, unit, write_embedding_set

# the full ReAlign recipe (a Recipe has no defaults)
FULL = Recipe(method="realign", anchor=True, trace=True, centroid=True, noise_std=0.1, seed=0, shrinkage=0.1)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def cloud(rows: int, dim: int, centre: np.ndarray | None = None, spread: float = 0.3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centre = np.zeros(dim) if centre is None else centre
    return unit(centre + spread * rng.normal(size=(rows, dim)))


def moments(x: np.ndarray) -> Moments:
    m = Moments(x.shape[1])
    m.add(x)
    return m


# --------------------------------------------------------------------------------------------- metrics


def test_same_distribution_has_no_gap():
    centre = np.eye(8)[0] * 2
    a, b = cloud(600, 8, centre, seed=1), cloud(600, 8, centre, seed=2)
    ma, mb = moments(a), moments(b)
    same = gap.distribution_metrics(ma.mean, ma.trace, ma.mean, ma.trace, a, a, k=10)
    assert same["centroid_gap"] == 0 and same["trace_ratio"] == 1 and same["js_centroid_cosine"] == 0
    twins = gap.distribution_metrics(ma.mean, ma.trace, mb.mean, mb.trace, a, b, k=10)
    assert twins["centroid_gap"] < 0.05
    assert twins["trace_ratio"] == pytest.approx(1, abs=0.1)
    assert twins["js_centroid_cosine"] < 0.05
    assert 0.4 < twins["knn_mixing"] < 0.6


def test_separated_modalities_have_a_gap():
    a, b = cloud(300, 8, np.eye(8)[0] * 3, spread=0.2, seed=1), cloud(300, 8, np.eye(8)[1] * 3, spread=0.2, seed=2)
    ma, mb = moments(a), moments(b)
    metrics = gap.distribution_metrics(ma.mean, ma.trace, mb.mean, mb.trace, a, b, k=10)
    assert metrics["centroid_gap"] > 1.0
    assert metrics["knn_mixing"] == 0
    assert metrics["js_centroid_cosine"] > 0.95
    assert metrics["mean_cos_to_image_centroid"] < 0.3


def test_mean_cosine_from_means_equals_the_direct_mean():
    x, centroid = cloud(200, 6, np.ones(6), seed=3), np.arange(1.0, 7.0)
    direct = np.mean(x @ centroid / np.linalg.norm(centroid))
    assert gap.mean_cosine_to(x.mean(0), centroid) == pytest.approx(direct)


def test_js_divergence_bounds():
    a = np.linspace(-0.9, -0.5, 100)
    assert gap.js_divergence(a, a) == 0
    assert gap.js_divergence(a, -a) == pytest.approx(1.0)


def test_identical_pairs_retrieve_perfectly():
    x = cloud(50, 16, seed=4)
    metrics = gap.paired_metrics(x, x)
    assert metrics["t2i_r1"] == metrics["i2t_r1"] == metrics["t2i_r5"] == 1
    assert metrics["matched_distance"] == pytest.approx(0, abs=1e-7)
    assert metrics["relative_gap"] == pytest.approx(0, abs=1e-7)
    shifted = gap.paired_metrics(x, np.roll(x, 1, axis=0))
    assert shifted["t2i_r1"] == 0 and shifted["relative_gap"] > 0.4


def test_retrieval_ties_count_against_the_match():
    same = np.tile(np.eye(4)[0], (6, 1))
    assert gap.recall_at(same @ same.T) == {1: 0.0, 5: 0.0}


def test_spectrum_of_rank_one_and_isotropic_data():
    line = np.outer(np.random.default_rng(0).normal(size=500), np.eye(8)[2])
    summary = gap.spectrum_summary(gap.eigen_spectrum(line))
    assert summary["effective_rank"] == pytest.approx(1, abs=1e-6) and summary["top10_share"] == pytest.approx(1)
    iso = gap.spectrum_summary(gap.eigen_spectrum(np.random.default_rng(1).normal(size=(20000, 8))))
    assert iso["effective_rank"] > 7.9


def labelled_clusters(rows: int, dim: int, offset: np.ndarray, seed: int):
    """Three classes on three axes, plus a shared offset (the modality gap)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=rows)
    x = unit(np.eye(dim)[labels] + offset + 0.25 * rng.normal(size=(rows, dim)))
    return x, [f"class{c}" for c in labels]


def test_substitution_probe_shows_the_gap_and_its_repair():
    dim = 8
    offset = -1.5 * np.eye(dim)[0]  # pushes class0 text to the far side: a raw text classifier fails on images
    text, text_y = labelled_clusters(600, dim, offset, seed=1)
    images, image_y = labelled_clusters(600, dim, np.zeros(dim), seed=2)
    test_x, test_y = labelled_clusters(300, dim, np.zeros(dim), seed=3)
    mt, mi = moments(text), moments(images)
    stats = RealignStats(FULL, dim, None, {"text": 600, "image": 600}, mt.mean, mi.mean, mt.trace, mi.trace)
    stats.mu_hat = transform(text, RealignStats(replace(FULL, centroid=False), dim, None, {}, mt.mean, mi.mean,
                                                mt.trace, mi.trace)).mean(0)
    aligned = transform(text, stats)
    test_y[0] = None  # unlabelled rows are dropped, not guessed
    result = gap.substitution_probe(
        {"text_raw": (text, text_y, test_x), "text_aligned": (aligned, text_y, test_x),
         "image_pool": (images, image_y, test_x)},
        test_y,
    )
    assert 0.3 < result["majority_baseline"] < 0.5
    assert result["image_pool"] > 0.95
    assert result["text_aligned"] > 0.9
    assert result["text_aligned"] > result["text_raw"] + 0.2


def test_report_shrinks_the_gap_and_writes_plots(tmp_path):
    dim = 8
    text = cloud(500, dim, 2 * np.eye(dim)[0], spread=0.4, seed=1)
    images = cloud(500, dim, 2 * np.eye(dim)[1], spread=0.8, seed=2)
    mt, mi = moments(text), moments(images)
    base = dict(dim=dim, encoder=None, counts={}, mu_txt=mt.mean, mu_img=mi.mean,
                trace_txt=mt.trace, trace_img=mi.trace)
    stats = RealignStats(FULL, **base)
    stats.mu_hat = transform(text, RealignStats(replace(FULL, centroid=False), **base)).mean(0)
    aligned = transform(text, stats)
    inputs = gap.ReportInputs(image=images, text=text, aligned=aligned, aligned_moments=moments(aligned),
                              eval_text=text[:100], eval_images=images[:100])
    report = gap.realign_report(stats, inputs, k=5, seed=0, plot_dir=tmp_path)
    assert report["after"]["centroid_gap"] < 0.1 * report["before"]["centroid_gap"]
    assert abs(report["after"]["trace_ratio"] - 1) < abs(report["before"]["trace_ratio"] - 1)
    assert report["after"]["knn_mixing"] > report["before"]["knn_mixing"] + 0.2
    assert report["eval_after"]["matched_distance"] < report["eval_before"]["matched_distance"]
    assert report["phantom_drift"] > report["after"]["centroid_gap"]
    for name in ("pca.png", "cosine_hist.png", "spectra.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    flat = gap.flat_metrics(report)
    assert flat["after.centroid_gap"] == report["after"]["centroid_gap"] and "method" not in flat


def test_json_safe_replaces_non_finite_numbers():
    assert gap.json_safe({"a": {"b": float("nan")}, "c": 1.5}) == {"a": {"b": None}, "c": 1.5}


# --------------------------------------------------------------------------------------------- pipeline mode


def write_set(directory: Path, ids: list[str], vectors: np.ndarray, encoder_id: str = "enc") -> None:
    write_embedding_set(directory, ids, vectors, {"id": encoder_id}, shard_size=64)


def write_layout(root: Path, rows: int = 240, dim: int = 8) -> None:
    """A miniature data/ layout: embeddings for every set the stage reads, manifests with labels."""
    emb, prepared = root / "data" / "embeddings", root / "data" / "prepared"
    prepared.mkdir(parents=True)
    gap_offset = -1.5 * np.eye(dim)[0]
    for name, offset, seed, prefix in (("text", gap_offset, 1, "txt"), ("image_pool", 0 * gap_offset, 2, "img")):
        x, y = labelled_clusters(rows, dim, offset, seed)
        ids = [f"{prefix}-{i}" for i in range(rows)]
        write_set(emb / name, ids, x)
        table = "text_corpus" if name == "text" else "image_pool"
        colour = [None if i % 2 else "red" if c == "class0" else "blue" for i, c in enumerate(y)]
        pd.DataFrame({"id": ids, "class_name": y, "colour": colour}).to_parquet(prepared / f"{table}.parquet")
    images, y = labelled_clusters(90, dim, 0 * gap_offset, 3)
    captions, _ = labelled_clusters(90, dim, gap_offset, 3)
    ids = [f"eval-{i}" for i in range(90)]
    write_set(emb / "eval_images", ids, images)
    write_set(emb / "eval_text", ids, captions)
    pd.DataFrame({"id": ids, "class_name": y, "colour": [None] * 90}).to_parquet(prepared / "eval.parquet")
    realign = {**committed_params()["realign"], "chunk_rows": 50, "report_sample": 100, "report_k": 5,
               "probe_max_rows": 200}
    (root / "params.yaml").write_text(yaml.safe_dump({"realign": realign}))


@pytest.fixture
def logged(monkeypatch):
    """Record what the stage logs instead of starting MLflow (tracking itself is tested elsewhere)."""
    calls = {"params": None, "metrics": {}, "artifacts": []}

    class Run:
        def log_metrics(self, metrics, step=None):
            calls["metrics"].update(metrics)

        def log_artifact(self, path, artifact_path=None):
            calls["artifacts"].append(Path(path).name)

    @contextmanager
    def fake_stage_run(stage, params, is_main=True):
        calls["params"] = (stage, params)
        yield Run()

    monkeypatch.setattr("stages.realign.stage_run", fake_stage_run)
    return calls


def test_pipeline_mode_writes_aligned_set_stats_and_report(tmp_path, monkeypatch, logged):
    write_layout(tmp_path)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["realign"])
    assert result.exit_code == 0, result.output

    aligned, text = EmbeddingSet("data/realign/aligned_text"), EmbeddingSet("data/embeddings/text")
    assert aligned.ids() == text.ids() and aligned.encoder == text.encoder and aligned.count == 240
    assert np.allclose(np.linalg.norm(aligned.load(), axis=1), 1, atol=1e-6)
    stats = json.loads(Path("data/realign/stats.json").read_text())
    assert stats["encoder"] == {"id": "enc"} and stats["counts"] == {"text": 240, "image": 240}

    metrics = json.loads(Path("reports/realign/metrics.json").read_text())
    assert metrics["after"]["centroid_gap"] < 0.2 * metrics["before"]["centroid_gap"]
    assert metrics["eval_after"]["t2i_r1"] >= metrics["eval_before"]["t2i_r1"]
    probe = metrics["probe_class_name"]
    assert probe["text_aligned"] > probe["text_raw"] and probe["image_pool"] > 0.9
    assert "probe_colour" not in metrics  # eval images carry no colour here
    plots = sorted(p.name for p in Path("reports/realign").glob("*.png"))
    assert plots == ["cosine_hist.png", "pca.png", "spectra.png"]
    assert logged["params"][0] == "realign"
    assert logged["metrics"]["after.centroid_gap"] == metrics["after"]["centroid_gap"]
    assert "stats.json" in logged["artifacts"]


def test_pipeline_mode_refuses_a_set_from_another_encoder(tmp_path, monkeypatch, logged):
    write_layout(tmp_path)
    write_set(tmp_path / "data/embeddings/eval_images", [f"eval-{i}" for i in range(90)], cloud(90, 8), "other")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["realign"])
    assert result.exit_code == 2 and "other" in result.output
    assert not Path("data/realign").exists()


def test_pipeline_mode_refuses_unpaired_eval_sets(tmp_path, monkeypatch, logged):
    write_layout(tmp_path)
    ids = [f"eval-{i}" for i in range(90)]
    ids[7] = "stranger"
    write_set(tmp_path / "data/embeddings/eval_text", ids, cloud(90, 8))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["realign"])
    assert result.exit_code == 2 and "row 7 is not paired" in result.output
    assert not Path("data/realign").exists()


def test_pipeline_mode_leaves_no_half_result_when_the_report_fails(tmp_path, monkeypatch, logged):
    write_layout(tmp_path)
    (tmp_path / "data/prepared/eval.parquet").unlink()
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["realign"])
    assert result.exit_code == 2 and "eval.parquet: not found" in result.output
    assert not Path("data/realign").exists() and not Path("reports/realign").exists()
    assert not list(Path("data").glob(".realign*"))  # no temporary folder left behind either
