"""The visual inputs (pooled, grid features, pixels): their geometry and projectors, and grid tokens through every MLLM stage."""

from __future__ import annotations

import contextlib
import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from revision.checkpoints import checkpoint_config, load_mllm, save_mllm
from revision.config import LitConfig
from revision.embedding_sets import EmbeddingSet, EmbeddingWriter
from revision.encoders import LitEncoder
from revision.errors import InputError
from revision.feature_maps import GridFeatures
from revision.visual_input import GridInput, GridProjector, PixelsInput, PooledInput, from_fields, from_params
from stages.cli import app
from tests.helpers import edit_params, tiny_mllm


def tiny_encoder() -> LitEncoder:
    cfg = LitConfig(text_tower="tiny", image_tower="tiny", image_size=32, embed_dim=16, epochs=1, batch_size=8, lr=1e-3,
                    weight_decay=0.0, head_layers=2, logit_scale=100.0, learn_logit_scale=False)
    return LitEncoder(cfg, seed=0)


def images(n: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("grid", [1, 2, 4])
def test_grid_cells_are_the_tower_map_the_pooled_feature_averages(grid):
    encoder = tiny_encoder()
    features = GridFeatures(encoder, grid)
    rows = features.encode_images(images())
    assert features.channels == encoder.image_tower.dim and rows.shape == (3, grid * grid * features.channels)
    cells = rows.view(3, grid * grid, features.channels)
    pooled = encoder.image_tower(images())  # what the pooled embedding is computed from
    assert torch.allclose(cells.mean(1), pooled, atol=1e-5)
    if grid > 1:
        assert not torch.allclose(cells[:, 0], cells[:, -1])  # the cells see different parts of the image


def test_the_grid_projector_maps_each_cell_on_its_own():
    torch.manual_seed(0)
    projector = GridProjector(embed_dim=8, hidden_size=12, visual_tokens=4)
    rows = torch.randn(2, 4 * 8)
    out = projector(rows)
    changed = rows.clone()
    changed[:, 2 * 8 : 3 * 8] += torch.randn(2, 8)  # cell 2 only (a constant shift would be normalised away)
    moved = (projector(changed) - out).abs().amax(dim=(0, 2))
    assert out.shape == (2, 4, 12)
    assert moved[2] > 1e-3 and torch.equal(moved[[0, 1, 3]], torch.zeros(3))


def test_a_grid_model_saves_and_loads_with_its_projector(tiny_lm_dir, tmp_path):
    model = tiny_mllm(tiny_lm_dir, 8, 4, {"id": "e", "dim": 16})
    model.config.visual = GridInput(side=2, channels=8)
    model.projector = GridProjector(8, model.projector.hidden_size, 4)
    save_mllm(model, tmp_path / "m")
    loaded = load_mllm(tmp_path / "m")
    rows, conversation = torch.randn(2, 32), [[{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A."}]] * 2
    assert isinstance(loaded.projector, GridProjector) and loaded.config.visual == GridInput(2, 8)
    assert json.loads((tmp_path / "m" / "mllm.json").read_text())["grid"] == 2  # the geometry is stored
    with torch.no_grad():
        assert torch.allclose(loaded(rows, conversation).loss, model(rows, conversation).loss, atol=1e-6)


def test_a_grid_set_records_its_cells_and_a_pooled_index_is_unchanged(tmp_path):
    writer = EmbeddingWriter(tmp_path / "g", {"id": "e", "dim": 16}, 4 * 8, tokens=4)
    writer.add(["a", "b"], np.ones((2, 32)))
    writer.close()
    pooled = EmbeddingWriter(tmp_path / "p", {"id": "e", "dim": 16}, 16)
    pooled.add(["a"], np.ones((1, 16)))
    pooled.close()
    assert EmbeddingSet(tmp_path / "g").tokens == 4 and EmbeddingSet(tmp_path / "p").tokens == 1
    assert "tokens" not in json.loads((tmp_path / "p" / "index.json").read_text())
    with pytest.raises(InputError, match=r"holds 4 cell\(s\) per image, model.grid asks for 3 x 3"):
        from_params(SimpleNamespace(visual_input="grid", grid=3), None, EmbeddingSet(tmp_path / "g"))
    model = GridInput(side=3, channels=8)
    with pytest.raises(InputError, match=r"4 cells of 8 channels per image, but the model reads 9 of 8"):
        model.rows(tmp_path, tmp_path, "g")
    with pytest.raises(InputError, match="no grid features for a grid model"):
        model.rows(tmp_path, tmp_path, "missing")


# ---------------------------------------------------------------- the stages, on the tiny pipeline


def _invoke(repo, *args: str):
    with contextlib.chdir(repo):  # the tiny repo's data/; MLflow goes to the session's throwaway store
        return CliRunner().invoke(app, list(args))


def _grid_params(repo, tmp_path, **pretrain) -> str:
    path = edit_params(repo / "params.yaml", "model", tmp_path / "params.yaml", visual_input="grid", grid=2)
    return str(edit_params(path, "pretrain", **pretrain) if pretrain else path)


@pytest.mark.slow
def test_grid_stage_writes_the_cells_of_every_image_an_mllm_reads(tiny_repo, tmp_path):
    assert json.loads((tiny_repo / "data" / "visual" / "visual_input.json").read_text()) == {"visual_input": "pooled"}
    params = _grid_params(tiny_repo, tmp_path)
    result = _invoke(tiny_repo, "visual", "--params", params, "--out", str(tmp_path / "grid"), "--metrics", str(tmp_path / "g.json"))
    assert result.exit_code == 0, result.output[-2000:]
    from revision.encoders import load_encoder
    from revision.images import read_rows

    encoder, identity = load_encoder(tiny_repo / "data" / "encoder")
    for name in ("pretrain_images", "sft_images", "eval_images"):
        cells, pooled = EmbeddingSet(tmp_path / "grid" / name), EmbeddingSet(tiny_repo / "data" / "embeddings" / name)
        assert cells.ids() == pooled.ids() and cells.encoder == identity and cells.tokens == 4
    record = json.loads((tmp_path / "grid" / "visual_input.json").read_text())
    assert (record["grid"], record["channels"]) == (2, encoder.image_tower.dim)
    prepared = tiny_repo / "data" / "prepared"
    image = pd.read_parquet(prepared / "eval.parquet")["image"].iloc[0]
    expected = GridFeatures(encoder, 2).encode_images(read_rows([(0, prepared / image)], "eval.parquet"))
    assert np.allclose(EmbeddingSet(tmp_path / "grid" / "eval_images").load()[0], expected[0].numpy(), atol=1e-5)


@pytest.mark.slow
def test_a_text_stage_1_cannot_have_grid_input(tiny_repo, tmp_path):
    result = _invoke(tiny_repo, "pretrain", "--params", _grid_params(tiny_repo, tmp_path, source="aligned"),
                     "--out", str(tmp_path / "out"), "--checkpoints", str(tmp_path / "ckpt"))
    assert result.exit_code == 2 and "model.visual_input: grid needs images in stage 1" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_paired_grid_with_ross_trains_both_stages_and_evaluates(tiny_repo, tmp_path):
    """The LLaVA recipe with Ross: grid tokens, one Ross target per cell, then evaluate reads the grid eval set."""
    params = _grid_params(tiny_repo, tmp_path, source="paired", ross=True)
    params = str(edit_params(params, "finetune", ross=True))
    grid = str(tmp_path / "grid")
    assert _invoke(tiny_repo, "visual", "--params", params, "--out", grid, "--metrics", str(tmp_path / "g.json")).exit_code == 0
    common = ["--params", params, "--visual", grid]
    stage1 = _invoke(tiny_repo, "pretrain", *common, "--out", str(tmp_path / "pre"), "--checkpoints", str(tmp_path / "c1"),
                     "--metrics", str(tmp_path / "p.json"), "--loss-plot", str(tmp_path / "p.csv"))
    assert stage1.exit_code == 0, stage1.output[-2000:]
    config = checkpoint_config(tmp_path / "pre")
    assert config.visual == GridInput(side=2, channels=json.loads((tmp_path / "grid" / "visual_input.json").read_text())["channels"])
    ross = json.loads((tmp_path / "pre" / "ross" / "ross.json").read_text())
    assert ross["denoiser"]["grid"] == 2  # one target per visual token
    stage2 = _invoke(tiny_repo, "finetune", *common, "--pretrained", str(tmp_path / "pre"), "--out", str(tmp_path / "fin"),
                     "--checkpoints", str(tmp_path / "c2"), "--metrics", str(tmp_path / "f.json"),
                     "--loss-plot", str(tmp_path / "f.csv"))
    assert stage2.exit_code == 0, stage2.output[-2000:]
    # chat reads the image as the checkpoint was trained to: its grid features, as the grid stage wrote them
    image = tiny_repo / "data" / "prepared" / pd.read_parquet(tiny_repo / "data" / "prepared" / "eval.parquet")["image"].iloc[0]
    answer = _invoke(tiny_repo, "chat", "--image", str(image), "--checkpoint", str(tmp_path / "fin"), "--max-new-tokens", "6")
    assert answer.exit_code == 0, answer.output[-2000:]
    with contextlib.chdir(tiny_repo):
        row = torch.from_numpy(EmbeddingSet(tmp_path / "grid" / "eval_images").load()[0])
        expected = load_mllm(tmp_path / "fin").generate(row[None], [None], max_new_tokens=6)[0]
    assert answer.stdout.strip() == expected
    metrics = tmp_path / "e" / "metrics.json"
    evaluate = ["evaluate", "--params", params, "--predictions", str(tmp_path / "e"), "--metrics", str(metrics)]
    checkpoints = ["--checkpoints", str(tmp_path / "pre"), "--checkpoints", str(tmp_path / "fin")]
    missing = _invoke(tiny_repo, *evaluate, *checkpoints)  # the pipeline's data/visual holds no grid features
    assert missing.exit_code == 2 and "no grid features for a grid model" in missing.output
    done = _invoke(tiny_repo, *evaluate, "--visual", grid, *checkpoints, "--checkpoints", "data/finetune")
    assert done.exit_code == 0, done.output[-2000:]
    scores = json.loads(metrics.read_text())
    assert set(scores) == {"pre", "fin", "finetune"}  # a grid and a pooled model side by side
    assert scores["finetune"] == json.loads((tiny_repo / "reports" / "evaluate" / "metrics.json").read_text())["finetune"]


# ---------------------------------------------------------------- the three types


@pytest.mark.parametrize(
    "visual, tokens, side",
    [(PooledInput(dim=16, tokens=4), 4, 2), (PooledInput(dim=16, tokens=3), 3, None), (GridInput(side=3, channels=8), 9, 3),
     (PixelsInput(image_size=16, patch=4), 16, 4)],
)
def test_each_visual_input_records_its_geometry_and_reads_back_the_same(visual, tokens, side):
    assert (visual.tokens, visual.side) == (tokens, side)
    fields = visual.fields
    assert from_fields(json.loads(json.dumps(fields))) == visual
    assert fields["visual_input"] == visual.kind and fields["visual_tokens"] == tokens
    assert visual.projector(hidden_size=8)(torch.zeros(2, _row_width(visual))).shape == (2, tokens, 8)


def _row_width(visual) -> int:
    return {"pooled": lambda: visual.dim, "grid": lambda: visual.tokens * visual.channels,
            "pixels": lambda: 3 * visual.image_size**2}[visual.kind]()


def test_a_checkpoint_config_without_its_geometry_is_refused_not_guessed():
    with pytest.raises(InputError, match="without its 'grid'"):
        from_fields({"visual_input": "grid", "embed_dim": 8, "visual_tokens": 4})
    with pytest.raises(InputError, match="does not tile"):
        PixelsInput(image_size=16, patch=5)
