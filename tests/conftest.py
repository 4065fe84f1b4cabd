"""Shared fixtures: a temporary copy of the repository running the real pipeline on the tiny profile."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from revision.tracking import apply_offline_defaults

apply_offline_defaults()  # offline before any test module imports transformers

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(
    cmd: list[str], cwd: Path, check: bool = True, tracking_uri: str = "sqlite:///mlflow.db", env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run a command with the venv's tools first on PATH; MLflow logs to ``cwd``'s store unless told otherwise."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MLFLOW_TRACKING_URI": tracking_uri, **(env or {})}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def lock_outputs(repo: Path) -> dict[str, list]:
    """Every stage's outputs as DVC hashed them in dvc.lock."""
    import yaml

    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return {stage: sorted((o["path"], o.get("md5")) for o in entry.get("outs", [])) for stage, entry in lock.items()}


def copy_repo(dest: Path, profile: str | None = "tiny") -> Path:
    """Tracked and untracked-not-ignored files into ``dest``, a fresh git repo with one commit."""
    files = run(["git", "ls-files", "-co", "--exclude-standard"], ROOT).stdout.split()
    for name in files:
        src = ROOT / name
        if src.is_file() and not name.startswith(("reports/", "data/")) and name != "dvc.lock":
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    (dest / "data").mkdir(exist_ok=True)
    if profile:
        run(["revision", "profile", profile], dest)
    run(["git", "init", "-q"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "init"], dest)
    return dest


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory) -> Path:
    """The tiny profile reproduced once through `dvc repro`; tests read its outputs (do not modify)."""
    repo = copy_repo(tmp_path_factory.mktemp("repo"))
    run(["dvc", "repro"], repo)
    return repo


@pytest.fixture
def tiny_params(tmp_path) -> Path:
    """A params.yaml with the tiny profile applied, in an empty working folder."""
    from revision.config import apply_profile

    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    apply_profile(ROOT / "profiles" / "tiny.yaml", params)
    return params


@pytest.fixture(scope="session", autouse=True)
def isolated_mlflow(tmp_path_factory):
    """In-process CLI calls log to a throwaway MLflow store, never the repository's."""
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{db}"
    yield
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI")
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with the real SmolLM2 tokenizer, built once (parsing the GGUF takes ~8 s)."""
    from revision.lm import tiny_lm

    return tiny_lm(tmp_path_factory.mktemp("tiny_lm"), seed=0)
