"""The data contract: each stage command's default paths are exactly its deps and outs in dvc.yaml."""

from __future__ import annotations

import inspect
from pathlib import Path, PurePosixPath

import pytest
import yaml

from revision import layout

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
NOT_IN_DVC = {layout.CHECKPOINTS}  # resumable state, deleted when a stage ends
READ_THROUGH_CHECKPOINTS = {"finetune": {layout.LM}, "evaluate": {layout.LM}}  # the base LM a checkpoint names


def _option_paths(stage: str) -> set[PurePosixPath]:
    """The data/ and reports/ paths among the stage command's option defaults."""
    module = __import__(f"stages.{stage}", fromlist=["main"])
    paths = set()
    for parameter in inspect.signature(module.main).parameters.values():
        default = getattr(parameter.default, "default", None)
        for value in default if isinstance(default, list) else [default]:
            if isinstance(value, Path) and value.parts[0] in ("data", "reports"):
                if not any(value.is_relative_to(skip) for skip in NOT_IN_DVC):
                    paths.add(PurePosixPath(value.as_posix()))
    return paths | {PurePosixPath(path.as_posix()) for path in READ_THROUGH_CHECKPOINTS.get(stage, ())}


def _dvc_paths(stage: str) -> set[PurePosixPath]:
    entry = DVC[stage]
    paths = set()
    for key in ("deps", "outs", "metrics", "plots"):
        for item in entry.get(key, []):
            path = next(iter(item)) if isinstance(item, dict) else item
            if path.startswith(("data/", "reports/")):
                paths.add(PurePosixPath(path))
    return paths


@pytest.mark.parametrize("stage", sorted(DVC))
def test_stage_defaults_are_its_dvc_paths(stage):
    options, declared = _option_paths(stage), _dvc_paths(stage)
    # a folder option (reports/evaluate) covers the files DVC tracks inside it
    undeclared = {p for p in options if not any(d == p or p in d.parents for d in declared)}
    unused = {d for d in declared if not any(d == p or p in d.parents for p in options)}
    assert not undeclared, f"{stage}: reads or writes {sorted(map(str, undeclared))}, not in dvc.yaml"
    assert not unused, f"{stage}: dvc.yaml lists {sorted(map(str, unused))}, which the command does not use"


def test_every_manifest_is_declared_once():
    files = [manifest.file for manifest in layout.MANIFESTS]
    assert len(files) == len(set(files))
    assert all("id" in manifest.columns for manifest in layout.MANIFESTS)
    names = [spec.name for spec in layout.EMBEDDED_SETS]
    assert len(names) == len(set(names)) and layout.ALIGNED_TEXT not in names
