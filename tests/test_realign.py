"""ReAlign math, streaming, stats files and the standalone CLI."""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import MISSING, fields
from pathlib import Path
from typing import get_args

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import save_file
from typer.testing import CliRunner

from revision.config import RealignConfig
from revision.errors import InputError
from revision.realign import (
    METHODS,
    RealignRows,
    Recipe,
    align_to_embedding_set,
    align_to_npy,
    apply_files,
    c3_noise,
    fit,
    fit_files,
    load_stats,
    open_embeddings,
    transform_images,
)
from stages.cli import app
from tests.helpers import unit, write_embedding_set

GOLDEN = Path(__file__).parent / "fixtures" / "realign_golden"
TOL = 1e-6
# The recipe of the golden reference (every ReAlign step on); a Recipe has no defaults, so tests start from this.
FULL = {"method": "realign", "anchor": True, "trace": True, "centroid": True, "noise_std": 0.1, "seed": 0, "shrinkage": 0.1}


def full_recipe(**changes) -> Recipe:
    return Recipe(**{**FULL, **changes})


def synthetic(rows: int, dim: int, offset: float, spread: float, seed: int) -> np.ndarray:
    """Anisotropic cloud around a random direction, unnormalized, float32."""
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=dim) * offset
    scales = spread * np.linspace(1.0, 0.1, dim)
    return (centre + rng.normal(size=(rows, dim)) * scales).astype(np.float32)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Text and image .npy files with clearly different means and spreads."""
    folder = tmp_path_factory.mktemp("pair")
    text, image = synthetic(1000, 16, 1.0, 0.3, 1), synthetic(700, 16, 1.0, 0.8, 2)
    np.save(folder / "text.npy", text)
    np.save(folder / "image.npy", image)
    return folder / "text.npy", folder / "image.npy"


def aligned(text_path, image_path, tmp_path, chunk_rows=10**6, **changes) -> tuple[np.ndarray, object]:
    text = open_embeddings(text_path)
    stats = fit(text, open_embeddings(image_path), full_recipe(**changes), chunk_rows)
    out = tmp_path / f"aligned-{hashlib.md5(repr((chunk_rows, changes)).encode()).hexdigest()}.npy"
    align_to_npy(text, stats, out, chunk_rows)
    return np.load(out), stats


def project_set(directory: Path, vectors: np.ndarray, encoder_id: str = "enc-a", shard_size: int = 4096) -> Path:
    return write_embedding_set(directory, [f"row-{i}" for i in range(len(vectors))], vectors, {"id": encoder_id}, shard_size)


# --------------------------------------------------------------------------------------------- golden


def test_golden_output_and_stats_match_the_reference(tmp_path):
    out, stats = aligned(GOLDEN / "text.npy", GOLDEN / "image.npy", tmp_path, chunk_rows=333)
    reference = np.load(GOLDEN / "aligned_text.npy")
    assert out.shape == reference.shape
    assert np.abs(out - reference).max() <= TOL
    expected = json.loads((GOLDEN / "stats.json").read_text())
    for key in ("mu_txt", "mu_img", "mu_hat"):
        assert np.abs(getattr(stats, key) - np.asarray(expected[key])).max() <= TOL, key
    for key in ("scale", "trace_txt", "trace_img"):
        assert getattr(stats, key) == pytest.approx(expected[key], abs=TOL), key


def test_golden_with_text_split_over_shards_matches(tmp_path):
    text = project_set(tmp_path / "text", np.load(GOLDEN / "text.npy"), shard_size=1700)
    out, stats = aligned(text, GOLDEN / "image.npy", tmp_path, chunk_rows=333)
    assert np.abs(out - np.load(GOLDEN / "aligned_text.npy")).max() <= TOL
    assert stats.encoder == {"id": "enc-a"}


# --------------------------------------------------------------------------------------------- switches


def documented_realign(t, v, anchor, trace, centroid):
    """The switch semantics written out plainly, in memory, as the module docstring states them."""
    t, v = unit(t), unit(v)
    mu_t, mu_v = t.mean(0), v.mean(0)
    target = mu_v if anchor else mu_t
    scale = np.sqrt(((v - mu_v) ** 2).sum(1).mean() / ((t - mu_t) ** 2).sum(1).mean()) if trace else 1.0
    h = unit((t - mu_t) * scale + target)
    return unit(h - h.mean(0) + target) if centroid else h


SWITCHES = list(itertools.product([False, True], repeat=3))


@pytest.mark.parametrize("anchor,trace,centroid", SWITCHES)
def test_every_switch_combination_follows_the_documented_formula(pair, tmp_path, anchor, trace, centroid):
    out, _ = aligned(*pair, tmp_path, anchor=anchor, trace=trace, centroid=centroid)
    expected = documented_realign(np.load(pair[0]), np.load(pair[1]), anchor, trace, centroid)
    assert np.abs(out - expected).max() <= TOL
    assert np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-6)


def test_without_anchor_trace_or_not_it_is_the_identity_unless_trace(pair, tmp_path):
    raw = unit(np.load(pair[0]))
    for centroid in (False, True):
        out, _ = aligned(*pair, tmp_path, anchor=False, trace=False, centroid=centroid)
        assert np.abs(out - raw).max() <= TOL
    traced, _ = aligned(*pair, tmp_path, anchor=False, trace=True, centroid=False)
    assert np.abs(traced - raw).max() > 0.05


def test_anchor_moves_the_text_mean_onto_the_image_mean(pair, tmp_path):
    out, stats = aligned(*pair, tmp_path, anchor=True, trace=False, centroid=False)
    # each output row is the anchored row, rescaled: its pre-normalization mean is the image mean
    anchored = unit(np.load(pair[0])) - stats.mu_txt + stats.mu_img
    np.testing.assert_allclose(anchored.mean(0), stats.mu_img, atol=1e-12)
    cos = np.sum(out * unit(anchored), axis=1)
    np.testing.assert_allclose(cos, 1, atol=1e-6)
    assert np.linalg.norm(out.mean(0) - stats.mu_img) < 0.5 * np.linalg.norm(stats.mu_txt - stats.mu_img)


def test_trace_without_anchor_keeps_the_text_mean_direction(pair, tmp_path):
    out, stats = aligned(*pair, tmp_path, anchor=False, trace=True, centroid=True)
    mean = out.mean(0)
    assert mean @ stats.mu_txt / np.linalg.norm(mean) / np.linalg.norm(stats.mu_txt) > 0.99
    spread = ((out - mean) ** 2).sum(1).mean()
    assert spread > 1.5 * stats.trace_txt  # the image side is wider, so trace widens the text


def test_centroid_removes_phantom_drift(pair, tmp_path):
    without, stats = aligned(*pair, tmp_path, centroid=False)
    with_centroid, _ = aligned(*pair, tmp_path, centroid=True)
    drift_before = np.linalg.norm(without.mean(0) - stats.mu_img)
    drift_after = np.linalg.norm(with_centroid.mean(0) - stats.mu_img)
    assert drift_before > 0.005
    assert drift_after < 0.25 * drift_before


def test_image_file_is_never_changed(pair, tmp_path):
    digest = hashlib.sha256(pair[1].read_bytes()).hexdigest()
    for method in METHODS:
        _, stats = aligned(*pair, tmp_path, method=method)
        if method != "c3":
            v = unit(np.load(pair[1]))
            assert transform_images(v, stats) is v
    assert hashlib.sha256(pair[1].read_bytes()).hexdigest() == digest


# --------------------------------------------------------------------------------------------- methods


def test_mean_shift_subtracts_the_text_mean(pair, tmp_path):
    out, stats = aligned(*pair, tmp_path, method="mean_shift")
    expected = unit(unit(np.load(pair[0])) - stats.mu_txt)
    assert np.abs(out - expected).max() <= TOL


def test_none_is_the_normalized_input(pair, tmp_path):
    out, _ = aligned(*pair, tmp_path, method="none")
    assert np.abs(out - unit(np.load(pair[0]))).max() <= TOL


def test_c3_centres_and_adds_seeded_noise(pair, tmp_path):
    out, stats = aligned(*pair, tmp_path, method="c3", noise_std=0.05, seed=3)
    noise = c3_noise(3, 0, 1000, 16, 0.05)
    assert noise.std() == pytest.approx(0.05, rel=0.05)
    expected = unit(unit(np.load(pair[0])) - stats.mu_txt + noise)
    assert np.abs(out - expected).max() <= TOL
    other_seed, _ = aligned(*pair, tmp_path, method="c3", noise_std=0.05, seed=4)
    assert np.abs(out - other_seed).max() > 1e-3
    images = transform_images(unit(np.load(pair[1])), stats)
    assert np.linalg.norm(images.mean(0)) < 0.2 * np.linalg.norm(stats.mu_img)
    assert stats.image_transform["subtract"] == "mu_img"


def test_c3_noise_does_not_depend_on_chunking():
    whole = c3_noise(7, 0, 10000, 4, 1.0)
    parts = np.concatenate([c3_noise(7, start, min(333, 10000 - start), 4, 1.0) for start in range(0, 10000, 333)])
    np.testing.assert_array_equal(whole, parts)


def test_block_cov_colours_the_text_with_the_image_covariance(pair, tmp_path):
    out, stats = aligned(*pair, tmp_path, method="block_cov", shrinkage=0.0)
    t, v = unit(np.load(pair[0])), unit(np.load(pair[1]))
    coloured = (t - stats.mu_txt) @ stats.text_to_image
    np.testing.assert_allclose(np.cov(coloured.T, bias=True), np.cov(v.T, bias=True), atol=1e-10)
    assert np.abs(out - unit(coloured + stats.mu_img)).max() <= TOL


def test_block_cov_singular_text_covariance_asks_for_shrinkage(tmp_path):
    np.save(tmp_path / "t.npy", synthetic(8, 16, 1.0, 0.3, 1))  # 8 rows in 16 dims: singular
    np.save(tmp_path / "i.npy", synthetic(50, 16, 1.0, 0.3, 2))
    with pytest.raises(InputError, match="shrinkage"):
        aligned(tmp_path / "t.npy", tmp_path / "i.npy", tmp_path, method="block_cov", shrinkage=0.0)
    out, _ = aligned(tmp_path / "t.npy", tmp_path / "i.npy", tmp_path, method="block_cov", shrinkage=0.5)
    assert np.isfinite(out).all()


# --------------------------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("method", METHODS)
def test_chunked_equals_unchunked(pair, tmp_path, method):
    small, _ = aligned(*pair, tmp_path, chunk_rows=333, method=method)
    large, _ = aligned(*pair, tmp_path, chunk_rows=10**6, method=method)
    # sums taken in another order may differ in the last float64 bits, never more than a float32 ulp
    assert np.abs(small - large).max() <= 1.2e-7


def test_embedding_set_output_equals_the_npy_output(tmp_path):
    vectors = synthetic(100, 8, 1.0, 0.3, 1)
    text = open_embeddings(project_set(tmp_path / "text", vectors, shard_size=40))
    stats = fit(text, open_embeddings(project_set(tmp_path / "img", synthetic(60, 8, 1.0, 0.8, 2))), full_recipe(), 7)
    align_to_embedding_set(text, stats, tmp_path / "out", 7)  # several 7-row chunks per 40-row shard
    align_to_npy(text, stats, tmp_path / "out.npy", 7)
    np.testing.assert_array_equal(open_embeddings(tmp_path / "out").set.load(), np.load(tmp_path / "out.npy"))


def test_the_direct_path_for_near_zero_rows_gives_the_same_output(pair, tmp_path, monkeypatch):
    fast, _ = aligned(*pair, tmp_path, chunk_rows=100)
    monkeypatch.setattr(RealignRows, "TINY", np.inf)  # every chunk takes the float64 fallback
    direct, _ = aligned(*pair, tmp_path / "direct", chunk_rows=100)
    assert np.abs(fast - direct).max() <= TOL


@pytest.mark.parametrize("method", METHODS)
def test_apply_round_trip_gives_identical_output(pair, tmp_path, method):
    fit_files(*pair, tmp_path / "fit", full_recipe(method=method), 333)
    apply_files(tmp_path / "fit" / "stats.json", pair[0], tmp_path / "applied", 250)
    fitted = np.load(tmp_path / "fit" / "aligned_text.npy")
    np.testing.assert_array_equal(fitted, np.load(tmp_path / "applied" / "aligned_text.npy"))


def test_apply_uses_the_fitted_mu_hat_on_new_text(pair, tmp_path):
    stats, _ = fit_files(*pair, tmp_path / "fit", full_recipe(), 333)
    new = synthetic(40, 16, 1.0, 0.3, 9)
    np.save(tmp_path / "new.npy", new)
    apply_files(tmp_path / "fit" / "stats.json", tmp_path / "new.npy", tmp_path / "applied", 7)
    h = unit((unit(new) - stats.mu_txt) * stats.scale + stats.mu_img)
    expected = unit(h - stats.mu_hat + stats.mu_img)  # the fitted mu_hat, not the new text's own mean
    assert np.abs(np.load(tmp_path / "applied" / "aligned_text.npy") - expected).max() <= TOL


def test_a_recipe_spells_out_every_setting_and_takes_its_methods_from_the_config():
    assert all(f.default is MISSING and f.default_factory is MISSING for f in fields(Recipe))
    assert METHODS == get_args(RealignConfig.model_fields["method"].annotation)
    with pytest.raises(InputError, match="'nope' is not one of realign, none, mean_shift, c3, block_cov"):
        full_recipe(method="nope")


def test_stats_json_records_the_fit(pair, tmp_path):
    fit_files(*pair, tmp_path, full_recipe(anchor=True, trace=False, centroid=True), 100)
    saved = json.loads((tmp_path / "stats.json").read_text())
    assert saved["method"] == "realign"
    assert saved["switches"] == {"anchor": True, "trace": False, "centroid": True}
    assert saved["counts"] == {"text": 1000, "image": 700}
    assert len(saved["mu_hat"]) == 16 and saved["dim"] == 16 and saved["encoder"] is None
    assert saved["scale"] == pytest.approx(np.sqrt(saved["trace_img"] / saved["trace_txt"]))
    assert load_stats(tmp_path / "stats.json").recipe == full_recipe(anchor=True, trace=False, centroid=True)


# --------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("bad,problem", [(np.nan, "non-finite"), (np.inf, "non-finite"), (0.0, "zero norm")])
def test_bad_row_names_file_and_row(pair, tmp_path, bad, problem):
    text = np.load(pair[0])
    text[417] = bad
    np.save(tmp_path / "bad.npy", text)
    with pytest.raises(InputError, match=rf"bad\.npy: row 417 .*{problem}"):
        aligned(tmp_path / "bad.npy", pair[1], tmp_path, chunk_rows=100)


def test_bad_row_in_a_shard_names_the_shard_and_the_set_row(tmp_path):
    vectors = synthetic(50, 8, 1.0, 0.3, 1)
    vectors[33, 2] = np.nan
    text = project_set(tmp_path / "text", vectors, shard_size=20)
    images = project_set(tmp_path / "images", synthetic(30, 8, 1.0, 0.3, 2))
    with pytest.raises(InputError, match=r"shard-00001\.safetensors: row 13 \(row 33 of .*text\)"):
        fit(open_embeddings(text), open_embeddings(images), full_recipe(), 7)


def test_dimension_mismatch_is_an_input_error(pair, tmp_path):
    np.save(tmp_path / "narrow.npy", synthetic(20, 8, 1.0, 0.3, 1))
    with pytest.raises(InputError, match="dim 8"):
        fit(open_embeddings(pair[0]), open_embeddings(tmp_path / "narrow.npy"), full_recipe(), 100)
    fit_files(*pair, tmp_path / "fit", full_recipe(), 100)
    with pytest.raises(InputError, match=r"narrow\.npy: dim 8 .*dim 16"):
        apply_files(tmp_path / "fit" / "stats.json", tmp_path / "narrow.npy", tmp_path / "out", 100)


def test_encoder_mismatch_is_an_input_error(tmp_path):
    text = project_set(tmp_path / "text", synthetic(40, 8, 1.0, 0.3, 1), "enc-a")
    images_b = project_set(tmp_path / "images_b", synthetic(30, 8, 1.0, 0.3, 2), "enc-b")
    with pytest.raises(InputError, match="enc-b"):
        fit(open_embeddings(text), open_embeddings(images_b), full_recipe(), 16)
    images_a = project_set(tmp_path / "images_a", synthetic(30, 8, 1.0, 0.3, 2), "enc-a")
    fit_files(text, images_a, tmp_path / "fit", full_recipe(), 16)
    other_text = project_set(tmp_path / "text_b", synthetic(10, 8, 1.0, 0.3, 3), "enc-b")
    with pytest.raises(InputError, match="enc-a"):
        apply_files(tmp_path / "fit" / "stats.json", other_text, tmp_path / "out", 16)


def test_malformed_stats_file_is_an_input_error(pair, tmp_path):
    fit_files(*pair, tmp_path / "fit", full_recipe(), 100)
    saved = json.loads((tmp_path / "fit" / "stats.json").read_text())
    saved["mu_hat"] = saved["mu_hat"][:-1]
    (tmp_path / "broken.json").write_text(json.dumps(saved))
    with pytest.raises(InputError, match=r"broken\.json: 'mu_hat' must be 16"):
        load_stats(tmp_path / "broken.json")


def test_unreadable_inputs_are_input_errors(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    np.save(tmp_path / "cube.npy", np.zeros((2, 3, 4), np.float32))
    save_file({"a": np.ones((3, 4), np.float32), "b": np.ones((3, 4), np.float32)}, str(tmp_path / "two.safetensors"))
    pq.write_table(pa.table({"embedding": [[1.0, 2.0], [1.0], [3.0, 4.0]]}), tmp_path / "ragged.parquet")
    (tmp_path / "emb.csv").write_text("1,2\n")
    cases = {
        "junk.safetensors": "not a safetensors file", "junk.npy": "not a readable .npy", "cube.npy": "2-D",
        "two.safetensors": "no tensor named 'embeddings'", "emb.csv": "unknown embedding file type",
        "ragged.parquet": "row 1 has 1 values, expected 2",
    }
    for name, message in cases.items():
        with pytest.raises(InputError, match=message):
            source = open_embeddings(tmp_path / name)
            list(source.chunks(2))


def test_bfloat16_safetensors_is_read_as_float32(tmp_path):
    values = np.array([[1.0, -2.5, 0.15625]], np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype(np.uint16)
    header = json.dumps({"embeddings": {"dtype": "BF16", "shape": [1, 3], "data_offsets": [0, 6]}}).encode()
    (tmp_path / "bf.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bf16.tobytes())
    chunk = next(open_embeddings(tmp_path / "bf.safetensors").chunks(10))
    np.testing.assert_array_equal(chunk.values, values)


# --------------------------------------------------------------------------------------------- CLI


def golden_in_format(kind: str, folder: Path) -> Path:
    text = np.load(GOLDEN / "text.npy")
    if kind == "npy":
        return GOLDEN / "text.npy"
    if kind == "safetensors":
        save_file({"embeddings": text}, str(folder / "text.safetensors"))
        return folder / "text.safetensors"
    if kind == "safetensors-only-tensor":
        save_file({"feats": text.astype(np.float64)}, str(folder / "text.safetensors"))
        return folder / "text.safetensors"
    if kind == "parquet-list":
        table = pa.table({"id": [f"t{i}" for i in range(len(text))], "embedding": list(text)})
        pq.write_table(table, folder / "text.parquet", row_group_size=700)
        return folder / "text.parquet"
    if kind == "parquet-columns":
        frame = pd.DataFrame(text, columns=[f"d{j}" for j in range(text.shape[1])])
        frame.insert(0, "id", np.arange(len(text)))  # a numeric id column is not a dimension
        frame.to_parquet(folder / "text.parquet", row_group_size=700)
        return folder / "text.parquet"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["npy", "safetensors", "safetensors-only-tensor", "parquet-list", "parquet-columns"])
def test_cli_fits_on_user_files_and_applies(tmp_path, kind, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no params.yaml here: built-in defaults
    text = golden_in_format(kind, tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["realign", "--text-embeddings", str(text), "--image-embeddings",
                                 str(GOLDEN / "image.npy"), "--output-dir", "fitted", "--chunk-rows", "333"])
    assert result.exit_code == 0, result.output
    out = np.load(tmp_path / "fitted" / "aligned_text.npy")
    assert np.abs(out - np.load(GOLDEN / "aligned_text.npy")).max() <= TOL
    result = runner.invoke(app, ["realign", "--apply", "fitted/stats.json", "--text-embeddings", str(text),
                                 "--output-dir", "applied"])
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(np.load(tmp_path / "applied" / "aligned_text.npy"), out)


def test_standalone_settings_without_a_params_file_are_the_full_recipe(tmp_path):
    from stages.realign import STANDALONE, standalone_config

    assert set(STANDALONE) == {f.name for f in fields(Recipe)} | {"chunk_rows"}
    assert standalone_config(tmp_path / "absent.yaml", {}) == (full_recipe(), 1024)


def test_cli_options_override_params(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("realign:\n  method: mean_shift\n  chunk_rows: 100\n")
    runner = CliRunner()
    args = ["realign", "--text-embeddings", str(GOLDEN / "text.npy"), "--image-embeddings", str(GOLDEN / "image.npy")]
    assert runner.invoke(app, [*args, "--output-dir", "a"]).exit_code == 0
    assert json.loads((tmp_path / "a" / "stats.json").read_text())["method"] == "mean_shift"
    assert runner.invoke(app, [*args, "--output-dir", "b", "--method", "realign", "--no-trace"]).exit_code == 0
    saved = json.loads((tmp_path / "b" / "stats.json").read_text())
    assert saved["method"] == "realign" and saved["switches"]["trace"] is False


@pytest.mark.parametrize("args,message", [
    (["--output-dir", "x"], "--text-embeddings is required"),
    (["--text-embeddings", "T.npy", "--output-dir", "x"], "--image-embeddings is required"),
    (["--text-embeddings", "T.npy", "--image-embeddings", "I.npy", "--output-dir", "x", "--method", "no"], "--method"),
    (["--text-embeddings", "gone.npy", "--image-embeddings", "I.npy", "--output-dir", "x"], "gone.npy: not found"),
    (["--text-embeddings", "T.npy", "--apply", "s.json", "--method", "c3", "--output-dir", "x"], "--apply uses"),
])
def test_cli_bad_usage_exits_2_with_a_message(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "T.npy", synthetic(5, 4, 1, 1, 0))
    np.save(tmp_path / "I.npy", synthetic(5, 4, 1, 1, 1))
    result = CliRunner().invoke(app, ["realign", *args])
    assert result.exit_code == 2
    assert message in result.output
