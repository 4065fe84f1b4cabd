"""MLflow tracking: one run per stage, tagged with the DVC experiment name and the git revision.

Under DVC (``dvc repro``, ``dvc exp run``) the stage runs nest under one parent run per pipeline run: the same
git revision, DVC experiment and params.yaml. The parent holds every param and each stage's summary metrics
(``<stage>/<metric>``), so comparing two experiments is comparing two parent runs. A stage run by hand has no
parent. Only the main process logs; other ranks get a no-op run, so several processes never make duplicate runs.
"""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from revision.config import flatten, normalized_block, read_params
from revision.outputs import fingerprint

OFFLINE_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "MLFLOW_TRACKING_URI": "sqlite:///mlflow.db",
    "TOKENIZERS_PARALLELISM": "false",
}


def apply_offline_defaults() -> None:
    """Offline-safe defaults; anything the user exported wins."""
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)


def create_store(uri: str) -> None:
    """Create the tracking store's tables now. Experiments that start at once on a new sqlite store each try to
    create them and fail mid-migration (one corrupted store fails every later run)."""
    import mlflow

    mlflow.MlflowClient(uri).search_experiments(max_results=1)


def git_revision() -> str:
    rev = os.environ.get("DVC_EXP_BASELINE_REV")
    if rev:
        return rev
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# The kind MLflow 3 reads where its "GenAI / Model training" switch is off; with the switch, the README link picks it
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
PIPELINE_TAG = "pipeline"


class StageRun:
    """A thin handle the stages log through; silent on non-main ranks. Summary metrics (no ``step``) go to
    the pipeline's parent run too, under ``<stage>/``."""

    def __init__(self, active: bool, stage: str = "", parent_id: str | None = None):
        self.active, self.stage, self.parent_id = active, stage, parent_id

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.active:
            import mlflow

            values = {k: float(v) for k, v in metrics.items()}
            mlflow.log_metrics(values, step=step)
            if step is None and self.parent_id:
                mlflow.log_metrics({f"{self.stage}/{k}": v for k, v in values.items()}, run_id=self.parent_id)

    def log_params(self, params: dict[str, object]) -> None:
        """Values the stage decided as it ran (the precision ``auto`` resolved to), also on the parent run."""
        if self.active:
            import mlflow

            values = {k: str(v) for k, v in params.items()}
            mlflow.log_params(values)
            if self.parent_id:  # a tag: a parent's params are params.yaml's, and a re-run stage may log again
                client = mlflow.MlflowClient()
                for key, value in values.items():
                    client.set_tag(self.parent_id, f"{self.stage}/{key}", value)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.active and Path(path).exists():
            import mlflow

            if Path(path).is_dir():
                mlflow.log_artifacts(str(path), artifact_path)
            else:
                mlflow.log_artifact(str(path), artifact_path)


def pipeline_parent(experiment_id: str, tags: dict[str, str]) -> str | None:
    """The parent run of this pipeline run (made on first use), or None outside DVC. DVC sets ``DVC_ROOT``
    for every stage it runs; the params file there, the git revision and the experiment name identify it."""
    root = os.environ.get("DVC_ROOT")
    if not root or not (Path(root) / "params.yaml").exists():
        return None
    from mlflow import MlflowClient
    from mlflow.entities import Param

    params = flatten({stage: normalized_block(stage, block) for stage, block in read_params(Path(root) / "params.yaml").items()})
    digest = fingerprint(params)[:12]
    experiment = tags.get("dvc_experiment", "workspace")
    key = f"{tags['git_revision']}:{experiment}:{digest}"
    client = MlflowClient()
    found = client.search_runs([experiment_id], f"tags.{PIPELINE_TAG} = '{key}'", max_results=1)
    if found:
        return found[0].info.run_id
    name = experiment if experiment != "workspace" else f"dvc repro @ {tags['git_revision'][:7]} ({digest[:6]})"
    run = client.create_run(experiment_id, run_name=name, tags={**tags, PIPELINE_TAG: key, "params_digest": digest})
    items = [Param(k, str(v)[:500]) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow's batch limit
        client.log_batch(run.info.run_id, params=items[start : start + 100])
    return run.info.run_id


@contextmanager
def stage_run(stage: str, blocks: dict[str, object], is_main: bool = True) -> Iterator[StageRun]:
    """Open one MLflow run for ``stage`` with the params ``blocks`` it read (block name -> block, logged as
    ``block.key``) and DVC/git tags (main process only), nested under the pipeline's parent run when DVC runs
    the stage."""
    if not is_main:
        yield StageRun(False)
        return
    import mlflow

    apply_offline_defaults()
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    experiment = mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "revision"))
    if not all(experiment.tags.get(k) == v for k, v in EXPERIMENT_KIND.items()):
        mlflow.set_experiment_tags(EXPERIMENT_KIND)
    tags = {"git_revision": git_revision()}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_experiment"] = os.environ["DVC_EXP_NAME"]
    parent_id = pipeline_parent(experiment.experiment_id, tags)
    status = "FAILED"
    try:
        with mlflow.start_run(run_name=stage, tags={**tags, "stage": stage}, parent_run_id=parent_id):
            named = flatten({name: normalized_block(name, block) for name, block in blocks.items()})
            mlflow.log_params({k: str(v)[:500] for k, v in named.items()})
            yield StageRun(True, stage, parent_id)
        status = "FINISHED"
    finally:
        if parent_id:
            mlflow.MlflowClient().set_terminated(parent_id, status)
