"""Precision: what `mixed_precision: auto` resolves to on each kind of hardware (features mocked both ways), and a
training stage and evaluate in bf16 through the real CLI: the precision is recorded, and a killed stage resumes to
the same bytes as an uninterrupted run."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate.state import AcceleratorState
from mlflow import MlflowClient

from revision import precision
from revision.config import TrainConfig, load_stage_config
from revision.precision import cpu_flags, resolve
from revision.training_setup import make_accelerator
from tests.helpers import INSTRUMENT, edit_params, run

ZEN4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_tile amx_bf16 amx_int8\n"
AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
AVX512_NO_BF16 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw avx512_vnni\n"


@pytest.fixture
def cpuinfo(tmp_path, monkeypatch):
    """Point the feature check at a fake /proc/cpuinfo with the given text."""

    def write(text: str) -> None:
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        monkeypatch.setattr(precision, "CPUINFO", path)

    return write


@pytest.mark.parametrize("text, expected", [(ZEN4, "bf16"), (SAPPHIRE_RAPIDS, "bf16"), (AVX2_ONLY, "no"),
                                            (AVX512_NO_BF16, "no"), ("processor\t: 0\n", "no")],
                         ids=["avx512_bf16", "amx_bf16", "avx2", "avx512_without_bf16", "no_flags"])
def test_auto_is_bf16_exactly_where_the_cpu_multiplies_it(cpuinfo, text, expected):
    cpuinfo(text)
    assert resolve("auto", "cpu") == expected
    assert resolve("no", "cpu") == "no" and resolve("bf16", "cpu") == "bf16"  # explicit values are kept


def test_no_cpuinfo_means_no_features(tmp_path):
    assert cpu_flags(tmp_path / "missing") == frozenset()
    assert "avx2" in cpu_flags(_written(tmp_path, AVX2_ONLY))


@pytest.mark.parametrize("supported, expected", [(True, "bf16"), (False, "no")])
def test_auto_on_a_gpu_follows_its_bf16_support(monkeypatch, cpuinfo, supported, expected):
    cpuinfo(ZEN4)  # the host CPU does not decide for a GPU
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    assert resolve("auto", "cuda") == expected


@pytest.mark.parametrize("text, expected", [(ZEN4, "bf16"), (AVX2_ONLY, "no")], ids=["avx512_bf16", "avx2"])
def test_training_stages_get_an_accelerator_at_the_resolved_precision(cpuinfo, text, expected):
    cpuinfo(text)
    cfg: TrainConfig = load_stage_config("pretrain").model_copy(update={"mixed_precision": "auto"})
    AcceleratorState._reset_state(True)
    try:
        accelerator = make_accelerator(cfg)
        assert accelerator.mixed_precision == expected
        with accelerator.autocast():
            product = torch.ones(4, 4) @ torch.ones(4, 4)
        assert product.dtype == (torch.bfloat16 if expected == "bf16" else torch.float32)
    finally:
        AcceleratorState._reset_state(True)  # later tests make their own Accelerator


def _written(tmp_path, text: str):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return path


# ---------------------------------------------------------------- through the real CLI


def _pretrain(repo, work, *, env=None, check=True):
    params = edit_params(repo / "params.yaml", "pretrain", work / "params.yaml", mixed_precision="bf16")
    args = ["revision", "pretrain", "--params", str(params), "--out", str(work / "out"), "--metrics",
            str(work / "m.json"), "--loss-plot", str(work / "loss.csv"), "--checkpoints", str(work / "ckpt")]
    return run(args, repo, check=check, tracking_uri=f"sqlite:///{work / 'mlflow.db'}", env=env)


@pytest.mark.slow
def test_bf16_stage_records_its_precision_and_resumes_exactly_after_a_kill(tiny_repo, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir(), killed.mkdir()
    _pretrain(tiny_repo, whole)
    summary = json.loads((whole / "m.json").read_text())
    assert summary["precision"] == "bf16" and summary["steps"] > 5  # more steps than one checkpoint interval
    assert json.loads((whole / "out" / "mllm.json").read_text())["precision"] == {"pretrain": "bf16"}
    client = MlflowClient(f"sqlite:///{whole / 'mlflow.db'}")
    stage_runs = client.search_runs([client.get_experiment_by_name("revision").experiment_id], "tags.stage = 'pretrain'")
    assert [r.data.params["precision"] for r in stage_runs] == ["bf16"]

    kill = {"PYTHONPATH": str(INSTRUMENT), "REVISION_TEST_STAGE": "pretrain", "REVISION_TEST_KILL_AFTER": "1"}
    assert _pretrain(tiny_repo, killed, env=kill, check=False).returncode != 0
    assert (killed / "ckpt" / "state").is_dir() and not (killed / "out").exists()
    resumed = _pretrain(tiny_repo, killed)
    assert "resuming from the checkpoint" in resumed.stdout
    for name in ("projector.safetensors", "mllm.json"):
        assert (killed / "out" / name).read_bytes() == (whole / "out" / name).read_bytes(), name
    assert (killed / "loss.csv").read_text() == (whole / "loss.csv").read_text()

    params = edit_params(tiny_repo / "params.yaml", "evaluate", tmp_path / "eval.yaml", mixed_precision="bf16")
    metrics = tmp_path / "evaluate.json"
    run(["revision", "evaluate", "--params", str(params), "--checkpoints", str(whole / "out"), "--metrics",
         str(metrics), "--predictions", str(tmp_path / "predictions")], tiny_repo,
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    scores = json.loads(metrics.read_text())["out"]
    assert scores["precision"] == "bf16" and scores["caption_nll"] > 0
