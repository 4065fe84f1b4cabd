"""The suite passes whatever experiment a user last ran or applied in the workspace.

`dvc exp run -S realign.trace=false` (or `dvc exp apply`) leaves params.yaml holding the experiment's values in
DVC's own YAML spelling; the repositories the tests build take params.yaml as committed, so such an edit never
reaches a test."""

from __future__ import annotations

import shutil

import yaml

from tests.helpers import EXPERIMENT_FILES, ROOT, committed_params, committed_text, copy_repo, run


def _experiment_applied(repo):
    """``repo``'s params.yaml as `dvc exp run -S realign.trace=false` leaves it: the change, rewritten whole."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["realign"]["trace"] is True, "the committed params.yaml no longer traces: pick another key here"
    params["realign"]["trace"] = False
    (repo / "params.yaml").write_text(yaml.safe_dump(params))


def test_a_test_repository_has_the_committed_params_not_the_last_experiment(tmp_path):
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(clone)], tmp_path)
    committed = (clone / "params.yaml").read_text()
    _experiment_applied(clone)
    template = ROOT / ".dvc" / "plots.html"  # git-ignored, so not cloned; copy_repo would build it (slow)
    if template.exists():
        shutil.copy2(template, clone / ".dvc" / "plots.html")

    repo = copy_repo(tmp_path / "repo", profile=None, source=clone)

    assert (repo / "params.yaml").read_text() == committed
    assert committed_params(clone)["realign"]["trace"] is True
    assert "params.yaml" in EXPERIMENT_FILES


def test_committed_text_falls_back_to_the_file_outside_git(tmp_path):
    (tmp_path / "params.yaml").write_text("launch: revision\n")  # tmp_path is no git checkout
    assert committed_text("params.yaml", tmp_path) == "launch: revision\n"


def test_a_file_not_yet_committed_is_read_from_the_tree(tmp_path):
    run(["git", "init", "-q"], tmp_path)
    (tmp_path / "params.yaml").write_text("launch: revision\n")
    assert committed_text("params.yaml", tmp_path) == "launch: revision\n"
