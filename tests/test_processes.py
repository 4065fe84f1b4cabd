"""Two CPU processes under `accelerate launch`: the same embeddings as one process, training ranks that stay
in sync and end close to the one-process run, and only the main process writing outputs and MLflow runs."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.helpers import INSTRUMENT, ROOT, lock_outputs, run

TWO_CPU_PROCESSES = "accelerate launch --config_file configs/accelerate/cpu-2proc.yaml -m stages"
ON_CPU = {"ACCELERATE_USE_CPU": "true"}


def runs_of(tracking_uri: str, stage: str) -> int:
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("revision")
    return len(client.search_runs([experiment.experiment_id], f"tags.stage = '{stage}'")) if experiment else 0


@pytest.mark.slow
def test_two_processes_embed_exactly_like_one_through_dvc(tiny_repo, tmp_path):
    # One thread per process on both sides: float reductions may round differently with another thread count.
    one_thread = {**ON_CPU, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    single = tmp_path / "single"
    shutil.copytree(tiny_repo, single, symlinks=True)
    run(["dvc", "repro", "--force", "--single-item", "embed"], single, tracking_uri=f"sqlite:///{tmp_path / 's.db'}", env=one_thread)
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo, symlinks=True)
    params = repo / "params.yaml"
    params.write_text(re.sub(r"(?m)^launch: .*$", f"launch: {TWO_CPU_PROCESSES}", params.read_text()))
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run(["dvc", "repro", "--single-item", "embed"], repo, tracking_uri=tracking, env=one_thread)
    assert f"> {TWO_CPU_PROCESSES} embed" in result.stdout

    assert lock_outputs(repo)["embed"] == lock_outputs(single)["embed"]  # byte-identical embedding sets
    assert runs_of(tracking, "embed") == 1


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["plain", "ross", "vora"])
def test_two_processes_train_in_sync_and_close_to_one(tiny_repo, tmp_path, variant):
    params = yaml.safe_load((tiny_repo / "params.yaml").read_text())
    params["pretrain"]["batch_size"] //= 2  # per process: the global batch stays the one-process batch
    if variant == "ross":  # the denoiser trains beside the projector, and its weights must stay in sync too
        params["pretrain"].update(source="paired", ross=True)
    if variant == "vora":  # LoRA, patch embedding and distillation heads must stay in sync
        params["pretrain"]["source"], params["model"]["visual_input"] = "paired", "pixels"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    data = tiny_repo / "data"
    options = ["--params", tmp_path / "params.yaml", "--prepared", data / "prepared", "--embeddings", data / "embeddings"]
    if variant == "vora":
        pixels = ["--params", tmp_path / "params.yaml", "--prepared", data / "prepared", "--out", tmp_path / "pixels"]
        run(["revision", "visual", *map(str, pixels), "--metrics", str(tmp_path / "visual.json")], tiny_repo, tracking_uri=tracking)
        options += ["--visual", tmp_path / "pixels"]
    options += ["--realign", data / "realign", "--lm-dir", data / "lm", "--out", tmp_path / "pretrain"]
    options += ["--checkpoints", tmp_path / "checkpoints", "--metrics", tmp_path / "pretrain.json"]
    options += ["--loss-plot", tmp_path / "loss.csv"]
    digests = tmp_path / "digests"
    digests.mkdir()
    env = {**ON_CPU, "PYTHONPATH": str(INSTRUMENT), "REVISION_TEST_STAGE": "pretrain", "REVISION_TEST_PARAMS_DIR": str(digests)}
    launch = TWO_CPU_PROCESSES.replace("configs/", f"{ROOT}/configs/").split()
    run([*launch, "pretrain", *map(str, options)], tmp_path, tracking_uri=tracking, env=env)

    ranks = [p.read_text() for p in sorted(digests.glob("rank*.txt"))]
    assert len(ranks) == 2 and ranks[0] == ranks[1]
    two = json.loads((tmp_path / "pretrain.json").read_text())
    assert two["loss_last"] < two["loss_first"]
    assert runs_of(tracking, "pretrain") == 1
    assert (tmp_path / "pretrain" / "mllm.json").exists() and not (tmp_path / "checkpoints").exists()
    if variant == "vora":
        assert two["distill_loss_last"] < two["distill_loss_first"]
        assert (tmp_path / "pretrain" / "adapter").is_dir()
        return
    if variant == "ross":
        assert two["denoise_loss_last"] < two["denoise_loss_first"]
        assert (tmp_path / "pretrain" / "ross" / "denoiser.safetensors").exists()
        return
    one = json.loads((tiny_repo / "reports" / "pretrain.json").read_text())
    assert two["steps"] == one["steps"] and two["samples"] == one["samples"]
    assert two["loss_last"] == pytest.approx(one["loss_last"], rel=0.05)


def test_shipped_accelerate_configs_load_and_leave_precision_to_params():
    from accelerate.commands.config.config_args import load_config_from_file

    configs = {p.stem: load_config_from_file(str(p)) for p in sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))}
    kinds = {(c.distributed_type.value, (c.deepspeed_config or {}).get("zero_stage")) for c in configs.values()}
    assert {("MULTI_GPU", None), ("DEEPSPEED", 2), ("DEEPSPEED", 3), ("FSDP", None)} <= kinds
    assert all(c.mixed_precision == "no" for c in configs.values())  # one source of truth: params.yaml
