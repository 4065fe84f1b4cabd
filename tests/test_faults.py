"""Faults and determinism through `dvc repro` on the tiny profile: stages SIGKILLed mid-run resume where they
stopped, and every re-run stage ends byte-identical to the uninterrupted run with the same params."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests.helpers import INSTRUMENT, lock_outputs, run

pytestmark = pytest.mark.slow

KILLED = {"embed": "data/.embeddings.tmp", "pretrain": "data/checkpoints/pretrain", "finetune": "data/checkpoints/finetune"}


def forget(repo: Path, stage: str) -> None:
    """Make ``stage`` look never run, as on a first run: no dvc.lock entry, no run cache to restore from."""
    lock = repo / "dvc.lock"
    lock.write_text(re.sub(rf"\n  {stage}:\n(    .*\n)+", "\n", lock.read_text()))
    shutil.rmtree(repo / ".dvc" / "cache" / "runs", ignore_errors=True)


def reports(repo: Path) -> dict[str, bytes]:
    """Every metrics, plot and prediction file under reports/, byte for byte."""
    return {str(p.relative_to(repo)): p.read_bytes() for p in sorted((repo / "reports").rglob("*")) if p.is_file()}


def test_killed_stages_resume_and_reruns_are_identical(tiny_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo, symlinks=True)
    for stage in [*KILLED, "evaluate"]:  # evaluate re-runs too: its metrics must come out the same
        forget(repo, stage)
    for stage, partial in KILLED.items():  # each `dvc repro` first finishes the stage killed before
        kill = {"PYTHONPATH": str(INSTRUMENT), "REVISION_TEST_STAGE": stage, "REVISION_TEST_KILL_AFTER": "1"}
        killed = run(["dvc", "repro"], repo, check=False, env=kill)
        assert killed.returncode != 0 and f"failed to reproduce '{stage}'" in killed.stderr
        assert (repo / partial).is_dir(), f"{stage} left nothing to resume from"
        if stage != "embed":
            assert "resuming" in killed.stdout  # the stage killed in the previous round picked up its pieces
    finished = run(["dvc", "repro"], repo)
    assert "resuming from the checkpoint" in finished.stdout and "Running stage 'evaluate'" in finished.stdout
    assert not any((repo / partial).exists() for partial in KILLED.values())
    assert lock_outputs(repo) == lock_outputs(tiny_repo)
    assert reports(repo) == reports(tiny_repo)
