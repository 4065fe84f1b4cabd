"""pretrain sources and finetune modes through the real CLI, on the tiny pipeline's outputs."""

from __future__ import annotations

import json
import os

import pandas as pd
import yaml

from tests.conftest import run


def _stage(tiny_repo, tmp_path, stage: str, **overrides) -> dict:
    params = yaml.safe_load((tiny_repo / "params.yaml").read_text())
    params[stage].update(overrides)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    out = tmp_path / "out"
    args = ["revision", stage, "--params", str(path), "--out", str(out), "--metrics", str(tmp_path / "m.json"),
            "--loss-plot", str(tmp_path / "loss.csv"), "--checkpoints", str(tmp_path / "ckpt")]  # fmt: skip
    # log to the session's throwaway store: the tiny repo's own store must keep one run per stage
    result = run(args, tiny_repo, check=False, tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    return {"result": result, "out": out, "metrics": tmp_path / "m.json"}


def test_paired_baseline_trains_on_real_image_embeddings(tiny_repo, tmp_path):
    done = _stage(tiny_repo, tmp_path, "pretrain", source="paired")
    assert done["result"].returncode == 0, done["result"].stderr[-2000:]
    summary = json.loads(done["metrics"].read_text())
    pairs = len(pd.read_parquet(tiny_repo / "data" / "prepared" / "pretrain_pairs.parquet"))
    assert summary["source"] == "paired" and summary["samples"] == pairs
    assert summary["loss_last"] < summary["loss_first"]


def test_pretrain_none_skips_training_but_writes_a_model(tiny_repo, tmp_path):
    done = _stage(tiny_repo, tmp_path, "pretrain", source="none")
    assert done["result"].returncode == 0, done["result"].stderr[-2000:]
    assert json.loads(done["metrics"].read_text())["steps"] == 0
    assert (done["out"] / "projector.safetensors").exists()


def test_full_finetune_trains_the_whole_lm(tiny_repo, tmp_path):
    done = _stage(tiny_repo, tmp_path, "finetune", lora=False)
    assert done["result"].returncode == 0, done["result"].stderr[-2000:]
    summary = json.loads(done["metrics"].read_text())
    assert summary["loss_last"] < summary["loss_first"]


def test_unknown_pretrain_source_is_a_clean_error(tiny_repo, tmp_path):
    done = _stage(tiny_repo, tmp_path, "pretrain", source="captions")
    assert done["result"].returncode == 2 and "pretrain.source" in done["result"].stderr
    assert not done["out"].exists()
