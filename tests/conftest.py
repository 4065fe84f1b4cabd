"""Shared fixtures: a temporary copy of the repository running the real pipeline on the tiny profile."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from revision.tracking import apply_offline_defaults
from tests.helpers import ROOT, committed_text, copy_repo, run

apply_offline_defaults()  # offline before any test module imports transformers


def pytest_collection_modifyitems(config, items):
    """A test on the tiny pipeline must be marked slow, or `pytest -m "not slow"` would start a `dvc repro`."""
    unmarked = [
        item.nodeid for item in items
        if "tiny_repo" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("slow")
    ]
    if unmarked:
        raise pytest.UsageError("these tests use tiny_repo: mark them @pytest.mark.slow: " + ", ".join(unmarked))


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
    params.write_text(committed_text("params.yaml"), encoding="utf-8")  # not the experiment last run here
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
