"""pretrain sources and finetune modes through the real CLI (in this process), on the tiny pipeline's outputs."""

from __future__ import annotations

import contextlib
import json

import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from revision.checkpoints import load_mllm
from stages.cli import app
from tests.helpers import edit_params

pytestmark = pytest.mark.slow


def _stage(tiny_repo, tmp_path, stage: str, *extra: str, **overrides) -> dict:
    tmp_path.mkdir(exist_ok=True)
    path = edit_params(tiny_repo / "params.yaml", stage, tmp_path / "params.yaml", **overrides)
    out = tmp_path / "out"
    args = ["revision", stage, "--params", str(path), "--out", str(out), "--metrics", str(tmp_path / "m.json"),
            "--loss-plot", str(tmp_path / "loss.csv"), "--checkpoints", str(tmp_path / "ckpt"), *extra]
    with contextlib.chdir(tiny_repo):  # reads the tiny repo's data/; logs to the session's throwaway MLflow store
        result = CliRunner().invoke(app, args[1:])
    return {"result": result, "out": out, "metrics": tmp_path / "m.json", "loss": tmp_path / "loss.csv"}


def test_paired_baseline_trains_on_real_image_embeddings(tiny_repo, tmp_path):
    done = _stage(tiny_repo, tmp_path, "pretrain", source="paired")
    assert done["result"].exit_code == 0, done["result"].output[-2000:]
    summary = json.loads(done["metrics"].read_text())
    pairs = len(pd.read_parquet(tiny_repo / "data" / "prepared" / "pretrain_pairs.parquet"))
    assert summary["source"] == "paired" and summary["samples"] == pairs
    assert summary["loss_last"] < summary["loss_first"]


def test_pretrain_none_skips_training_but_writes_a_model(tiny_repo, tmp_path):
    done = _stage(tiny_repo, tmp_path, "pretrain", source="none")
    assert done["result"].exit_code == 0, done["result"].output[-2000:]
    assert json.loads(done["metrics"].read_text())["steps"] == 0
    assert (done["out"] / "projector.safetensors").exists()


def test_full_finetune_trains_the_whole_lm(tiny_repo, tmp_path):
    done = _stage(tiny_repo, tmp_path, "finetune", lora=False)
    assert done["result"].exit_code == 0, done["result"].output[-2000:]
    summary = json.loads(done["metrics"].read_text())
    assert summary["loss_last"] < summary["loss_first"]
    # LoRA (merged on save) changes only the projections it wraps; a full finetune moves every other LM weight
    # too (MLPs, norms, the token embeddings), away from the stage-1 checkpoint the stage started from.
    targets = yaml.safe_load((tiny_repo / "params.yaml").read_text())["finetune"]["lora_targets"]
    before = load_mllm(tiny_repo / "data" / "pretrain").lm.state_dict()
    after = load_mllm(done["out"]).lm.state_dict()
    assert after.keys() == before.keys()
    beyond_lora = [name for name in before if name.endswith("weight") and not any(f".{t}." in name for t in targets)]
    assert any(".mlp." in name for name in beyond_lora) and any("embed_tokens" in name for name in beyond_lora)
    unchanged = [name for name in beyond_lora if torch.equal(before[name], after[name])]
    assert unchanged == [], f"full finetune left these LM weights as stage 1 had them: {unchanged}"


def test_unknown_pretrain_source_is_a_clean_error(tiny_repo, tmp_path):
    done = _stage(tiny_repo, tmp_path, "pretrain", source="captions")
    assert done["result"].exit_code == 2 and "pretrain.source" in done["result"].output
    assert not done["out"].exists()


def test_ross_in_stage_1_needs_paired_images(tiny_repo, tmp_path):
    done = _stage(tiny_repo, tmp_path, "pretrain", source="aligned", ross=True)
    assert done["result"].exit_code == 2 and "pretrain.ross needs pretrain.source: paired" in done["result"].output
    assert not done["out"].exists() and not done["metrics"].exists()


def test_ross_trains_in_both_stages_and_stage_2_continues_stage_1s_denoiser(tiny_repo, tmp_path):
    stage1 = _stage(tiny_repo, tmp_path / "stage1", "pretrain", source="paired", ross=True)
    assert stage1["result"].exit_code == 0, stage1["result"].output[-2000:]
    summary = json.loads(stage1["metrics"].read_text())
    assert summary["denoise_loss_first"] == pytest.approx(1.0, abs=0.2)  # the zero-initialised output
    assert summary["denoise_loss_last"] < summary["denoise_loss_first"]
    curve = pd.read_csv(stage1["loss"])
    assert list(curve.columns) == ["step", "loss", "lr", "lm_loss", "denoise_loss"]
    assert curve["loss"].to_numpy() == pytest.approx((curve["lm_loss"] + curve["denoise_loss"]).to_numpy(), rel=1e-5)
    assert (stage1["out"] / "ross" / "denoiser.safetensors").exists()

    stage2 = _stage(tiny_repo, tmp_path / "stage2", "finetune", "--pretrained", str(stage1["out"]), ross=True)
    assert stage2["result"].exit_code == 0, stage2["result"].output[-2000:]
    continued = json.loads(stage2["metrics"].read_text())
    assert continued["denoise_loss_first"] < summary["denoise_loss_first"] - 0.05  # not a fresh denoiser
    assert (stage2["out"] / "ross" / "denoiser.safetensors").exists()
    # without the switch, stage 2 neither trains nor keeps it
    plain = _stage(tiny_repo, tmp_path / "plain", "finetune", "--pretrained", str(stage1["out"]))
    assert plain["result"].exit_code == 0 and not (plain["out"] / "ross").exists()
    assert "denoise_loss_first" not in json.loads(plain["metrics"].read_text())
