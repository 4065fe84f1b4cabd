"""MLflow tracking: one run per stage, tagged with the DVC experiment name and the git revision.

Only the main process logs; other ranks get a no-op run, so several processes never make duplicate runs.
"""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from revision.config import flatten

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


def git_revision() -> str:
    rev = os.environ.get("DVC_EXP_BASELINE_REV")
    if rev:
        return rev
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"




class StageRun:
    """A thin handle the stages log through; silent on non-main ranks."""

    def __init__(self, active: bool):
        self.active = active

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.active:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.active and Path(path).exists():
            import mlflow

            if Path(path).is_dir():
                mlflow.log_artifacts(str(path), artifact_path)
            else:
                mlflow.log_artifact(str(path), artifact_path)


@contextmanager
def stage_run(stage: str, params: dict, is_main: bool = True) -> Iterator[StageRun]:
    """Open one MLflow run for ``stage`` with its params and DVC/git tags (main process only)."""
    if not is_main:
        yield StageRun(False)
        return
    import mlflow

    apply_offline_defaults()
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "revision"))
    tags = {"stage": stage, "git_revision": git_revision()}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_experiment"] = os.environ["DVC_EXP_NAME"]
    with mlflow.start_run(run_name=stage, tags=tags):
        mlflow.log_params({k: str(v)[:500] for k, v in flatten(params, f"{stage}.").items()})
        yield StageRun(True)
